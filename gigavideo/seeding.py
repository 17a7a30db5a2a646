"""The one way a seed is derived from named work: every stage and the eval call `derive_seed`.

A seed is a function of a base seed and names (a sample key, a step, a rank ...), never of the
order in which work happens to run, so a resumed or re-sharded run draws the same noise.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts, digest_bytes: int = 8) -> int:
    """The first `digest_bytes` of sha256(":".join(parts)), read little-endian, below 2**63."""
    text = ":".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:digest_bytes], "little") % (2**63)
