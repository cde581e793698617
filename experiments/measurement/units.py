"""Memory units: a config states budgets in MiB, the library counts bytes."""
from __future__ import annotations

import math

MIB = 2**20


def mib_to_bytes(mib: float) -> int:
    return int(mib * MIB)


def bytes_to_mib_ceil(n: int) -> float:
    """The smallest MiB value with 3 decimals whose `mib_to_bytes` is at least n."""
    mib = math.ceil(n / MIB * 1000) / 1000
    return mib if mib_to_bytes(mib) >= n else mib + 0.001
