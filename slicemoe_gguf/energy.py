"""Device profiles and the modelled energy and latency of decode.

The cache counters say what a decode token moved; a device profile says what that costs on a phone or
a laptop. Per decode token:

    energy  = flash_bytes * e_flash + ram_bytes * e_dram + macs * e_mac
    latency = flash_bytes / bw_flash + ram_bytes / bw_dram + compute_ms

- `flash_bytes`: slice bytes read from the model file (misses, warm-up and prefetch loads).
- `ram_bytes`: expert slice bytes the products read from the RAM cache.
- `macs`: one multiply-accumulate per expert weight per use (the MSB product of every use; the
  LSB product of an 8-bit use refines the same weights, so it adds no MACs of its own).
- `compute_ms`: measured compute of this machine (`slicemoe run`), or 0 in trace replay, where
  the latency is the memory traffic alone.

Only the routed experts are modelled: attention, embeddings, routers and shared experts cost the same
under every policy, so leaving them out keeps the figures a comparison of policies, not of devices.
Each number of a profile names its published source in the profile file (`profiles/*.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PROFILE_DIR = Path(__file__).with_name("profiles")
_FIELDS = {"flash_read_bandwidth": "B/s", "flash_read_energy": "J/B", "dram_bandwidth": "B/s",
           "dram_energy": "J/B", "mac_energy": "J/MAC"}
# An MSB slice is stored as Q4_1 blocks: 32 weights in 20 bytes (f16 scale and minimum, 16 B of codes).
_Q4_1_WEIGHTS, _Q4_1_BYTES = 32, 20


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    flash_read_bandwidth: float   # B/s
    flash_read_energy: float      # J/B
    dram_bandwidth: float         # B/s
    dram_energy: float            # J/B
    mac_energy: float             # J/MAC
    sources: dict[str, str]


DEFAULT_PROFILES = ("phone", "laptop")


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A built-in profile by name (`phone`, `laptop`) or a profile JSON file of the same layout."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.json"
        if not path.exists():
            raise ValueError(f"unknown device profile {str(name_or_path)!r}; built in: {', '.join(builtin_profiles())}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read device profile '{path}': {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"device profile '{path}' is not JSON: {exc}") from exc
    values, sources = {}, {}
    for field, unit in _FIELDS.items():
        entry = data.get(field)
        if not isinstance(entry, dict) or not isinstance(entry.get("value"), (int, float)) or entry["value"] <= 0:
            raise ValueError(f"device profile '{path}': '{field}' needs a positive 'value' in {unit} and a 'source'")
        if entry.get("unit", unit) != unit:
            raise ValueError(f"device profile '{path}': '{field}' must be in {unit}, not {entry['unit']}")
        if not entry.get("source"):
            raise ValueError(f"device profile '{path}': '{field}' has no 'source'; every number must cite one")
        values[field] = float(entry["value"])
        sources[field] = str(entry["source"])
    return DeviceProfile(name=str(data.get("name", path.stem)), description=str(data.get("description", "")),
                         sources=sources, **values)


def weights_per_expert(msb_slice_bytes: int) -> int:
    """Weights of one expert (gate, up and down together) from the size of its MSB slice."""
    return int(msb_slice_bytes) // _Q4_1_BYTES * _Q4_1_WEIGHTS


def per_token(stats: dict, profile: DeviceProfile, msb_slice_bytes: int, compute_ms: float = 0.0) -> dict:
    """Modelled decode cost per token from cache counters (`slicemoe run --json`'s `cache` object or
    `slicemoe sim`'s counters): energy in mJ by part, and latency in ms."""
    tokens = max(int(stats["decode_tokens"]), 1)
    flash = stats["flash_bytes"] / tokens
    ram = stats["ram_bytes"] / tokens
    macs = (stats["msb_hits"] + stats["msb_misses"]) * weights_per_expert(msb_slice_bytes) / tokens
    flash_mj = flash * profile.flash_read_energy * 1e3
    ram_mj = ram * profile.dram_energy * 1e3
    mac_mj = macs * profile.mac_energy * 1e3
    flash_ms = flash / profile.flash_read_bandwidth * 1e3
    ram_ms = ram / profile.dram_bandwidth * 1e3
    return {
        "profile": profile.name,
        "energy_mj_per_token": flash_mj + ram_mj + mac_mj,
        "flash_mj_per_token": flash_mj,
        "dram_mj_per_token": ram_mj,
        "compute_mj_per_token": mac_mj,
        "latency_ms_per_token": flash_ms + ram_ms + compute_ms,
        "flash_ms_per_token": flash_ms,
        "dram_ms_per_token": ram_ms,
        "compute_ms_per_token": compute_ms,
        "expert_macs_per_token": macs,
    }
