"""The embedded trained model and `slicemoe demo`, the README's main command."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from helpers import _load_script, run_cli

from slicemoe_gguf import Model
from slicemoe_gguf.embedded import EMBEDDED_CHECKPOINT

benchlib = _load_script("benchlib")   # the benchmarks' held-out windows and log-softmax


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """A private cache directory, so the test converts the model itself."""
    return {**os.environ, "SLICEMOE_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}


@pytest.fixture(scope="module")
def model_path(cache_env):
    proc = run_cli("demo", "--model-path", env=cache_env)
    return proc.stdout.strip()


def test_model_path_converts_once_and_prints_the_cached_gguf(model_path, cache_env):
    assert model_path.startswith(cache_env["SLICEMOE_CACHE_DIR"]) and model_path.endswith(".gguf")
    before = os.stat(model_path).st_mtime_ns
    assert run_cli("demo", "--model-path", env=cache_env).stdout.strip() == model_path
    assert os.stat(model_path).st_mtime_ns == before


def test_the_embedded_model_is_trained_and_the_engine_keeps_its_perplexity(model_path):
    """On held-out text the engine's 8-bit perplexity is transformers' fp32 perplexity within 3%,
    and far below the vocabulary size (where an untrained model sits)."""
    import torch
    import transformers

    windows = benchlib.heldout_windows(6, 97)
    reference = transformers.AutoModelForCausalLM.from_pretrained(EMBEDDED_CHECKPOINT, dtype=torch.float32).eval()
    nll_ref, nll, n = 0.0, 0.0, 0
    with Model(model_path, precision="high", n_threads=2) as model:
        for window in windows:
            targets = np.asarray(window[1:])
            with torch.no_grad():
                ref = benchlib.log_softmax(reference(input_ids=torch.tensor([window[:-1]])).logits[0].numpy())
            model.reset()
            rows = []
            for token in window[:-1]:
                model.eval([token])
                rows.append(model.logits())
            got = benchlib.log_softmax(np.stack(rows))
            nll_ref -= ref[np.arange(len(targets)), targets].sum()
            nll -= got[np.arange(len(targets)), targets].sum()
            n += len(targets)
    ppl_ref, ppl = math.exp(nll_ref / n), math.exp(nll / n)
    assert ppl_ref < 200   # the vocabulary has 2048 tokens: uniform guessing is perplexity 2048
    assert ppl == pytest.approx(ppl_ref, rel=0.03)
    provenance = json.loads((EMBEDDED_CHECKPOINT / "provenance.json").read_text())
    assert provenance["heldout_perplexity_fp32"] < 200


def test_demo_prints_text_and_the_side_by_side_table(model_path, cache_env):
    proc = run_cli("demo", "-n", "12", "--cache-budget", "25%", env=cache_env)
    out = proc.stdout
    assert "| SliceMoE: dbsc + pcw |" in out and "| lru8 (whole 8-bit experts) |" in out
    assert "phone mJ/token" in out and "laptop mJ/token" in out and "ms/token (this machine)" in out
    assert "less flash traffic" in out
    assert "the median of 3 alternating runs per policy" in out
    assert "Timings are steady" in out or "The machine was busy" in out


@pytest.mark.parametrize("runs, load, busy", [
    ([2.0, 2.1, 1.95], 0.1, False),
    ([2.0, 6.0, 2.1], 0.1, True),      # one run three times slower: another job took the cores
    ([2.0, 2.1, 1.95], 64.0, True),    # a loaded machine before the runs
])
def test_the_demo_says_when_its_timings_cannot_be_trusted(runs, load, busy):
    from slicemoe_gguf.cli_demo import _timing_verdict

    verdict = _timing_verdict({"dbsc": runs, "lru8": [3.0, 3.05, 3.1]}, load)
    assert verdict.startswith("The machine was busy" if busy else "Timings are steady")
    assert "do not trust the ms/token column" in verdict if busy else "differ by up to" in verdict


def test_demo_refuses_a_budget_below_the_minimum(cache_env):
    proc = run_cli("demo", "--cache-budget", "1KB", env=cache_env, check=False)
    assert proc.returncode == 1
    assert "slicemoe: error:" in proc.stderr and "Traceback" not in proc.stderr
