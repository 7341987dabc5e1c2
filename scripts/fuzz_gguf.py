"""Fuzz the engine with hostile GGUF files: seeded mutations of a real model file, each run through
`slicemoe run` (in a worker process, so that a signal is seen and attributed to its case) with and
without a slice cache.

    python scripts/fuzz_gguf.py --cases 2000 --seed 1            # the embedded model, sliced and q8_0
    python scripts/fuzz_gguf.py --model some.gguf --cases 500

A case passes when the run ends with status 0 or 1 (a clear error), prints no Python traceback and
finishes within --timeout seconds. Anything else (a signal such as SIGABRT or SIGSEGV, a traceback,
a hang) is a finding; the mutated file is kept under --keep for a reproducer. Exit status: the
number of findings (capped at 100).

Mutations (kinds), all derived from (seed, case) so that any case can be replayed alone:
  kv_int        one integer metadata value set to a boundary (0, 1, -1, 2^31, a huge or off-by-one value),
                the model's own hyperparameters (architecture and slicemoe keys) most often
  kv_float      one float metadata value set to 0, -1, NaN, inf or 1e30
  kv_text       one string value (not a token) replaced by another value of a known key or by noise
  kv_string     one string's length field changed
  kv_array      one array's length or element type changed
  kv_array_element  one element of a numeric array (token types, scores, merges' neighbours) changed
  tensor_dims   one tensor's dimension count or a dimension changed
  tensor_type   one tensor's ggml type changed
  tensor_offset one tensor's data offset moved (past the end, misaligned, onto another tensor)
  header_bytes  random bytes written inside the header (metadata and tensor infos)
  data_bytes    random bytes written inside the tensor data
  truncate      the file cut at a random length
  extend        random bytes appended
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

KINDS = ("kv_int", "kv_int", "kv_float", "kv_text", "kv_string", "kv_array", "kv_array_element", "tensor_dims", "tensor_type", "tensor_offset", "header_bytes",
         "data_bytes", "truncate", "extend")
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_INT_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)


@dataclass
class Span:
    """Where one field of the header lies: offset and struct format of the value."""

    offset: int
    fmt: str
    what: str


@dataclass
class Layout:
    header_end: int            # end of the tensor infos
    data_start: int            # start of the tensor data (aligned)
    ints: list[Span]           # integer metadata values
    floats: list[Span]
    texts: list[tuple[int, int, str]]      # (offset, length, key) of string values outside arrays
    array_elements: list[tuple[Span, int]]  # (first element, count) of numeric arrays
    string_lengths: list[Span]
    array_heads: list[tuple[Span, Span]]   # (element type, length)
    tensor_n_dims: list[Span]
    tensor_dims: list[Span]
    tensor_types: list[Span]
    tensor_offsets: list[Span]


def layout(data: bytes) -> Layout:
    """Walk a well-formed GGUF v3 and record where its fields are."""
    pos = 24
    ints, floats, texts, elements, strings, arrays = [], [], [], [], [], []

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def string(what: str) -> str:
        nonlocal pos
        strings.append(Span(pos, "<Q", what))
        n = take("<Q")
        text = data[pos:pos + n].decode("utf-8", "replace")
        pos += n
        return text

    def value(vtype: int, what: str, in_array: bool = False) -> None:
        nonlocal pos
        if vtype == 8:
            start = pos + 8
            text = string(what)
            if not in_array:
                texts.append((start, len(text.encode()), what))
        elif vtype == 9:
            head = (Span(pos, "<I", what + " type"), Span(pos + 4, "<Q", what + " length"))
            arrays.append(head)
            etype, n = take("<I"), take("<Q")
            if etype in _SCALAR:
                if n:
                    elements.append((Span(pos, _SCALAR[etype], what), n))
                pos += n * struct.calcsize(_SCALAR[etype])
            else:
                for i in range(n):
                    value(etype, f"{what}[{i}]", in_array=True)
        else:
            if vtype in _INT_TYPES:
                ints.append(Span(pos, _SCALAR[vtype], what))
            elif vtype in (6, 12):
                floats.append(Span(pos, _SCALAR[vtype], what))
            pos += struct.calcsize(_SCALAR[vtype])

    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    alignment = 32
    for _ in range(n_kv):
        key = string("key")
        vtype = take("<I")
        if key == "general.alignment":
            alignment = struct.unpack_from(_SCALAR[vtype], data, pos)[0]
        value(vtype, key)
    n_dims, dims, types, offsets = [], [], [], []
    for _ in range(n_tensors):
        name = string("tensor name")
        n_dims.append(Span(pos, "<I", name + " n_dims"))
        nd = take("<I")
        for d in range(nd):
            dims.append(Span(pos, "<Q", f"{name} ne[{d}]"))
            pos += 8
        types.append(Span(pos, "<I", name + " type"))
        offsets.append(Span(pos + 4, "<Q", name + " offset"))
        pos += 12
    return Layout(pos, -(-pos // alignment) * alignment, ints, floats, texts, elements, strings, arrays, n_dims, dims, types, offsets)


def _boundary(rng: random.Random, fmt: str, old: int) -> int:
    bits = struct.calcsize(fmt) * 8
    signed = fmt[-1].islower()
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    choices = [0, 1, 2, old + 1, old - 1, old * 2, old * 1000, hi, lo, hi // 2 + 1, 255, 256, 65536, -1, 1 << 31]
    return min(max(rng.choice(choices), lo), hi)


def _put(buf: bytearray, span: Span, value: int) -> str:
    struct.pack_into(span.fmt, buf, span.offset, value)
    return f"{span.what} = {value}"


def mutate(data: bytes, lay: Layout, rng: random.Random, kind: str) -> tuple[bytes, str]:
    """One mutation of `kind`; returns (new bytes, a description)."""
    buf = bytearray(data)
    if kind == "kv_int":
        model_keys = [s for s in lay.ints if not s.what.startswith(("general.", "tokenizer."))]
        span = rng.choice(model_keys if model_keys and rng.random() < 0.7 else lay.ints)
        old = struct.unpack_from(span.fmt, data, span.offset)[0]
        what = _put(buf, span, _boundary(rng, span.fmt, old))
        return bytes(buf), what
    if kind == "kv_float":
        span = rng.choice(lay.floats)
        value = rng.choice([0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e30, 1e-30])
        struct.pack_into(span.fmt, buf, span.offset, value)
        return bytes(buf), f"{span.what} = {value}"
    if kind == "kv_text":
        offset, length, key = rng.choice(lay.texts)
        known = [b"none", b"linear", b"yarn", b"gpt2", b"llama", b"olmoe", b"qwen2moe", b"deepseek2", b"qwen3moe",
                 b"bert", b"t5", b"rwkv", b"plamo2", b"default", b"qwen2", b"deepseek-llm", b""]
        text = rng.choice(known) if rng.random() < 0.7 else rng.randbytes(length)
        text = (text + b" " * length)[:length] if rng.random() < 0.5 else text
        if len(text) != length:   # a new length: rewrite the length field and shift the rest
            buf[offset - 8:offset + length] = struct.pack("<Q", len(text)) + text
        else:
            buf[offset:offset + length] = text
        return bytes(buf), f"{key} = {text[:40]!r}"
    if kind == "kv_array_element":
        first, n = rng.choice(lay.array_elements)
        size = struct.calcsize(first.fmt)
        span = Span(first.offset + size * rng.randrange(n), first.fmt, first.what + " element")
        if first.fmt in ("<f", "<d"):
            value = rng.choice([float("nan"), float("inf"), -1e30, 0.0])
            struct.pack_into(span.fmt, buf, span.offset, value)
            return bytes(buf), f"{span.what} = {value}"
        old = struct.unpack_from(span.fmt, data, span.offset)[0]
        what = _put(buf, span, _boundary(rng, span.fmt, old))
        return bytes(buf), what
    if kind == "kv_string":
        span = rng.choice(lay.string_lengths)
        old = struct.unpack_from("<Q", data, span.offset)[0]
        what = _put(buf, span, rng.choice([0, old + 1, max(old - 1, 0), 1 << 40, (1 << 64) - 1]))
        return bytes(buf), what
    if kind == "kv_array":
        type_span, length_span = rng.choice(lay.array_heads)
        if rng.random() < 0.5:
            old = struct.unpack_from("<I", data, type_span.offset)[0]
            what = _put(buf, type_span, rng.choice([t for t in (0, 4, 6, 8, 9, 13, 1000) if t != old]))
            return bytes(buf), what
        old = struct.unpack_from("<Q", data, length_span.offset)[0]
        lengths = [n for n in (0, 1, old - 1, old + 1, old * 2, 1 << 40) if n != old and n >= 0]
        what = _put(buf, length_span, rng.choice(lengths))
        return bytes(buf), what
    if kind == "tensor_dims":
        if rng.random() < 0.3:
            span = rng.choice(lay.tensor_n_dims)
            what = _put(buf, span, rng.choice([0, 1, 2, 3, 4, 5, 1000]))
            return bytes(buf), what
        span = rng.choice(lay.tensor_dims)
        old = struct.unpack_from("<Q", data, span.offset)[0]
        what = _put(buf, span, rng.choice([0, 1, old + 1, old - 1, old * 2, old // 2, 1 << 40, (1 << 63)]))
        return bytes(buf), what
    if kind == "tensor_type":
        span = rng.choice(lay.tensor_types)
        what = _put(buf, span, rng.choice([0, 1, 2, 3, 4, 8, 12, 14, 16, 24, 30, 39, 40, 1000]))
        return bytes(buf), what
    if kind == "tensor_offset":
        span = rng.choice(lay.tensor_offsets)
        old = struct.unpack_from("<Q", data, span.offset)[0]
        other = struct.unpack_from("<Q", data, rng.choice(lay.tensor_offsets).offset)[0]
        size = len(data) - lay.data_start
        what = _put(buf, span, rng.choice([0, old + 1, old + 32, other, size, size - 32, 1 << 62]))
        return bytes(buf), what
    if kind in ("header_bytes", "data_bytes"):
        lo, hi = (8, lay.header_end) if kind == "header_bytes" else (lay.data_start, len(data))
        n = rng.choice([1, 1, 2, 4, 16])
        where = []
        for _ in range(n):
            at = rng.randrange(lo, hi)
            buf[at] = rng.randrange(256)
            where.append(at)
        return bytes(buf), f"{n} random byte(s) at {where[:4]}"
    if kind == "truncate":
        cut = rng.choice([rng.randrange(0, lay.header_end), rng.randrange(lay.header_end, len(data)), len(data) - 1])
        return bytes(buf[:cut]), f"truncated to {cut} of {len(data)} bytes"
    if kind == "extend":
        n = rng.choice([1, 31, 4096, 1 << 20])
        return bytes(buf) + rng.randbytes(n), f"{n} bytes appended"
    raise ValueError(kind)


@functools.lru_cache(maxsize=None)
def _source(path: Path) -> tuple[bytes, Layout]:
    """A source file's bytes and layout, read once per process (every case of it starts from them)."""
    data = path.read_bytes()
    return data, layout(data)


