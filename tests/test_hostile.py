"""Hostile files and faults: nothing aborts the process, nothing is left half-written, and one set of
defaults gives the same numbers through every entry point."""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest

from helpers import _load_script, run_cli, run_json

from slicemoe_gguf import Model, defaults, trace as traces
from slicemoe_gguf._native import SliceMoEError, ffi, lib
from slicemoe_gguf.cache_params import policies, settings
from slicemoe_gguf.embedded import EMBEDDED_CHECKPOINT, embedded_gguf
from slicemoe_gguf.runtime import check_model

fuzz = _load_script("fuzz_gguf")
PROMPT = "ROMEO.\nBut soft, what light"


@pytest.fixture(scope="module")
def embedded():
    return embedded_gguf(progress=False)


@pytest.fixture(scope="module")
def embedded_stock():
    return embedded_gguf(experts="q8_0", progress=False)


# -- hostile files ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_fuzz_subset_gives_no_signal_no_traceback_and_no_hang(embedded, embedded_stock, sliced_gguf, tmp_path):
    """The CI subset of scripts/fuzz_gguf.py: sliced and stock files of two architectures, every
    mutation kind, each run with and without a cache."""
    sources = [embedded, embedded_stock, sliced_gguf("deepseek_v2")]
    cases = range(0, len(sources) * len(fuzz.KINDS) * 2)   # every (source, kind) pair twice
    outcomes, findings = fuzz.fuzz(sources, seed=20261123, cases=cases, timeout=120, keep=tmp_path / "findings")
    assert findings == [], "\n".join(f"case {f.case} ({f.run}): {f.problem}: {f.what}" for f in findings)
    # the harness really ran files of both kinds: some still decode, most are refused
    assert outcomes.get("ok decoded", 0) > 0 and outcomes.get("ok refused", 0) > 0
    assert sum(outcomes.values()) == 2 * len(cases)


def test_every_mutation_kind_changes_the_file(embedded):
    import random

    data = embedded.read_bytes()
    layout = fuzz.layout(data)
    for kind in fuzz.KINDS:
        changed = sum(fuzz.mutate(data, layout, random.Random(i), kind)[0] != data for i in range(20))
        assert changed >= 18, kind


def _mutated(source: Path, out: Path, field: str, value, fmt: str | None = None) -> Path:
    """`source` with one metadata value or tensor-info field set (same size, so the rest of the
    file is untouched), checked with gguf-py's reader as an independent parser."""
    data = bytearray(source.read_bytes())
    layout = fuzz.layout(bytes(data))
    spans = {s.what: s for s in layout.ints + layout.floats + layout.tensor_offsets + layout.tensor_dims +
             layout.tensor_types}
    if field in spans:
        struct.pack_into(fmt or spans[field].fmt, data, spans[field].offset, value)
    else:
        offset, length, _ = next(t for t in layout.texts if t[2] == field)
        assert len(value) == length
        data[offset:offset + length] = value
    out.write_bytes(bytes(data))
    return out


# (field, value, words the error must contain)
VALIDATOR_CASES = [
    ("olmoe.expert_used_count", 33, "expert_used_count"),          # llama.cpp asserts: used > experts
    ("olmoe.expert_used_count", 0, "expert_used_count"),
    ("olmoe.expert_count", 0, "expert_used_count"),
    ("olmoe.block_count", 0, "block_count"),
    ("olmoe.block_count", 100000, "block_count"),
    ("olmoe.attention.layer_norm_rms_epsilon", -1.0, "layer_norm_rms_epsilon"),  # the CPU kernel asserts
    ("olmoe.rope.freq_base", float("nan"), "rope.freq_base"),
    ("tokenizer.ggml.model", b"none", "no vocabulary"),             # tokenizing would assert
    ("output.weight offset", 1 << 40, "output.weight"),   # the tensor named (a truncated file: test_cache)
    ("slicemoe.format_version", 3, "format_version 3"),
    ("slicemoe.group_size", 16, "group_size"),
    ("blk.2.attn_norm.weight type", 3, "quantized type q4_1"),   # a norm in Q4_1: ggml's mul asserts
]


