"""Sub-commands of the `kvcompress` CLI, one per module (see `kvcompress.cli`)."""
