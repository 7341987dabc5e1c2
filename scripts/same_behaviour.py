"""Whether two builds behave the same: the tokens and every cache counter of live runs and replays of
the embedded model, written by one build and compared with another's. A refactoring of the engine
should change nothing here.

    PYTHONPATH=/path/to/old/site-packages python scripts/same_behaviour.py old.json
    python scripts/same_behaviour.py new.json --compare old.json

Live runs: every live policy at 30%, 50% and 100% of the slice bytes, with PCW, with and without the
miss-rate controller, and dbsc and lru8 with look-ahead prefetch (each: two prompts, 24 tokens,
the counters per layer). Replays: each live run's own trace under every policy (Belady too), with
and without warm-up. Timings (io_ms) are left out: they are not behaviour.
"""

from __future__ import annotations

import argparse
import json
import sys

PROMPTS = ["ROMEO:\nWhat light", "KING HENRY:\nOnce more unto"]
POLICY_SETTINGS = {"cache_prior": {"prior_lambda": 0.5}, "adapmoe": {"gating_t": 0.04}}


def _without_timings(stats: dict) -> dict:
    stats = {k: v for k, v in stats.items() if k != "io_ms"}
    stats["layers"] = {k: v for k, v in stats["layers"].items() if k != "io_ms"}
    return stats


def record() -> dict:
    from slicemoe_gguf import Model
    from slicemoe_gguf import trace as traces
    from slicemoe_gguf.cache_params import policies
    from slicemoe_gguf.embedded import embedded_gguf

    path = embedded_gguf(progress=False)
    with Model(path, record_trace=True) as model:
        for prompt in PROMPTS:
            model.generate(prompt, 24)
        total = traces.total_slice_bytes(model.routing_trace())
    live = list(policies(live_only=True))
    out: dict[str, object] = {}
    for policy in live:
        for fraction in (0.3, 0.5, 1.0):
            for controller in ({}, {"max_miss_rate": 0.05}):
                key = f"live {policy} {fraction} {controller}"
                settings = {**POLICY_SETTINGS.get(policy, {}), **controller}
                try:
                    with Model(path, cache_budget=int(total * fraction), policy=policy, warmup="pcw",
                               record_trace=True, **settings) as model:
                        tokens = [model.generate(prompt, 24).tokens for prompt in PROMPTS]
                        out[key] = {"tokens": tokens, "stats": _without_timings(model.cache_stats())}
                        trace = model.routing_trace()
                except Exception as exc:   # a refusal is behaviour too
                    out[key] = repr(exc)
                    continue
                for replayed in list(policies()):
                    for warmup in ("none", "pcw"):
                        name = f"replay[{key}] {replayed} {warmup}"
                        try:
                            stats = traces.replay(trace, budget=int(total * fraction), policy=replayed, warmup=warmup,
                                                  **{**POLICY_SETTINGS.get(replayed, {}), **controller})
                            out[name] = _without_timings(stats)
                        except Exception as exc:
                            out[name] = repr(exc)
    for policy in ("dbsc", "lru8"):
        with Model(path, cache_budget=int(total * 0.5), policy=policy, prefetch=True) as model:
            tokens = [model.generate(prompt, 24).tokens for prompt in PROMPTS]
            out[f"prefetch {policy}"] = {"tokens": tokens, "stats": _without_timings(model.cache_stats())}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="where this build's record goes (JSON)")
    parser.add_argument("--compare", metavar="OTHER.json", help="another build's record to compare with")
    args = parser.parse_args()
    mine = record()
    with open(args.out, "w") as f:
        json.dump(mine, f, sort_keys=True)
    print(f"{len(mine)} runs and replays recorded in {args.out}")
    if not args.compare:
        return 0
    with open(args.compare) as f:
        other = json.load(f)
    mine = json.loads(json.dumps(mine))   # the same types as the other's, read back from JSON
    differ = sorted(key for key in set(mine) | set(other) if mine.get(key) != other.get(key))
    print(f"{len(differ)} of {len(set(mine) | set(other))} differ from {args.compare}")
    for key in differ[:20]:
        print(f"  {key}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