@pytest.mark.parametrize("field,value,words", VALIDATOR_CASES, ids=[f"{c[0]}={c[1]!r}" for c in VALIDATOR_CASES])
def test_the_validator_names_what_is_wrong_before_llama_cpp_sees_it(embedded, tmp_path, field, value, words):
    path = _mutated(embedded, tmp_path / "bad.gguf", field, value)
    if field.endswith(" type"):
        tensor = next(t for t in gguf.GGUFReader(path).tensors if t.name == field.removesuffix(" type"))
        assert int(tensor.tensor_type) == value
    elif not field.endswith("offset"):
        # gguf-py, an independent parser, reads the file and the mutated value: the file is
        # well-formed, its values are not (it cannot map a tensor past the end, so not there)
        field_value = gguf.GGUFReader(path).fields[field]
        read = field_value.parts[-1].tobytes() if isinstance(value, bytes) else field_value.parts[-1][0]
        assert read == value or (value != value and read != read)
    with pytest.raises(SliceMoEError, match=re.escape(words)):
        check_model(path)
    for extra in ([], ["--cache-budget", "50%"]):
        proc = run_cli("run", "-m", str(path), "-p", "ROMEO.", "-n", "2", *extra, check=False)
        assert proc.returncode == 1, proc.stderr
        assert words in proc.stderr and "Traceback" not in proc.stderr


def test_an_lsb_slice_of_another_shape_is_refused(embedded, tmp_path):
    # blk.0.ffn_up_exps.lsb is [192, 64, 32]: swapping ne[0] and ne[1] keeps its byte size
    path = _mutated(embedded, tmp_path / "a.gguf", "blk.0.ffn_up_exps.lsb ne[0]", 64)
    path = _mutated(path, tmp_path / "b.gguf", "blk.0.ffn_up_exps.lsb ne[1]", 192)
    with pytest.raises(SliceMoEError, match="its LSB slice must both be Q4_1 of one shape"):
        check_model(path)


# -- exceptions never cross the C boundary ---------------------------------------------------------

def _sim_params(**fields):
    params = lib().slicemoe_sim_default_params()
    params.n_layers, params.n_expert, params.top_k = 2, 8, 2
    params.msb_bytes, params.lsb_bytes, params.cache.budget_bytes = 100, 100, 10_000
    for name, value in fields.items():
        setattr(params.cache if hasattr(params.cache, name) else params, name, value)
    return params


@pytest.mark.parametrize("fields,words", [
    ({"msb_share": 1.5}, "msb_share"),        # once a negative slot count that vector::assign threw on
    ({"msb_share": float("nan")}, "msb_share"),
    ({"high_threshold": -0.1}, "high_threshold"),
    ({"gating_t": float("inf")}, "gating_t"),
    ({"policy": 99}, "policy"),
    ({"n_expert": 1 << 30}, "1024 experts"),
    ({"msb_bytes": 1 << 62}, "slice sizes"),
    ({"n_layer_slots": 3}, "layer_slots"),
])
def test_bad_simulation_parameters_are_a_status_not_an_abort(fields, words):
    native = lib()
    out = ffi.new("slicemoe_sim **")
    status = native.slicemoe_sim_create(ffi.new("struct slicemoe_sim_params *", _sim_params(**fields)), out)
    assert status == 1 and out[0] == ffi.NULL
    assert words in ffi.string(native.slicemoe_last_error()).decode()


def test_bad_cache_parameters_from_python_and_the_cli(embedded, tmp_path):
    with pytest.raises(SliceMoEError, match="msb_share"):
        Model(embedded, cache_budget=10**6, msb_share=2.0)
    with pytest.raises(SliceMoEError, match="gating_t"):
        Model(embedded, cache_budget=10**6, policy="adapmoe", gating_t=float("nan"))
    trace_path = tmp_path / "t.jsonl"
    run_cli("trace", "-m", str(embedded), "-p", PROMPT, "-n", "4", "-o", str(trace_path))
    trace = traces.read(trace_path)
    with pytest.raises(SliceMoEError, match="msb_share"):
        traces.replay(trace, budget=10**6, msb_share=7.0)
    for flags in (["--msb-share", "2"], ["--gating-t", "-1"], ["--prior-lambda", "nan"], ["--high-threshold", "1.5"]):
        proc = run_cli("sim", str(trace_path), "--cache-budget", "50%", *flags, check=False)
        assert proc.returncode == 2 and "must be in" in proc.stderr and "Traceback" not in proc.stderr
        proc = run_cli("run", "-m", str(embedded), "-p", "x", "--cache-budget", "50%", *flags, check=False)
        assert proc.returncode == 2 and "must be in" in proc.stderr and "Traceback" not in proc.stderr


def test_a_cache_on_a_stock_model_is_refused_also_when_tracing(embedded_stock):
    # the trace observer once went on to build pools from LSB tensors a stock model lacks (SIGSEGV)
    for record_trace in (False, True):
        with pytest.raises(SliceMoEError, match="not a sliced"):
            Model(embedded_stock, cache_budget=10**6, record_trace=record_trace)


