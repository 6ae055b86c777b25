"""Every transformers detail kvcompress depends on beyond the documented Cache API, in one place.

Tested with transformers 5.24. This module does not patch transformers.
"""

from __future__ import annotations

import transformers

TESTED_TRANSFORMERS = ("5.24",)

# transformers 5.x renamed the `past_key_values=` argument of forward/generate to `cache=`
# (the old name warns and works until 5.40). kvcompress passes caches under the new name.
CACHE_KWARG = "cache"

TRANSFORMERS_VERSION = transformers.__version__
