"""The slice cache: decode from budgeted MSB/LSB pools, misses read from the GGUF.

What users rely on: whatever the budget, a fixed precision gives bit-identical logits; pools
never exceed the budget; warm-up saves misses; bad budgets and failing reads are clean errors.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import convert, run_cli, run_json

from slicemoe_gguf import Model, SliceMoEError
from slicemoe_gguf.model_info import describe

PROMPT = "Once upon a time there was a small village by the sea"
N_DECODE = 32


@pytest.fixture(scope="module")
def sliced(sliced_gguf):
    return sliced_gguf


def budgets(path, precision: str) -> dict[str, int]:
    info = describe(path)
    layer = info["layers"][0]
    per_use = layer["msb_bytes_per_expert"] + (layer["lsb_bytes_per_expert"] if precision == "high" else 0)
    total = info["expert_msb_bytes"] + info["expert_lsb_bytes"]
    return {"100%": total, "50%": total // 2, "minimum": len(info["layers"]) * info["top_k"] * per_use}


def decode(path, precision: str, budget: int, **kw):
    with Model(path, precision=precision, cache_budget=budget, **kw) as model:
        result = model.generate(PROMPT, N_DECODE, keep_logits=True, stop_at_eog=False)
        return result, model.cache_stats()


@pytest.mark.parametrize("precision", ["high", "low"])
@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe", "deepseek_v2"])
@pytest.mark.slow
def test_fixed_precision_is_bit_identical_at_every_budget(arch, precision, sliced):
    path = sliced(arch)
    resident, _ = decode(path, precision, 0)       # no cache: every expert mapped from the file
    misses = {}
    for name, budget in budgets(path, precision).items():
        result, stats = decode(path, precision, budget)
        assert result.tokens == resident.tokens, name
        np.testing.assert_array_equal(result.logits, resident.logits, err_msg=name)
        assert 0 < stats["pool_bytes"] <= budget
        misses[name] = stats["misses"]
    # the budgets are really different caches
    assert misses["minimum"] > misses["100%"]


@pytest.mark.slow
def test_pools_never_exceed_the_budget(sliced):
    path = sliced("qwen2_moe")
    total = budgets(path, "auto")["100%"]
    for fraction in (1.0, 0.73, 0.5, 0.31, 0.2):
        budget = int(total * fraction)
        with Model(path, cache_budget=budget) as model:
            stats = model.cache_stats()
            assert stats["budget_bytes"] == budget
            assert 0 < stats["pool_bytes"] <= budget
            slots = stats["layers"]
            info = describe(path)["layers"][0]
            # shared slots (dbsc's adaptive split below 100%) hold an MSB or an LSB slice each
            allocated = sum(m * info["msb_bytes_per_expert"] + (0 if shared else l * info["lsb_bytes_per_expert"])
                            for m, l, shared in zip(slots["msb_slots"], slots["lsb_slots"], slots["shared_slots"]))
            assert allocated == stats["pool_bytes"]
            assert all(slots["shared_slots"]) == (fraction < 1.0)


def test_auto_precision_mixes_8bit_and_4bit_uses_and_misses_read_the_file(sliced):
    path = sliced("qwen2_moe")
    result, stats = decode(path, "auto", budgets(path, "auto")["50%"], high_threshold=0.3)
    assert stats["high_uses"] > 0 and stats["low_uses"] > 0
    assert stats["high_uses"] + stats["low_uses"] == stats["hits"] + stats["misses"] - stats["lsb_hits"] - stats["lsb_misses"]
    info = describe(path)["layers"][0]
    # every miss is a read of one slice from the file (warm-up loads come on top)
    assert stats["flash_bytes"] >= stats["msb_misses"] * info["msb_bytes_per_expert"] + stats["lsb_misses"] * info["lsb_bytes_per_expert"]
    assert stats["flash_bytes"] == sum(stats["layers"]["flash_bytes"])
    assert stats["decode_tokens"] == N_DECODE - 1


def test_budget_below_the_minimum_is_refused_with_the_minimum(sliced):
    path = sliced("olmoe")
    minimum = budgets(path, "auto")["minimum"]
    with pytest.raises(SliceMoEError, match="below the minimum that can run") as excinfo:
        Model(path, cache_budget=minimum - 1)
    assert "KiB" in str(excinfo.value)
    proc = run_cli("run", "-m", str(path), "-p", "hi", "--cache-budget", "1KB", check=False)
    assert proc.returncode == 1 and "below the minimum" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_cache_on_a_stock_model_is_refused(stock_gguf):
    with pytest.raises(SliceMoEError, match="not a sliced"):
        Model(stock_gguf("qwen2_moe"), cache_budget=10**6)


def test_truncated_sliced_file_is_a_clear_error(sliced, tmp_path):
    data = sliced("qwen2_moe").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * 0.9)])
    proc = run_cli("run", "-m", str(path), "-p", "hi", "--cache-budget", "100KB", check=False)
    # the validator finds the tensor data that lies past the end, before llama.cpp reads anything
    assert proc.returncode == 1 and "lies outside the file" in proc.stderr and "truncated or corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr
    # a percentage budget reads the file's tensor index first, and says what is wrong with it
    proc = run_cli("run", "-m", str(path), "-p", "hi", "--cache-budget", "50%", check=False)
    assert proc.returncode == 1 and "truncated or corrupt" in proc.stderr and "Traceback" not in proc.stderr


def test_a_failing_miss_read_is_an_error_and_the_context_stays_usable(sliced):
    path = sliced("qwen2_moe")
    with Model(path, precision="high", cache_budget=budgets(path, "high")["minimum"], warmup="none") as model:
        reference = model.generate(PROMPT, 8, stop_at_eog=False).tokens
        model.reset()
        model.eval(model.tokenize(PROMPT))
        model.fail_reads_after(0)
        with pytest.raises(SliceMoEError, match="failed: Input/output error") as excinfo:
            for _ in range(8):                      # the minimum budget misses within a few tokens
                model.eval([reference[0]])
        assert excinfo.value.status == 2            # SLICEMOE_ERR_IO
        model.fail_reads_after(-1)
        assert model.generate(PROMPT, 8, stop_at_eog=False).tokens == reference


def test_pcw_warm_up_saves_misses_on_a_repeating_prompt(sliced):
    path = sliced("qwen2_moe")
    prompt = " ".join(["the fish and the sea"] * 12)
    budget = budgets(path, "auto")["50%"]
    first16 = {}
    for warmup in ("none", "pcw"):
        with Model(path, cache_budget=budget, warmup=warmup) as model:
            model.generate(prompt, 17, stop_at_eog=False)
            first16[warmup] = model.cache_stats()
    assert first16["pcw"]["warmup_loads"] > 0 and first16["none"]["warmup_loads"] == 0
    assert first16["pcw"]["misses"] < first16["none"]["misses"]


def test_pcw_warms_the_pools_during_the_prompt_and_the_first_token_reads_no_warm_up(sliced):
    """PCW is prefill-time: each layer is warmed as soon as its prompt products have read its experts'
    pages (copied from them), so the prompt's eval has done every warm-up load and the first decode
    token does none; the copied slices are the file's (at fixed 8-bit precision a decode with warm-up
    computes exactly what one without it does)."""
    path = sliced("qwen2_moe")
    budget = budgets(path, "auto")["50%"]
    with Model(path, cache_budget=budget, warmup="pcw") as model:
        model.eval(model.tokenize(PROMPT))
        prompt_stats = model.cache_stats()
        token = int(np.argmax(model.logits()))
        model.reset_cache_stats()
        model.eval([token])
        first_token = model.cache_stats()
    assert prompt_stats["warmup_loads"] > 0 and prompt_stats["flash_bytes"] > 0
    # its time is the prompt's, reported apart: no warmed layer has blocked time (io_ms) of its own.
    # (llama.cpp runs the last layer for the output token alone, which the engine serves from the
    # pools as a decode step: that layer is not warmed and may read.)
    assert prompt_stats["warmup_io_ms"] > 0
    assert prompt_stats["layers"]["io_ms"][:-1] == [0.0] * (len(prompt_stats["layers"]["io_ms"]) - 1)
    assert first_token["warmup_loads"] == 0
    warm, _ = decode(path, "high", budgets(path, "high")["50%"], warmup="pcw")
    cold, _ = decode(path, "high", budgets(path, "high")["50%"], warmup="none")
    np.testing.assert_array_equal(warm.logits, cold.logits)


def test_max_miss_rate_raises_the_threshold_when_misses_are_too_many(sliced):
    path = sliced("olmoe")
    budget = budgets(path, "auto")["minimum"] * 2
    _, fixed = decode(path, "auto", budget, high_threshold=0.0)
    _, adapted = decode(path, "auto", budget, high_threshold=0.0, max_miss_rate=0.01)
    assert fixed["high_threshold"] == 0.0
    assert adapted["high_threshold"] > 0.0
    assert adapted["high_uses"] < fixed["high_uses"]


def test_run_json_reports_the_cache(sliced):
    result = run_json("run", "-m", str(sliced("olmoe")), "-p", PROMPT, "-n", "8", "--json", "--ignore-eos",
                      "--cache-budget", "50%")
    cache = result["cache"]
    for key in ("budget_bytes", "pool_bytes", "hits", "misses", "flash_bytes", "io_ms", "layers"):
        assert key in cache
    assert cache["pool_bytes"] <= cache["budget_bytes"]
    assert len(cache["layers"]["msb_hits"]) == 3
    assert sum(cache["layers"]["flash_bytes"]) == cache["flash_bytes"]
    assert sum(cache["layers"]["io_ms"]) == pytest.approx(cache["io_ms"])


def test_a_budget_that_holds_every_slice_reads_them_at_load_and_serving_reads_nothing(sliced):
    """The pools are filled when the model loads; that read is reported apart (load_flash_bytes,
    load_io_ms), so the per-token figures a run prints are those of serving: here, no read at all."""
    path = sliced("olmoe")
    everything = budgets(path, "high")["100%"]
    result = run_json("run", "-m", str(path), "-p", PROMPT, "-n", "8", "--json", "--ignore-eos",
                      "--cache-budget", str(everything), "--policy", "lru8")
    cache = result["cache"]
    assert cache["load_flash_bytes"] == everything and cache["load_io_ms"] > 0
    assert cache["misses"] == 0 and cache["flash_bytes"] == 0 and cache["loads"] == 0
    assert sum(cache["layers"]["flash_bytes"]) == 0 and cache["io_ms"] == 0
    assert cache["hits"] > 0


def _log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_cache_prior_lambda_zero_is_the_models_routing_and_positive_lambda_saves_misses(sliced):
    path = sliced("qwen2_moe")
    budget = budgets(path, "auto")["100%"] // 3
    runs = {}
    for policy, lam in (("dbsc", 0.0), ("cache_prior", 0.0), ("cache_prior", 1.0)):
        runs[(policy, lam)] = decode(path, "auto", budget, policy=policy, prior_lambda=lam, warmup="none")
    base, base_stats = runs[("dbsc", 0.0)]
    zero, _ = runs[("cache_prior", 0.0)]
    np.testing.assert_array_equal(zero.logits, base.logits)
    biased, biased_stats = runs[("cache_prior", 1.0)]
    assert biased_stats["misses"] < base_stats["misses"]
    # it changes outputs: the KL to the model's own next-token distributions is what it costs
    kl = (np.exp(_log_softmax(base.logits)) * (_log_softmax(base.logits) - _log_softmax(biased.logits))).sum(-1)
    assert kl.mean() > 0


def test_cache_prior_replays_from_the_recorded_router_logits(sliced, tmp_path):
    from slicemoe_gguf import trace as traces

    path = sliced("qwen2_moe")
    budget = budgets(path, "auto")["100%"] // 3
    with Model(path, cache_budget=budget, policy="cache_prior", prior_lambda=1.0, warmup="none",
               record_trace=True) as model:
        model.generate(PROMPT, 24, stop_at_eog=False)
        live = model.cache_stats()
        trace = model.routing_trace()
    assert trace.logits is not None and not np.isnan(trace.logits[trace.phase == 1]).any()
    trace.write(tmp_path / "t.jsonl")
    trace = traces.read(tmp_path / "t.jsonl")            # the logits survive the file
    same = traces.replay(trace, policy="cache_prior", budget=budget, prior_lambda=1.0, warmup="none")
    for name in ("msb_hits", "msb_misses", "lsb_hits", "lsb_misses", "loads", "evictions", "flash_bytes"):
        assert same[name] == live[name], name
    # counterfactual: re-picked from the logits, a strong prior finds more of its experts cached
    # than the model's own routing (lambda 0) does
    own = traces.replay(trace, policy="cache_prior", budget=budget, prior_lambda=0.0, warmup="none")
    stronger = traces.replay(trace, policy="cache_prior", budget=budget, prior_lambda=50.0, warmup="none")
    assert stronger["msb_misses"] < own["msb_misses"]


@pytest.mark.slow
def test_resident_memory_is_the_pools_not_the_mapped_experts(tmp_path):
    """llama.cpp maps and prefetches the whole file; with a cache the engine hands the expert pages
    back, so the process's file-backed memory grows by far less than the slice bytes, and the whole
    growth stays within the memory slicemoe states for the run (dense weights, pools, KV cache and
    compute buffers)."""
    import subprocess
    import sys

    from helpers import _load_script

    make_checkpoint = _load_script("bench_convert_rss").make_checkpoint
    hf = make_checkpoint(tmp_path / "hf", layers=2, hidden=512, n_expert=64, n_ff=512, n_head=8)
    out = tmp_path / "m.gguf"
    assert convert(hf, out).returncode == 0
    slices = describe(out)["expert_msb_bytes"] + describe(out)["expert_lsb_bytes"]
    code = f"""
