"""Byte sizes as users write them: 512KB, 300MB, 2GiB, 1.5 GB, 40% (of a stated total)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*$")


def parse_size(text: str, total: int | None = None) -> int:
    """Bytes for `text`. A percentage needs `total` (what 100% means). Decimal units (KB, MB, GB)
    are powers of 1000, binary ones (KiB, MiB, GiB, or K, M, G) powers of 1024."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"cannot read {text!r} as a size (examples: 512KB, 300MB, 2GiB, 40%)")
    value, unit = float(match.group(1)), match.group(2).lower()
    if unit == "%":
        if total is None:
            raise ValueError("a percentage needs a total to refer to")
        if not 0 < value <= 100:
            raise ValueError(f"{text!r}: a percentage must be in (0, 100]")
        return int(total * value / 100)
    if unit not in _UNITS:
        raise ValueError(f"{text!r}: unknown unit {match.group(2)!r} (B, KB, MB, GB, KiB, MiB, GiB or %)")
    return int(value * _UNITS[unit])


def format_size(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