def test_absurd_budgets_are_capped_or_refused_never_a_crash(embedded, tmp_path):
    # far more than the file holds: every slice fits, the pools are the slices
    huge = run_json("run", "-m", str(embedded), "-p", PROMPT, "-n", "4", "--json", "--cache-budget", "1000000TB")
    slices = run_json("run", "-m", str(embedded), "-p", PROMPT, "-n", "4", "--json", "--cache-budget", "100%")
    assert huge["cache"]["pool_bytes"] == slices["cache"]["pool_bytes"] and huge["tokens"] == slices["tokens"]
    proc = run_cli("run", "-m", str(embedded), "-p", PROMPT, "--cache-budget", "1B", check=False)
    assert proc.returncode == 1 and "below the minimum" in proc.stderr
    header = {"format": "slicemoe-trace", "version": 1, "n_layers": 2, "n_experts": 5000, "top_k": 2,
              "slice_bytes": {"msb": 100, "lsb": 100}}
    wide = tmp_path / "wide.jsonl"
    wide.write_text(json.dumps(header) + "\n")
    proc = run_cli("sim", str(wide), "--cache-budget", "1000000TB", check=False)
    assert proc.returncode == 1 and "1024 experts" in proc.stderr and "Traceback" not in proc.stderr


# -- faults ------------------------------------------------------------------------------------------

def test_the_model_freed_while_a_prefetch_is_in_flight(embedded):
    """A read error stops a decode after the look-ahead started a prefetch into the next layer;
    freeing the model then must wait for it (it writes into the pools and reads the file)."""
    budget = embedded.stat().st_size // 4
    for after in range(0, 40, 3):
        model = Model(embedded, cache_budget=budget, prefetch=True, warmup="none", n_threads=2)
        model.eval(model.tokenize(PROMPT))
        model.fail_reads_after(after)
        with pytest.raises(SliceMoEError):
            for token in model.tokenize(" and the moon and the stars") * 4:
                model.eval([token])
        model.close()


def test_a_model_file_changed_while_loaded_is_an_error_not_a_sigbus(embedded, tmp_path):
    script = f"""
import os, shutil, sys
from slicemoe_gguf import Model
from slicemoe_gguf._native import SliceMoEError
path = {str(tmp_path / "m.gguf")!r}
shutil.copy({str(embedded)!r}, path)
for budget in (0, os.path.getsize(path) // 3):
    shutil.copy({str(embedded)!r}, path)
    with Model(path, cache_budget=budget, n_threads=1) as model:
        before = model.generate({PROMPT!r}, 4, stop_at_eog=False).tokens
        # replaced by rename: the loaded model keeps the inode it mapped, and its weights
        shutil.copy(path, path + ".new")
        os.replace(path + ".new", path)
        assert model.generate({PROMPT!r}, 4, stop_at_eog=False).tokens == before
    with Model(path, cache_budget=budget, n_threads=1) as model:
        model.generate({PROMPT!r}, 4)
        # truncated in place: refused before anything touches the lost pages
        os.truncate(path, os.path.getsize(path) // 2)
        try:
            model.generate({PROMPT!r}, 4)
        except SliceMoEError as exc:
            assert exc.status == 2 and "changed on disk" in str(exc), exc
        else:
            sys.exit("no error")
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)   # not the source tree, which would shadow the installed package
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_a_pool_allocation_that_fails_is_an_error_and_the_process_goes_on(embedded, tmp_path):
    """Address space limited to what a load of the model without a cache takes, plus half the
    pools: the pool allocation is what fails."""
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        pytest.skip("AddressSanitizer's shadow memory does not fit under an address-space limit")
    script = f"""
import re, resource
from pathlib import Path
from slicemoe_gguf import Model
from slicemoe_gguf._native import SliceMoEError, check, ffi, lib
native = lib()
path = Path({str(embedded)!r})
size = path.stat().st_size
out = ffi.new("slicemoe_model **")
check(native.slicemoe_model_load(bytes(path), ffi.new("struct slicemoe_model_params *",
                                 native.slicemoe_model_default_params()), out))
