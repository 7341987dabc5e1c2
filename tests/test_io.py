"""Miss I/O: every miss of a step read at once over the reader threads, with O_DIRECT where the
file system has it and buffered pread otherwise. The two paths must compute the same model."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import run_cli, run_json
from slicemoe_gguf import Model
from slicemoe_gguf._native import SliceMoEError
from slicemoe_gguf.embedded import embedded_gguf

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
PROMPT = "ROMEO.\nBut soft, what light through yonder window breaks?"
COUNTERS = ("hits", "misses", "loads", "evictions", "flash_bytes", "warmup_loads", "high_uses", "low_uses")


@pytest.fixture(scope="module")
def embedded():
    return embedded_gguf(progress=False)


def _generate(path, io_mode: str, budget: int):
    with Model(path, cache_budget=budget, io_mode=io_mode, n_threads=2) as model:
        result = model.generate(PROMPT, 24, keep_logits=True, stop_at_eog=False)
        return result, model.cache_stats()


def test_direct_and_buffered_reads_compute_the_same_model(embedded):
    budget = embedded.stat().st_size // 5
    direct, direct_stats = _generate(embedded, "direct", budget)
    buffered, buffered_stats = _generate(embedded, "buffered", budget)
    assert direct_stats["io_mode"] == "direct" and buffered_stats["io_mode"] == "buffered"
    assert direct_stats["misses"] > 0
    assert direct.tokens == buffered.tokens
    assert np.array_equal(direct.logits, buffered.logits)   # bit for bit
    for name in COUNTERS:
        assert direct_stats[name] == buffered_stats[name], name


def test_json_says_which_read_path_ran(embedded):
    auto = run_json("run", "-m", str(embedded), "-p", PROMPT, "-n", "4", "--cache-budget", "30%", "--json")
    assert auto["cache"]["io_mode"] == "direct"   # the disk under the model cache has O_DIRECT
    buffered = run_json("run", "-m", str(embedded), "-p", PROMPT, "-n", "4", "--cache-budget", "30%", "--io",
                        "buffered", "--json")
    assert buffered["cache"]["io_mode"] == "buffered"
    assert buffered["tokens"] == auto["tokens"]


def test_direct_reads_that_return_wrong_bytes_are_caught_at_load_and_replaced_by_buffered_reads(embedded, monkeypatch):
    budget = embedded.stat().st_size // 5
    buffered, _ = _generate(embedded, "buffered", budget)
    # as on Android's FUSE storage: O_DIRECT opens, and its reads hand back other bytes
    monkeypatch.setenv("SLICEMOE_FAULT_DIRECT_READS", "corrupt")
    checked, stats = _generate(embedded, "auto", budget)
    assert stats["io_mode"] == "buffered"
    assert "differs from a buffered read of the same range" in stats["io_note"]
    assert stats["misses"] > 0
    assert checked.tokens == buffered.tokens
    assert np.array_equal(checked.logits, buffered.logits)


def test_direct_reads_asked_for_on_such_a_file_system_fail_the_load_with_the_reason(embedded, monkeypatch):
    monkeypatch.setenv("SLICEMOE_FAULT_DIRECT_READS", "corrupt")
    with pytest.raises(SliceMoEError, match="direct reads of .* cannot be trusted"):
        Model(embedded, cache_budget=embedded.stat().st_size // 5, io_mode="direct")


def test_json_names_why_misses_are_read_buffered(embedded):
    env = {**os.environ, "SLICEMOE_FAULT_DIRECT_READS": "corrupt"}
    out = json.loads(run_cli("run", "-m", str(embedded), "-p", PROMPT, "-n", "4", "--cache-budget", "30%", "--json",
                             env=env).stdout)
    assert out["cache"]["io_mode"] == "buffered" and "cannot be trusted" in out["cache"]["io_note"]
    plain = run_json("run", "-m", str(embedded), "-p", PROMPT, "-n", "4", "--cache-budget", "30%", "--json")
    assert plain["cache"]["io_note"] is None and plain["tokens"] == out["tokens"]


def _decode(path, budget: int):
    with Model(path, cache_budget=budget, n_threads=2) as model:
        result = model.generate(PROMPT, 24, keep_logits=True, stop_at_eog=False)
        return result, model.cache_stats()


@pytest.mark.slow
def test_reads_overlapped_with_the_products_compute_what_reading_first_computes(embedded, monkeypatch):
    """With SLICEMOE_OVERLAP=1 a step's misses are read while the fused products compute the uses
    whose slices are resident, each product waiting for the chunks of the rows it computes (4 KiB
    chunks here, so that the embedded model's slices come in two): the logits and every counter are
    those of reading every miss before the products run (the default), with reads held up 3 ms each
    too (the products then wait)."""
    budget = embedded.stat().st_size // 5
    first, first_stats = _decode(embedded, budget)
    monkeypatch.setenv("SLICEMOE_OVERLAP", "1")
    monkeypatch.setenv("SLICEMOE_READ_CHUNK_KIB", "4")
    overlapped, overlapped_stats = _decode(embedded, budget)
    monkeypatch.setenv("SLICEMOE_FAULT_READ_DELAY_MS", "3")
    slowed, slowed_stats = _decode(embedded, budget)
    assert first_stats["misses"] > 0
    for run, stats in ((overlapped, overlapped_stats), (slowed, slowed_stats)):
        assert run.tokens == first.tokens
        assert np.array_equal(run.logits, first.logits)   # bit for bit
        for name in COUNTERS:
            assert stats[name] == first_stats[name], name
    assert slowed_stats["io_ms"] >= 3.0, "the products waited for the slowed reads"


def test_lsb_slices_read_in_the_background_compute_the_same_whatever_the_reads_take(embedded, monkeypatch):
    """lsb_background: a step never waits for an LSB slice alone (with the MSB slice resident it runs
    the use at 4 bits and reads the LSB slice for the layer's next token), and what runs depends on
    the routing alone: reads held up 3 ms each give the same logits bit for bit and the same
    counters."""
    budget = embedded.stat().st_size // 5

    def decode():
        with Model(embedded, cache_budget=budget, n_threads=2, lsb_background=True) as model:
            result = model.generate(PROMPT, 24, keep_logits=True, stop_at_eog=False)
            return result, model.cache_stats()

    quick, quick_stats = decode()
    monkeypatch.setenv("SLICEMOE_FAULT_READ_DELAY_MS", "3")
    slowed, slowed_stats = decode()
    assert quick_stats["lsb_misses"] <= quick_stats["msb_misses"] and quick_stats["high_uses"] > 0
    assert slowed.tokens == quick.tokens
    assert np.array_equal(slowed.logits, quick.logits)
    for name in COUNTERS:
        assert slowed_stats[name] == quick_stats[name], name


@pytest.mark.parametrize("policy", ["dbsc", "lru8", "hobbit", "adapmoe"])
def test_the_step_as_an_op_of_the_graph_computes_what_the_callbacks_step_computes(embedded, policy, monkeypatch):
    """With SLICEMOE_GRAPH_STEP=1 a decode step on CPU pools runs inside the graph (an op on the
    router's selection) instead of stopping the graph at every MoE layer for the eval callback: the
    same tokens, logits bit for bit and every counter, whichever policy decides."""
    budget = embedded.stat().st_size // 5

    def decode():
        with Model(embedded, cache_budget=budget, policy=policy, n_threads=2) as model:
            result = model.generate(PROMPT, 24, keep_logits=True, stop_at_eog=False)
            return result, model.cache_stats()

    callback, callback_stats = decode()
    monkeypatch.setenv("SLICEMOE_GRAPH_STEP", "1")
    in_graph, in_graph_stats = decode()
    assert callback_stats["misses"] > 0
    assert in_graph.tokens == callback.tokens
    assert np.array_equal(in_graph.logits, callback.logits)
    for name in COUNTERS + ("high_uses", "low_uses", "dropped_uses"):
        assert in_graph_stats[name] == callback_stats[name], name


@pytest.mark.parametrize("after", [1, 4, 7, 13])
@pytest.mark.parametrize("reads", ["first", "in-graph step", "LSB in the background",
                                   pytest.param("overlapped", marks=pytest.mark.slow),
                                   pytest.param("overlapped and slow", marks=pytest.mark.slow)])
def test_a_read_failing_inside_a_batch_leaves_no_slot_half_filled(embedded, after, reads, monkeypatch):
    """Reads fail from the `after`-th on, in the middle of a step's batch (read first, or while the
    products wait for them, or LSB slices read for a later token): the decode stops with an I/O
    error, the slots whose reads failed are empty (not resident with stale bytes), so the next
    request computes exactly what a fresh model does."""
    if reads == "in-graph step":
        monkeypatch.setenv("SLICEMOE_GRAPH_STEP", "1")
    elif reads.startswith("overlapped"):
        monkeypatch.setenv("SLICEMOE_OVERLAP", "1")
        monkeypatch.setenv("SLICEMOE_READ_CHUNK_KIB", "4")   # a slice in two chunks: one may fail alone
    if reads == "overlapped and slow":
        monkeypatch.setenv("SLICEMOE_FAULT_READ_DELAY_MS", "3")
    settings = {"lsb_background": reads == "LSB in the background"}
    budget = embedded.stat().st_size // 5
    with Model(embedded, cache_budget=budget, n_threads=2, **settings) as fresh:
        reference = fresh.generate(PROMPT, 16, stop_at_eog=False).tokens
    with Model(embedded, cache_budget=budget, n_threads=2, **settings) as model:
        model.generate("JULIET.\nO Romeo, Romeo", 8, stop_at_eog=False)   # a full cache, another request
        model.fail_reads_after(after)
        with pytest.raises(SliceMoEError, match="failed: Input/output error") as excinfo:
            model.generate(PROMPT, 16, stop_at_eog=False)
        assert excinfo.value.status == 2   # SLICEMOE_ERR_IO
        model.fail_reads_after(-1)
        assert model.generate(PROMPT, 16, stop_at_eog=False).tokens == reference


def test_a_sliced_file_puts_every_tensor_on_a_4_kib_boundary(embedded):
    import gguf

    reader = gguf.GGUFReader(embedded)
    assert reader.alignment == 4096
    assert all(t.data_offset % 4096 == 0 for t in reader.tensors)


def test_a_read_timeline_records_every_read_the_engine_counts(tmp_path):
    """SLICEMOE_READ_TIMELINE: one row per slice read, the bytes adding up to the engine's own count,
    each read submitted before it starts and ending after; scripts/read_timeline.py summarises it."""
    timeline = tmp_path / "reads.tsv"
    proc = run_cli("run", "-m", str(embedded_gguf(progress=False)), "-p", PROMPT, "-n", "8", "--json", "--ignore-eos",
                   "--cache-budget", "25%", env={**os.environ, "SLICEMOE_READ_TIMELINE": str(timeline)})
    cache = json.loads(proc.stdout)["cache"]
    with open(timeline, newline="") as f:
        rows = [{k: int(v) for k, v in row.items()} for row in csv.DictReader(f, delimiter="\t")]
    assert cache["flash_bytes"] > 0
    assert sum(row["bytes"] for row in rows) == cache["flash_bytes"] + cache["load_flash_bytes"]
    assert all(row["submitted_ns"] <= row["started_ns"] <= row["ended_ns"] for row in rows)
    summary = subprocess.run([sys.executable, str(SCRIPTS / "read_timeline.py"), str(timeline)], capture_output=True,
                             text=True, check=True).stdout
    assert "steps" in summary and "device busy" in summary