def sweep_cases(data: bytes, lay: Layout) -> list[tuple[Span, int]]:
    """Every integer hyperparameter of the model (not general.* or tokenizer.*) at each boundary:
    the systematic complement of the random kinds (--sweep)."""
    cases = []
    for span in lay.ints:
        if span.what.startswith(("general.", "tokenizer.")):
            continue
        old = struct.unpack_from(span.fmt, data, span.offset)[0]
        bits = struct.calcsize(span.fmt) * 8
        hi = (1 << (bits - 1)) - 1 if span.fmt[-1].islower() else (1 << bits) - 1
        for value in sorted({0, 1, 2, old - 1, old + 1, 2 * old, 1000 * old, hi}):
            if 0 <= value <= hi and value != old:
                cases.append((span, value))
    return cases


def case_file(source: Path, seed: int, case: int, out: Path, sweep: bool = False) -> str:
    """Write case `case` of `source` under `seed` to `out`; returns its description."""
    data, lay = _source(source)
    if sweep:
        cases = sweep_cases(data, lay)
        if case >= len(cases):
            out.write_bytes(data)
            return "sweep: past the last case (unchanged file)"
        span, value = cases[case]
        buf = bytearray(data)
        what = _put(buf, span, value)
        out.write_bytes(bytes(buf))
        return f"sweep: {what}"
    rng = random.Random(f"{seed}:{source.name}:{case}")
    kind = KINDS[case % len(KINDS)]
    mutated, what = mutate(data, lay, rng, kind)
    out.write_bytes(mutated)
    return f"{kind}: {what}"


