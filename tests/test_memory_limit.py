"""Under a memory limit at the stated resident figure, decode reads nothing but the engine's own
misses: the dense weights are never evicted and re-read by page faults. An idle process can hand
its pools back and decode on as before.

The run is a real one in a child process inside a memory cgroup (root only: creating one needs it).
After a warm-up the kernel is made to reclaim every page of the group it can (memory.force_empty,
as sustained pressure at the limit would, but at once and every time), then the decode goes on and
the process's read bytes (/proc/self/io, everything its threads fetched from the disk, page faults
included) are compared with the bytes the engine itself read for its misses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import rss_anon_bytes
from slicemoe_gguf import Model
from slicemoe_gguf.embedded import embedded_gguf
from slicemoe_gguf.memory import routed_expert_bytes
from slicemoe_gguf.model_info import describe

CGROUP_V1 = Path("/sys/fs/cgroup/memory")
N_CTX, N_BATCH = 512, 512

CHILD = r"""
import json, os, sys
from pathlib import Path
import numpy as np
from slicemoe_gguf import Model
from slicemoe_gguf.memory import plan

path, budget, group, n_ctx, n_batch, reclaim, policy = (sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]),
                                                       int(sys.argv[5]), sys.argv[6] == "reclaim", sys.argv[7])

def read_bytes():
    fields = dict(line.split(":") for line in open("/proc/self/io"))
    return int(fields["read_bytes"])

tokens = []

def decode(model, n):
    for _ in range(n):
        tokens.append(int(np.argmax(model.logits())))
        model.eval(tokens[-1:])

def load_and_warm():
    model = Model(path, cache_budget=budget, policy=policy, n_threads=2, n_ctx=n_ctx, n_batch=n_batch)
    model.eval(model.tokenize("ROMEO.\nBut soft, what light through yonder window breaks?"))
    decode(model, 8)
    return model

# The limit: what this process holds without the model (the interpreter, numpy, llama.cpp's backends,
# and the code pages a decode runs, faulted in by a first run whose file pages are then dropped) +
# the stated figure + 5%.
figure = plan(path, n_ctx=n_ctx, n_batch=n_batch, cache_budget=budget)
load_and_warm().close()
fd = os.open(path, os.O_RDONLY)
os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
os.close(fd)
usage = int((group / "memory.usage_in_bytes").read_text())
(group / "memory.limit_in_bytes").write_text(str(usage + int(1.05 * figure.total_bytes)))
with load_and_warm() as model:
    if reclaim:
        (group / "memory.force_empty").write_text("0")
    before_read, before_flash = read_bytes(), model.cache_stats()["flash_bytes"]
    decode(model, 24)
    stats = model.cache_stats()
    print(json.dumps({"tokens": tokens[-24:], "read_bytes": read_bytes() - before_read, "flash_bytes": stats["flash_bytes"] - before_flash,
                      "io_mode": stats["io_mode"], "dense_copied_bytes": stats["dense_copied_bytes"],
                      "dense_bytes": figure.dense_bytes,
                      "max_usage": int((group / "memory.max_usage_in_bytes").read_text()),
                      "limit": int((group / "memory.limit_in_bytes").read_text()), "failcnt": int((group / "memory.failcnt").read_text())}))
"""


def _decode_in_a_cgroup(model: Path, budget: int, policy: str, reclaim: bool) -> dict:
    if os.geteuid() != 0 or not (CGROUP_V1 / "memory.limit_in_bytes").exists():
        pytest.skip("needs root and a cgroup v1 memory controller (as on this project's machines and CI)")
    group = CGROUP_V1 / f"slicemoe-test-{os.getpid()}"
    group.mkdir()
    try:
        _evict_from_page_cache(model)   # its pages come in on this group's account, where its reclaim reaches
        child = subprocess.run([sys.executable, "-c", CHILD, str(model), str(budget), str(group), str(N_CTX),
                                str(N_BATCH), "reclaim" if reclaim else "keep", policy], capture_output=True, text=True,
                               cwd=model.parent,   # not the source tree, whose package has no native library
                               preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())), timeout=300)
    finally:
        group.rmdir()
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


def _evict_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory) -> Path:
    """The embedded model in a file of its own, which no other test keeps in the page cache."""
    path = tmp_path_factory.mktemp("limit") / "model.gguf"
    path.write_bytes(embedded_gguf(progress=False).read_bytes())
    return path


# dbsc (8-bit capable, both pools) and lru4 (MSB slices only, which all fit at 50%)
@pytest.mark.parametrize("policy", ["dbsc", "lru4"])
def test_decode_under_the_stated_memory_reads_what_an_unpressed_run_reads(model_copy, policy):
    """The kernel takes back everything it can mid-decode; the rest of the decode reads exactly
    what the same decode reads when nothing was taken back: the engine's misses (O_DIRECT reads,
    rounded out to whole blocks), and no page of dense weights."""
    budget = routed_expert_bytes(describe(model_copy)) // 2
    kept = _decode_in_a_cgroup(model_copy, budget, policy, reclaim=False)
    reclaimed = _decode_in_a_cgroup(model_copy, budget, policy, reclaim=True)
    assert reclaimed["io_mode"] == "direct"   # the disk under the test's files has O_DIRECT: no page cache
    assert reclaimed["tokens"] == kept["tokens"]
    assert reclaimed["flash_bytes"] == kept["flash_bytes"]
    assert reclaimed["dense_copied_bytes"] >= reclaimed["dense_bytes"] > 0
    # a few pages of code may come back (the engine's library is file-backed too); the dense
    # weights are 2 MiB, and left in the file mapping they all came back (measured: 11.8 MB read)
    assert 0 <= reclaimed["read_bytes"] - kept["read_bytes"] <= 64 * 1024, (kept, reclaimed)


def _decode(model: Model, n: int, release_after: int | None = None) -> tuple[list[int], list[np.ndarray]]:
    tokens, rows = [], []
    model.eval(model.tokenize("ROMEO.\nBut soft, what light through yonder window breaks?"))
    for step in range(n):
        if step == release_after:
            model.release_cache()
        rows.append(model.logits().copy())
        tokens.append(int(np.argmax(rows[-1])))
        model.eval(tokens[-1:])
    return tokens, rows


def test_a_released_cache_gives_its_memory_back_and_decodes_the_same_model(model_copy):
    """An idle process hands its pools back; the decode that follows computes what it would have
    computed (lru8: fixed precision, so bit for bit), reading its slices again as misses."""
    budget = routed_expert_bytes(describe(model_copy)) // 2
    with Model(model_copy, cache_budget=budget, policy="lru8", n_threads=2) as model:
        kept_tokens, kept_logits = _decode(model, 12)
        kept = model.cache_stats()
    with Model(model_copy, cache_budget=budget, policy="lru8", n_threads=2) as model:
        _decode(model, 4)
        pools = model.cache_stats()["pool_bytes"]
        before = rss_anon_bytes()
        model.release_cache()
        assert before - rss_anon_bytes() >= 0.9 * pools   # the pools' pages went back to the system
        model.reset()
        tokens, logits = _decode(model, 12, release_after=6)   # and once more mid-decode
        released = model.cache_stats()
    assert tokens == kept_tokens
    for row, kept_row in zip(logits, kept_logits):
        assert np.array_equal(row, kept_row)
    assert released["misses"] > kept["misses"]   # what was released was read again
