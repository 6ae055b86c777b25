"""Measuring what a spec costs: decode-faithful evaluation (`evaluate`), prompt compression
(`prompt`: a context compressed at once, then a teacher-forced continuation), direct reconstruction
of captured K/V (`reconstruction`) and tasks (`tasks`: passkey retrieval, generation agreement).

Measuring code restores every model it touches as it found it. This package reads text and
models; it never chooses a spec (see `tuning`) or writes result folders (see `experiments`).
"""
