"""Integrations of kvcompress's codecs into other inference engines (each sub-package needs that engine)."""
