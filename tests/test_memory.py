"""The resident memory a run implies is stated before it runs, and --cache-budget auto sizes the
cache from the memory available now."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli, run_json

from slicemoe_gguf import SliceMoEError
from slicemoe_gguf.memory import auto_budget, plan, routed_expert_bytes
from slicemoe_gguf.model_info import describe

PROMPT = "Once upon a time there was a small village"


@pytest.fixture(scope="module")
def sliced_olmoe(sliced_gguf):
    return sliced_gguf("olmoe")


def _slice_bytes(path) -> int:
    return routed_expert_bytes(describe(path))


def test_the_stated_memory_is_what_llama_cpp_allocates(sliced_olmoe):
    """inspect states the figures before loading (llama.cpp's no_alloc sizing); run reports them
    from the live context: the same numbers."""
    budget = _slice_bytes(sliced_olmoe) // 2
    stated = run_json("inspect", str(sliced_olmoe), "--json", "--cache-budget", f"{budget}B", "-c", "1024")["memory"]
    ran = run_json("run", "-m", str(sliced_olmoe), "-p", PROMPT, "-n", "3", "--json", "-c", "1024",
                   "--cache-budget", f"{budget}B")
    live = ran["memory"]
    for key in ("dense_bytes", "kv_bytes"):
        assert stated[key] == live[key] > 0, key
    # the sizing pass and the real allocation may pad a buffer differently (measured: 32 bytes)
    assert stated["compute_bytes"] == pytest.approx(live["compute_bytes"], rel=1e-3)
    assert live["expert_bytes"] == ran["cache"]["pool_bytes"] <= stated["expert_bytes"] == budget
    assert live["total_bytes"] == live["dense_bytes"] + live["expert_bytes"] + live["kv_bytes"] + live["compute_bytes"]
    # measured while the model is loaded: the pools and KV cache are anonymous memory of the process
    assert 0 < live["rss_anon_bytes"] + live["rss_file_bytes"] <= live["rss_bytes"]   # VmRSS adds shared memory
    assert live["rss_bytes"] > live["rss_before_load_bytes"]


def test_the_kv_cache_grows_with_the_context(sliced_olmoe):
    small = plan(sliced_olmoe, n_ctx=512, n_batch=512, cache_budget=0)
    large = plan(sliced_olmoe, n_ctx=2048, n_batch=512, cache_budget=0)
    assert large.kv_bytes == 4 * small.kv_bytes
    assert small.expert_bytes == _slice_bytes(sliced_olmoe)   # no cache: every expert may be resident


def test_auto_budget_is_what_is_left_after_the_dense_part_and_the_margin(sliced_olmoe):
    fixed = plan(sliced_olmoe, n_ctx=512, n_batch=64, cache_budget=1)   # sized as a cached run
    fixed_bytes = fixed.total_bytes - fixed.expert_bytes
    margin, room = 100 * 2**20, 12_345
    budget, how = auto_budget(sliced_olmoe, n_ctx=512, n_batch=64, margin=margin,
                              available=fixed_bytes + margin + room)
    assert budget == room and "margin" in how
    everything, _ = auto_budget(sliced_olmoe, n_ctx=512, n_batch=64, margin=margin, available=2**40)
    assert everything == _slice_bytes(sliced_olmoe)   # never more than all slices
    with pytest.raises(SliceMoEError, match="does not fit"):
        auto_budget(sliced_olmoe, n_ctx=512, n_batch=64, margin=margin, available=fixed_bytes + margin)


def test_cache_budget_auto_runs_on_this_machine(sliced_olmoe):
    proc = run_cli("run", "-m", str(sliced_olmoe), "-p", PROMPT, "-n", "3", "--json",
                   "--cache-budget", "auto", "--ram-margin", "1GiB")
    assert "cache budget auto:" in proc.stderr
    assert "MemAvailable" in proc.stderr or "cgroup" in proc.stderr
    result = json.loads(proc.stdout)
    assert 0 < result["cache"]["pool_bytes"] <= result["cache"]["budget_bytes"] <= _slice_bytes(sliced_olmoe)


def test_cache_budget_auto_refuses_with_the_numbers_when_nothing_fits(sliced_olmoe):
    proc = run_cli("run", "-m", str(sliced_olmoe), "-p", PROMPT, "-n", "3",
                   "--cache-budget", "auto", "--ram-margin", "100TB", check=False)
    assert proc.returncode == 1
    assert "does not fit" in proc.stderr and "KV cache" in proc.stderr and "kept free" in proc.stderr
    assert "Traceback" not in proc.stderr