# --- the worker: runs cases in one process, printing progress so the parent sees where it died --

RUNS = {"plain": [], "cache": ["--cache-budget", "50%"]}


def _worker(sources: list[Path], seed: int, cases: list[int], scratch: Path, report_fd: int, sweep: bool) -> None:
    from slicemoe_gguf.cli import main

    report = os.fdopen(report_fd, "w", buffering=1)   # the protocol; stdout may carry llama.cpp's prints

    for case in cases:
        source, index = _source_of(sources, case, sweep)
        path = scratch / f"case-{case}.gguf"
        what = case_file(source, seed, index, path, sweep)
        for run, extra in RUNS.items():
            print(f"START {case} {run} {what}", file=report, flush=True)
            out, err = io.StringIO(), io.StringIO()
            status = "ok decoded"
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    rc = main(["run", "-m", str(path), "-p", "ROMEO.", "-n", "3", "-c", "256", "-t", "1",
                               "--json", *extra])
                status = {0: "ok decoded", 1: "ok refused"}.get(rc, f"exit status {rc}")
                if rc == 1:
                    status += " " + (err.getvalue().strip().splitlines() or ["(no message)"])[-1]
            except SystemExit as exc:
                status = "ok refused" if exc.code in (1, 2) else f"exit status {exc.code}"
            except BaseException as exc:   # a traceback the user would see
                status = f"traceback {type(exc).__name__}: {str(exc)[:200]}"
            print(f"END {case} {run} {status}", file=report, flush=True)
        path.unlink()