vm = int(re.search(r"VmSize:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
native.slicemoe_model_free(out[0])
resource.setrlimit(resource.RLIMIT_AS, (vm + size // 2, resource.RLIM_INFINITY))
try:
    Model(path, n_ctx=256, n_threads=1, cache_budget=size)
except SliceMoEError as exc:
    assert exc.status == 4 and "cannot allocate the slice pools" in str(exc), exc
else:
    raise SystemExit("the pools were allocated")
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
with Model(path, n_ctx=256, n_threads=1, cache_budget=size) as model:
    assert model.generate("ROMEO.", 3, stop_at_eog=False).n_decode == 3
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)   # not the source tree, which would shadow the installed package
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


@pytest.mark.slow
def test_a_killed_conversion_leaves_no_output_and_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "model.gguf"
    proc = subprocess.Popen(["slicemoe-convert", str(EMBEDDED_CHECKPOINT), "-o", str(out), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".model.gguf.*.partial")) and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert list(tmp_path.glob(".model.gguf.*.partial")), "killed before the partial file appeared"
    # a partial file a live converter holds is left alone
    live = tmp_path / ".model.gguf.live.partial"
    holder = open(live, "w")
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        done = subprocess.run(["slicemoe-convert", str(EMBEDDED_CHECKPOINT), "-o", str(out), "-q", "--force"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert [p.name for p in tmp_path.glob(".model.gguf.*.partial")] == [live.name]
    finally:
        holder.close()
    check_model(out)


def test_no_space_left_during_conversion_is_a_clear_error_with_nothing_written(tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare with user and mount namespaces to mount a small tmpfs")
    target = tmp_path / "small"
    target.mkdir()
    script = (f"mount -t tmpfs -o size=4m tmpfs {target} && "
              f"slicemoe-convert -q {EMBEDDED_CHECKPOINT} -o {target}/model.gguf; echo rc=$?; ls -A {target}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert "rc=1" in proc.stdout and "no space left" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout.strip().endswith("rc=1"), f"files left behind: {proc.stdout}"


# -- traces ----------------------------------------------------------------------------------------

HEADER = {"format": "slicemoe-trace", "version": 1, "n_layers": 1, "n_experts": 4, "top_k": 1,
          "slice_bytes": {"msb": 10, "lsb": 10}}


@pytest.mark.parametrize("header,words", [
    ([1, 2, 3], "not a slicemoe-trace"),
    ({**HEADER, "top_k": "two"}, "'top_k' must be a positive integer"),
    ({**HEADER, "top_k": 9}, "exceeds n_experts"),
    ({**HEADER, "n_layers": 0}, "'n_layers' must be a positive integer"),
    ({**HEADER, "slice_bytes": {"lsb": 10}}, "'slice_bytes' must be an object with 'msb'"),
    ({**HEADER, "slice_bytes": {"msb": -5, "lsb": 10}}, "slice_bytes.msb"),
    ({**HEADER, "slice_bytes": [10, 10]}, "'slice_bytes' must be an object"),
])
def test_malformed_trace_headers_are_trace_errors(tmp_path, header, words):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(header) + "\n" + json.dumps({"request": 1, "phase": "decode", "layer": 0,
                                                           "experts": [1], "weights": [1.0]}) + "\n")
    with pytest.raises(traces.TraceError, match=re.escape(words)):
        traces.read(path)
    proc = run_cli("sim", str(path), "--cache-budget", "1KB", check=False)
    assert proc.returncode == 1 and words in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("record", ['[1, 2]', '{"request": 1, "phase": "decode", "layer": 0, "experts": 3}',
                                    '{"request": 1, "phase": "lunch", "layer": 0, "experts": [1]}',
                                    '[' * 100000 + ']' * 100000])
def test_malformed_trace_records_are_trace_errors(tmp_path, record):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(HEADER) + "\n" + record + "\n")
    with pytest.raises(traces.TraceError, match="line 2"):
        traces.read(path)


def test_a_failed_trace_write_leaves_nothing_behind(tmp_path):
    trace = traces.from_records(HEADER, [(1, 0, 1, [1], [1.0]), (1, 0, 1, [2], [0.5])])
    trace.tokens = trace.tokens[:1]   # inconsistent: the writer fails at the second record
    with pytest.raises(IndexError):
        trace.write(tmp_path / "t.jsonl")
    assert list(tmp_path.iterdir()) == []


# -- one set of defaults -----------------------------------------------------------------------------

def test_the_defaults_are_one_set(tmp_path):
    from slicemoe_gguf.cli import build_parser

    native = lib()
    model_params = native.slicemoe_model_default_params()
    sim_params = native.slicemoe_sim_default_params()
    names = {"policy": policies(), "precision": {"auto": 0, "high": 1, "low": 2}, "warmup": {"none": 0, "pcw": 1}}
    for name, value in defaults.CACHE_SETTINGS.items():
        expected = names[name][value] if name in names else pytest.approx(value)
        assert getattr(model_params.cache, name) == expected, name
        assert getattr(sim_params.cache, name) == expected, name
        assert settings()[name]["default"] == value, name   # the table's default, as front ends read it
    signatures = {"Model": inspect.signature(Model.__init__), "replay": inspect.signature(traces.replay)}
    for where, signature in signatures.items():
        for name, value in defaults.CACHE_SETTINGS.items():
            assert signature.parameters[name].default == value, (where, name)
    plan = inspect.signature(traces.plan)
    assert plan.parameters["high_threshold"].default == defaults.HIGH_THRESHOLD
    assert plan.parameters["warmup"].default == defaults.WARMUP
    parser = build_parser()
    commands = {"run": ["run", "-m", "x", "-p", "y"], "trace": ["trace", "-m", "x", "-p", "y", "-o", "z"],
                "sim": ["sim", "t", "--cache-budget", "1MB"]}
    for command, argv in commands.items():
        args = parser.parse_args(argv)
        for name, value in defaults.CACHE_SETTINGS.items():
            assert getattr(args, name) == value, (command, name)
    plan_args = parser.parse_args(["plan", "t", "--max-miss-rate", "0.1"])
    assert (plan_args.high_threshold, plan_args.warmup, plan_args.gating_t) == \
        (defaults.HIGH_THRESHOLD, defaults.WARMUP, defaults.GATING_T)
    run_args = parser.parse_args(commands["run"])
    assert (run_args.ctx_size, run_args.batch_size, run_args.n_predict) == \
        (defaults.N_CTX, defaults.N_BATCH, defaults.N_PREDICT)
    assert native.slicemoe_context_default_params().n_ctx == defaults.N_CTX
    assert inspect.signature(Model.__init__).parameters["n_ctx"].default == defaults.N_CTX


COUNTERS = ("msb_hits", "msb_misses", "lsb_hits", "lsb_misses", "loads", "evictions", "flash_bytes", "ram_bytes",
            "high_uses", "low_uses", "warmup_loads", "decode_tokens", "dropped_uses")


@pytest.mark.parametrize("policy", ["dbsc", "lru8", "lfu8", "lru4", "hobbit", "dymoe", "cache_prior", "adapmoe"])
def test_trace_then_sim_with_the_same_flags_reproduces_run(embedded, tmp_path, policy):
    flags = ["--policy", policy, "--cache-budget", "30%"]
    run = run_json("run", "-m", str(embedded), "-p", PROMPT, "-n", "12", "--json", *flags)
    path = tmp_path / "t.jsonl"
    run_cli("trace", "-m", str(embedded), "-p", PROMPT, "-n", "12", "-o", str(path), *flags)
    sim = run_json("sim", str(path), "--json", *flags)
    for name in COUNTERS:
        assert sim[name] == run["cache"][name], name


def _cpu_tree(root, capacities=None, max_freqs=None):
    """A fake sysfs cpu directory: cpuN/cpu_capacity and/or cpuN/cpufreq/cpuinfo_max_freq."""
    for i, value in enumerate(capacities or max_freqs):
        cpu = root / f"cpu{i}"
        (cpu / "cpufreq").mkdir(parents=True)
        if capacities:
            (cpu / "cpu_capacity").write_text(f"{value}\n")
        if max_freqs:
            (cpu / "cpufreq" / "cpuinfo_max_freq").write_text(f"{max_freqs[i]}\n")
    (root / "cpufreq").mkdir(exist_ok=True)   # sysfs has non-cpu entries beside them
    (root / "online").write_text("0-7\n")
    return root


@pytest.mark.parametrize("capacities, max_freqs, fast", [
    ([1024, 870, 870, 870, 325, 325, 325, 325], None, 4),           # a phone: prime + 3 big, 4 little
    (None, [3200000, 3200000, 2000000, 2000000, 1400000, 1400000, 1400000, 1400000], 4),   # no capacity
    ([1024] * 8, None, 8),                                           # cores alike: all of them
    ([1024, 1024, 400, 400], [2000000, 2000000, 2000000, 2000000], 2),   # capacity wins over frequency
])
def test_the_default_thread_count_uses_the_fast_cores_of_a_big_little_machine(tmp_path, capacities, max_freqs, fast):
    from slicemoe_gguf._native import lib

    tree = _cpu_tree(tmp_path / "cpu", capacities, max_freqs)
    assert lib().slicemoe_cpu_fast_cores(str(tree).encode()) == fast


def test_without_readable_cpu_files_every_core_counts(tmp_path):
    from slicemoe_gguf._native import lib

    (tmp_path / "cpu" / "cpu0").mkdir(parents=True)
    assert lib().slicemoe_cpu_fast_cores(str(tmp_path / "cpu").encode()) == 0
    assert lib().slicemoe_cpu_fast_cores(str(tmp_path / "missing").encode()) == 0
    assert 1 <= lib().slicemoe_default_threads() <= os.cpu_count()
