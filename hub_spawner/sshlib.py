"""asyncssh, imported for this package without the DSA deprecation warnings of its own imports.

asyncssh 2.x names ``cryptography``'s DSA classes in annotations that run at import time, and
cryptography warns for each (``CryptographyDeprecationWarning: DSA is deprecated``): five lines
at the top of every hub log and every ``python -m hub_spawner check``, about a key type we never
offer. Exactly those are silenced, and only while asyncssh is imported: every other warning, and
a DSA warning from anything done later, still shows. Modules of this package import asyncssh
from here, never directly.
"""

from __future__ import annotations

import warnings

from cryptography.utils import CryptographyDeprecationWarning

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="DSA is deprecated",
                            category=CryptographyDeprecationWarning)
    import asyncssh

__all__ = ["asyncssh"]