@dataclass
class Finding:
    case: int
    run: str
    what: str
    problem: str


def _source_of(sources: list[Path], case: int, sweep: bool) -> tuple[Path, int]:
    """Random cases take the sources in turn, one block of every kind each; sweep cases run through
    each source's list in turn."""
    if not sweep:
        return sources[(case // len(KINDS)) % len(sources)], case
    for source in sources:
        n = len(sweep_cases(*_source(source)))
        if case < n:
            return source, case
        case -= n
    return sources[-1], 1 << 30


def n_sweep_cases(sources: list[Path]) -> int:
    return sum(len(sweep_cases(*_source(s))) for s in sources)


def fuzz(sources: list[Path], seed: int, cases: range, *, timeout: float = 60.0, keep: Path | None = None,
         scratch: Path | None = None, progress: bool = False, sweep: bool = False) -> tuple[dict[str, int], list[Finding]]:
    """Run the cases; returns (passing runs by outcome: "ok decoded" / "ok refused", findings)."""
    import tempfile

    scratch = scratch or Path(tempfile.mkdtemp(prefix="slicemoe-fuzz-"))
    todo = list(cases)
    findings: list[Finding] = []
    outcomes: dict[str, int] = {}
    refusals: dict[str, int] = {}
    started = time.monotonic()
    while todo:
        read_end, write_end = os.pipe()
        cmd = [sys.executable, __file__, "--worker", "--seed", str(seed), "--scratch", str(scratch),
               "--report-fd", str(write_end), "--cases-list", ",".join(map(str, todo)), *(["--sweep"] if sweep else []),
               *sum((["--model", str(s)] for s in sources), [])]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(write_end,),
                                start_new_session=True)
        os.close(write_end)
        reports = os.fdopen(read_end, "r")
        current: tuple[int, str, str] | None = None
        last = time.monotonic()
        problem = None
        while True:
            ready, _, _ = select.select([reports], [], [], 1.0)
            if ready:
                line = reports.readline()
                if not line:
                    break
                last = time.monotonic()
                kind, case, run, rest = (line.rstrip("\n").split(" ", 3) + [""])[:4]
                if kind == "START":
                    current = (int(case), run, rest)
                elif kind == "END" and current:
                    if rest.startswith("ok"):
                        outcome = rest[:len("ok refused")]
                        outcomes[outcome] = outcomes.get(outcome, 0) + 1
                        if outcome == "ok refused":
                            reason = _reason(rest[len("ok refused "):])
                            refusals[reason] = refusals.get(reason, 0) + 1
                    else:
                        findings.append(Finding(current[0], run, current[2], rest))
                        _keep(sources, seed, current[0], keep, sweep)
                    if run == list(RUNS)[-1]:
                        todo.remove(current[0])
                        if progress and len(todo) % 25 == 0:
                            print(f"{len(cases) - len(todo)}/{len(cases)} cases, {len(findings)} findings, "
                                  f"{time.monotonic() - started:.0f} s", file=sys.stderr)
                    current = None
            elif time.monotonic() - last > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                problem = f"hang (no progress in {timeout:.0f} s)"
                break
        rc = proc.wait()
        reports.close()
        if current is None:
            if rc != 0 and todo:
                raise RuntimeError(f"fuzz worker failed outside any case (status {rc})")
            continue
        if problem is None:
            problem = f"killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"worker exit status {rc}"
        findings.append(Finding(current[0], current[1], current[2], problem))
        _keep(sources, seed, current[0], keep, sweep)
        todo.remove(current[0])
    if progress:
        print("most frequent refusals:", file=sys.stderr)
        for reason, n in sorted(refusals.items(), key=lambda kv: -kv[1])[:15]:
            print(f"  {n:5d}  {reason}", file=sys.stderr)
    return outcomes, findings


def _reason(message: str) -> str:
    """A refusal message with paths and numbers taken out, to count refusals by kind."""
    import re

    message = re.sub(r"'[^']*\.gguf'", "FILE", message.removeprefix("slicemoe: error: "))
    return re.sub(r"\d+", "N", message)[:150]


def _keep(sources: list[Path], seed: int, case: int, keep: Path | None, sweep: bool) -> None:
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        source, index = _source_of(sources, case, sweep)
        case_file(source, seed, index, keep / f"{'sweep' if sweep else f'seed{seed}'}-case{case}.gguf", sweep)


def default_sources() -> list[Path]:
    from slicemoe_gguf.embedded import embedded_gguf

    return [embedded_gguf(progress=False), embedded_gguf(experts="q8_0", progress=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", type=Path,
                        help="a GGUF to mutate (repeatable); default: the embedded model, sliced and q8_0")
    parser.add_argument("--cases", type=int, default=200, help="number of mutated files (default 200)")
    parser.add_argument("--first", type=int, default=0, help="first case number (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutations (default 0)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a run may take (default 60)")
    parser.add_argument("--keep", type=Path, default=Path("fuzz-findings"),
                        help="where mutated files of findings are written (default fuzz-findings/)")
    parser.add_argument("--sweep", action="store_true",
                        help="instead of random mutations, every integer hyperparameter of each model at each "
                             "boundary value (--cases is then ignored: all of them run)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cases-list", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sources = args.model or default_sources()
    if args.worker:
        _worker(sources, args.seed, [int(c) for c in args.cases_list.split(",")], args.scratch, args.report_fd, args.sweep)
        return 0
    if args.sweep:
        args.first, args.cases = 0, n_sweep_cases(sources)
    started = time.monotonic()
    outcomes, findings = fuzz(sources, args.seed, range(args.first, args.first + args.cases), timeout=args.timeout,
                          keep=args.keep, progress=True, sweep=args.sweep)
    for f in findings:
        print(f"case {f.case} ({f.run}): {f.problem}\n    {f.what}")
    print(f"{args.cases} mutated files, {sum(outcomes.values()) + len(findings)} runs in "
          f"{time.monotonic() - started:.0f} s: {outcomes.get('ok decoded', 0)} decoded, "
          f"{outcomes.get('ok refused', 0)} refused with a clear error, {len(findings)} finding(s)")
    return min(len(findings), 100)


if __name__ == "__main__":
    sys.exit(main())