import re
from slicemoe_gguf import Model
from slicemoe_gguf.runtime import library_info
library_info()   # load the library and its backends (Vulkan drivers are large) before measuring
def rss():
    status = open('/proc/self/status').read()
    return {{k: int(v) * 1024 for k, v in re.findall(r'(RssAnon|RssFile):\\s+(\\d+)', status)}}
before = rss()
from slicemoe_gguf.memory import plan_of_running
with Model({str(out)!r}, cache_budget={slices // 10}, n_threads=2) as model:
    model.generate('the fish and the sea', 8, stop_at_eog=False)
    after = rss()
    pool = model.cache_stats()['pool_bytes']
    stated = plan_of_running(model).total_bytes
print(after['RssFile'] - before['RssFile'], after['RssAnon'] - before['RssAnon'], pool, stated)
"""
    file_delta, anon_delta, pool, stated = map(int, subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split())
    assert slices > 100 * 2**20
    assert file_delta < 0.2 * slices                 # the mapped experts were handed back
    assert pool <= slices // 10 < anon_delta + 2**20  # the pools are really allocated ...
    assert anon_delta < pool + 96 * 2**20            # ... and little else (KV cache, compute buffers)
    # the stated figure is not an underestimate (the allocator's own pages aside)
    assert file_delta + anon_delta < stated + 16 * 2**20


def test_a_prompt_reads_the_pools_when_they_hold_every_slice(tmp_path):
    """With every slice cached (filled at load), a prompt computes from the pools: none of the
    file's expert pages is mapped in, so none has to be handed back while the first tokens decode.
    Under a smaller budget the prompt streams every expert through the mapping, which the same
    measure sees."""
    import subprocess
    import sys

    from slicemoe_gguf.embedded import embedded_gguf

    path = embedded_gguf(progress=False)
    slices = describe(path)["expert_msb_bytes"] + describe(path)["expert_lsb_bytes"]
    code = f"""
import re
from slicemoe_gguf import Model
def rss_file():
    return int(re.search(r'RssFile:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024
for budget in ({slices // 2}, {slices}):   # the first run also pages in the library's code
    with Model({str(path)!r}, cache_budget=budget, precision='high', policy='lru8', n_threads=2) as model:
        tokens = model.tokenize('ROMEO: But soft, what light through yonder window breaks? ' * 4)
        before = rss_file()
        model.eval(tokens)
        print(rss_file() - before)
"""
    half, every = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                          cwd=tmp_path).stdout.split())
    assert half > slices // 2        # the control: a prompt through the mapping faults the experts in
    assert every < slices // 10      # from the pools: the file's expert pages stay out


@pytest.mark.parametrize("policy,precision,fraction,most", [("lru8", "high", 0.9, 0.5), ("lru4", "low", 0.3, 0.6),
                                                              ("dbsc", "auto", 0.5, 0.85)])
def test_a_later_prompt_reads_the_slices_the_pools_hold_from_the_pools(tmp_path, policy, precision, fraction, most):
    """Pools that hold some of a prompt's slices serve those, and only the rest streams through the
    file's mapping: after a first request has filled the pools, the same prompt again maps in a
    fraction of the expert pages the first one did (which found the pools empty) and computes its
    logits bit for bit; at a fixed precision those are a model's without a cache."""
    import subprocess
    import sys

    from slicemoe_gguf.embedded import embedded_gguf

    path = embedded_gguf(progress=False)
    slices = describe(path)["expert_msb_bytes"] + describe(path)["expert_lsb_bytes"]
    code = f"""
import re, time
import numpy as np
from slicemoe_gguf import Model
def rss_file():
    return int(re.search(r'RssFile:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024
prompt = 'ROMEO: But soft, what light through yonder window breaks? ' * 4
with Model({str(path)!r}, n_threads=2, precision={'low' if precision == 'low' else 'high'!r}) as plain:
    plain.eval(plain.tokenize(prompt))
    fixed = plain.logits().copy()
with Model({str(path)!r}, cache_budget={int(slices * fraction)}, policy={policy!r}, precision={precision!r},
           n_threads=2) as model:
    tokens = model.tokenize(prompt)
    before = rss_file()
    model.eval(tokens)
    first = rss_file() - before
    expected = model.logits().copy()
    for _ in range(24):
        model.eval([int(np.argmax(model.logits()))])
    model.reset()
    time.sleep(0.2)   # the first request's mapped pages are handed back on a background thread
    before = rss_file()
    model.eval(tokens)
    print(first, rss_file() - before, int(np.array_equal(model.logits(), expected)),
          int(np.array_equal(expected, fixed)))
"""
    # a context without a cache offloads a large batch's products to a Vulkan device where one is
    # listed (CI lists lavapipe), one with a cache never does: the comparison is of the CPU's arithmetic
    env = {name: value for name, value in os.environ.items() if name != "GGML_VK_VISIBLE_DEVICES"}
    first, second, same, as_fixed = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, env=env,
                                                            text=True, check=True, cwd=tmp_path).stdout.split())
    assert first > (slices // 4 if precision == "low" else slices // 2)   # the first streams its experts
    assert second < most * first
    assert same
    # auto: llama.cpp runs a prompt's last layer on its output row alone, which is served as a decode
    # step (some uses at 4 bits), so the prompt is compared with its own first run only
    assert as_fixed or precision == "auto"


def _kl(reference: np.ndarray, other: np.ndarray) -> float:
    p, q = _log_softmax(reference), _log_softmax(other)
    return float((np.exp(p) * (p - q)).sum())


def test_a_low_precision_prompt_runs_its_last_row_at_8_bits_and_the_cache_decides_as_before():
    """low_precision_prompt: a prompt's rows run on the MSB slices alone but for its last, whose row
    the next token comes from, which runs at 8 bits: its logits differ from an 8-bit prompt's by a
    small fraction of what the 4-bit model's do. The cache decides as after an 8-bit prompt (PCW's
    warm-up follows the prompt's routing, not its arithmetic): under the same routes every counter
    of the decode is the same. (What it saves, half the bytes of a first prompt, shows at full size:
    scripts/bench_side_by_side.py's prefill MB.)"""
    from slicemoe_gguf import trace as traces
    from slicemoe_gguf.embedded import embedded_gguf

    path = embedded_gguf(progress=False)
    half = (describe(path)["expert_msb_bytes"] + describe(path)["expert_lsb_bytes"]) // 2
    prompts = ["ROMEO: But soft, what light through yonder window breaks? " * 4,
               "HAMLET. To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
               "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak."]
    first = {}
    for name, settings in (("8-bit", {}), ("4-bit prompt", {"low_precision_prompt": True}),
                           ("4-bit model", {"precision": "low"})):
        with Model(path, cache_budget=half, n_threads=2, **settings) as model:
            first[name] = []
            for prompt in prompts:
                model.reset()
                model.eval(model.tokenize(prompt))
                first[name].append(model.logits().copy())
    low_prompt = [_kl(a, b) for a, b in zip(first["8-bit"], first["4-bit prompt"])]
    four_bit = [_kl(a, b) for a, b in zip(first["8-bit"], first["4-bit model"])]
    assert all(kl > 0 for kl in low_prompt)   # the prompt ran at another precision
    assert sum(low_prompt) < 0.4 * sum(four_bit)   # measured 0.07: the last row at 8 bits

    with Model(path, n_threads=2, record_trace=True) as tracer:
        tokens = tracer.tokenize(prompts[0])
        tracer.eval(tokens)
        continuation = []
        for _ in range(16):
            continuation.append(int(np.argmax(tracer.logits())))
            tracer.eval(continuation[-1:])
        route = traces.request_route(tracer.routing_trace())
    stats = {}
    for low in (False, True):
        with Model(path, cache_budget=half, n_threads=2, forced_routes=True, low_precision_prompt=low) as model:
            model.force_routes(route.experts, route.weights)
            model.eval(tokens)
            for token in continuation:
                model.eval([token])
            stats[low] = model.cache_stats()
    for name in ("msb_hits", "msb_misses", "lsb_hits", "lsb_misses", "loads", "evictions", "warmup_loads",
                 "high_uses", "low_uses", "flash_bytes"):
        assert stats[True][name] == stats[False][name], name
    assert stats[True]["warmup_loads"] > 0


def test_lookahead_prefetch_changes_no_result_and_accounts_its_bytes(sliced):
    path = sliced("qwen2_moe")
    budget = budgets(path, "high")["50%"]
    plain, plain_stats = decode(path, "high", budget, warmup="none")
    ahead, stats = decode(path, "high", budget, warmup="none", prefetch=True)
    np.testing.assert_array_equal(ahead.logits, plain.logits)
    assert plain_stats["prefetch_loads"] == 0
    assert stats["prefetch_loads"] > 0
    assert 0 < stats["pool_bytes"] <= budget
    slice_bytes = describe(path)["layers"][0]["msb_bytes_per_expert"]
    # every load is a miss, or a prefetch; a prefetched slice is used, wasted, or still waiting
    assert stats["loads"] == stats["misses"] + stats["prefetch_loads"]
    assert stats["prefetch_useful_bytes"] + stats["prefetch_wasted_bytes"] <= stats["prefetch_loads"] * slice_bytes
