"""Compiled kernels for the decode step (optional: every one has a pure-torch fallback).

`cpu` builds `cpu_decode.cpp` through torch's C++ extension mechanism on first use. This
package does not decide when attention runs (see `kvcompress.cache.attention`) and changes nothing
at import.
"""
