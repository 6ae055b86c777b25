"""The `kvcompress` command line: `main` dispatches to one module per sub-command.

Command modules parse and check arguments, call the library and print; they hold no
measuring or compression logic of their own.
"""
