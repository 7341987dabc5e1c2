"""The phone profile against a published phone measurement: BigMoeOnEdge's Qwen3-30B-A3B Q4_K_M
streamed on a OnePlus 15R (UFS 4.x, 11.3 GB RAM, 4 threads).

    python scripts/phone_vs_published.py

The published configuration (docs/benchmarks.md of github.com/Helldez/BigMoeOnEdge at commit
00bf75a, table "Qwen3-30B-A3B-Q4_K_M", row "streaming + cache 4000 MiB, lane 4"): 3.47 tok/s mean,
76% cache hit, 225 MiB read from flash per token, decode split 0.161 s compute + 0.127 s flash I/O
per token; an infinite cache would reach 1/compute = 6.2 tok/s, the SoC's in-RAM speed.

The model (slicemoe_gguf/energy.py, profile `phone`) takes the same traffic: 225 MiB from flash, and
every routed expert's weights read from RAM once per use (48 layers x top-8 of a Q4_K_M file whose
experts hold 18.5 GB less the dense weights). It has no compute term of its own for a phone (the
CLI adds this machine's measured compute), so it is shown bare and with the published compute in
place of its RAM term.
"""

from __future__ import annotations

from slicemoe_gguf.energy import load_profile, per_token

MIB = 2**20
PUBLISHED = {"tok_s": 3.47, "hit": 0.76, "flash_bytes": 225 * MIB, "compute_s": 0.161, "io_s": 0.127}
# Qwen3-30B-A3B (config.json): 48 layers, 128 experts, top-8, hidden 2048, expert width 768
LAYERS, EXPERTS, TOP_K, HIDDEN, EXPERT_FF = 48, 128, 8, 2048, 768
FILE_BYTES = 18.5e9
DENSE_BYTES = 0.6e9   # attention, embeddings, norms, routers at Q4_K_M/Q6_K: about 3% of the file


def main() -> int:
    phone = load_profile("phone")
    expert_bytes = (FILE_BYTES - DENSE_BYTES) / (LAYERS * EXPERTS)
    uses = LAYERS * TOP_K
    weights = 3 * HIDDEN * EXPERT_FF
    stats = {"decode_tokens": 1, "flash_bytes": PUBLISHED["flash_bytes"], "ram_bytes": uses * expert_bytes,
             "msb_hits": uses, "msb_misses": 0}
    msb_slice_bytes = weights // 32 * 20   # energy.py counts MACs from a Q4_1 slice size: one per weight
    bare = per_token(stats, phone, msb_slice_bytes)
    # the published compute already includes the kernels' RAM reads: it replaces the RAM term
    flash_and_compute_ms = bare["flash_ms_per_token"] + 1000 * PUBLISHED["compute_s"]
    measured_ms = 1000 / PUBLISHED["tok_s"]
    print(f"Qwen3-30B-A3B Q4_K_M, cache 4000 MiB ({100 * PUBLISHED['hit']:.0f}% hits), "
          f"{PUBLISHED['flash_bytes'] / MIB:.0f} MiB from flash per token; profile '{phone.name}': {phone.description}\n")
    print("| per token | modelled | published | published / modelled |")
    print("|---|---|---|---|")
    print(f"| flash I/O (ms) | {bare['flash_ms_per_token']:.1f} | {1000 * PUBLISHED['io_s']:.0f} | "
          f"{1000 * PUBLISHED['io_s'] / bare['flash_ms_per_token']:.2f}x |")
    print(f"| compute (ms; the model: expert weights from RAM) | {bare['dram_ms_per_token']:.1f} | "
          f"{1000 * PUBLISHED['compute_s']:.0f} | {1000 * PUBLISHED['compute_s'] / bare['dram_ms_per_token']:.1f}x |")
    print(f"| decode (ms) | {bare['latency_ms_per_token']:.1f} ({1000 / bare['latency_ms_per_token']:.1f} tok/s) | "
          f"{measured_ms:.0f} ({PUBLISHED['tok_s']} tok/s) | {measured_ms / bare['latency_ms_per_token']:.2f}x |")
    print(f"| decode: modelled flash + published compute (ms) | {flash_and_compute_ms:.1f} "
          f"({1000 / flash_and_compute_ms:.2f} tok/s) | {measured_ms:.0f} | {measured_ms / flash_and_compute_ms:.2f}x |")
    print(f"\nEffective flash bandwidth measured: {PUBLISHED['flash_bytes'] / PUBLISHED['io_s'] / 1e9:.2f} GB/s, "
          f"{PUBLISHED['flash_bytes'] / PUBLISHED['io_s'] / phone.flash_read_bandwidth:.0%} of the profile's "
          f"sequential {phone.flash_read_bandwidth / 1e9:.1f} GB/s. Modelled energy: "
          f"{bare['energy_mj_per_token']:.1f} mJ/token (no published figure to compare).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
