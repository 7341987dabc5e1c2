"""`slicemoe info`, `inspect`, `run`, `trace`, `serve` and `chat`: the commands that load a model,
and the helpers the other commands share (budgets, traces, the modelled energy)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import defaults
from ._native import SliceMoEError
from .units import format_size, parse_size


def cmd_info(args: argparse.Namespace) -> int:
    from .runtime import library_info

    info = library_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"slicemoe-gguf   {info['version']} (native {info['native_version']})")
    print(f"llama.cpp       {info['llama_cpp']}")
    print(f"library         {info['library']}")
    print("devices         " + ", ".join(f"{d['name']} ({d['description']})" for d in info["devices"]))
    print(f"cpu features    {info['system_info']}")
    print(f"expert product  {info['product_kernel']} (the fused MSB + LSB kernel decode runs)")
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    from .cache_params import range_text, settings

    table = settings()
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print("| setting | flag | override | environment | values | default | what it does |")
    print("|---|---|---|---|---|---|---|")
    for name, setting in table.items():
        values = {"size": "bytes, 2GiB, 40%", "flag": "true / false",
                  "choice": " / ".join(setting["choices"]),
                  "number": range_text(setting)}
        default = setting["default"]
        default = {"size": "0 (no cache)" if default == 0 else f"{default} B",
                   "flag": str(default).lower()}.get(setting["kind"], f"{default:g}" if isinstance(default, float) else default)
        flag = f"`{setting['flag']}`" if setting["flag"] else "`slicemoe trace`"
        print(f"| {name} | {flag} | `slicemoe.{name}` | `SLICEMOE_{name.upper()}` | {values[setting['kind']]} | "
              f"{default} | {setting['help']} |")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .model_info import describe

    try:
        info = describe(args.model)
    except FileNotFoundError:
        raise SliceMoEError(f"cannot open '{args.model}': No such file or directory", 2) from None
    except ValueError as exc:
        raise SliceMoEError(str(exc), 3) from exc
    from .memory import plan

    if args.cache_budget is not None and not info["sliced"]:
        raise SliceMoEError(f"'{args.model}' is not a sliced (AMAT) model: a slice cache needs a file written by "
                            "slicemoe-convert --experts amat", 1)
    budget = _cache_budget(args)
    memory = plan(args.model, n_ctx=args.ctx_size, n_batch=args.batch_size, cache_budget=budget)
    info["memory"] = {**memory.as_dict(), "n_ctx": args.ctx_size, "cache_budget_bytes": budget}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    mib = lambda n: f"{n / 2**20:.2f} MiB"  # noqa: E731
    print(f"{info['path']}: {info['architecture']} '{info['name']}', {mib(info['file_bytes'])}")
    print(f"layers {info['n_layers']}, MoE layers {len(info['moe_layers'])}, experts {info['n_experts']}, "
          f"top-k {info['top_k']}")
    if info["sliced"]:
        print(f"AMAT slices ({info['grid']} grid): MSB {mib(info['expert_msb_bytes'])}, LSB {mib(info['expert_lsb_bytes'])}; "
              f"other tensors {mib(info['other_bytes'])}")
        print("layer  MSB/expert  LSB/expert  MSB total   LSB total")
        for p in info["layers"]:
            print(f"{p['layer']:5d}  {p['msb_bytes_per_expert']:8d} B  {p['lsb_bytes_per_expert']:8d} B  "
                  f"{mib(p['msb_bytes']):>10s}  {mib(p['lsb_bytes']):>10s}")
        for key, value in info["slicemoe"].items():
            print(f"{key} = {value}")
    else:
        print(f"plain expert tensors {mib(info['expert_msb_bytes'])} (not sliced); "
              f"other tensors {mib(info['other_bytes'])}")
    experts = f"slice pools (budget {format_size(budget)})" if budget else "mapped experts (no cache)"
    print(f"resident memory at -c {args.ctx_size}: {memory.describe(experts)}")
    return 0


def _read_prompt(args: argparse.Namespace) -> str:
    if args.file is not None:
        try:
            return Path(args.file).read_text(encoding="utf-8")
        except OSError as exc:
            raise SliceMoEError(f"cannot read prompt file '{args.file}': {exc.strerror}", 2) from exc
    return args.prompt


def _cache_budget(args: argparse.Namespace) -> int:
    """--cache-budget in bytes; a percentage is of all routed-expert slice bytes of the file, and
    "auto" is what fits the memory available now (memory.auto_budget)."""
    if args.cache_budget is None:
        return 0
    if args.cache_budget.strip().lower() == "auto":
        from .memory import auto_budget

        margin = None if args.ram_margin is None else _parse_size_arg("--ram-margin", args.ram_margin)
        budget, how = auto_budget(args.model, n_ctx=args.ctx_size, n_batch=args.batch_size, margin=margin)
        print(f"cache budget auto: {format_size(budget)} = {how}", file=sys.stderr)
        return budget
    total = None
    if args.cache_budget.strip().endswith("%"):
        from .model_info import describe

        try:
            info = describe(args.model)
        except (OSError, ValueError) as exc:
            raise SliceMoEError(f"cannot read '{args.model}': {exc}", 3) from exc
        total = info["expert_msb_bytes"] + info["expert_lsb_bytes"]
    budget = _parse_budget(args.cache_budget, total)
    if budget <= 0:
        raise SliceMoEError("--cache-budget must be more than 0 bytes", 1)
    return budget


def _process_memory() -> dict:
    """This process's resident set now (anonymous and file-backed) and at its peak, in bytes,
    from /proc/self/status."""
    import re

    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return {}
    found = {k: int(v) * 1024 for k, v in re.findall(r"(VmRSS|VmHWM|RssAnon|RssFile):\s+(\d+) kB", status)}
    # anonymous memory (pools, KV cache, buffers) is what the run holds; file-backed pages are the
    # mapped model, which the kernel can drop and read again
    return {"rss_bytes": found.get("VmRSS"), "peak_rss_bytes": found.get("VmHWM"),
            "rss_anon_bytes": found.get("RssAnon"), "rss_file_bytes": found.get("RssFile")}


def _msb_slice_bytes(model_path: str) -> int:
    from .model_info import describe

    return describe(model_path)["msb_slice_bytes"]


# a prompt for --route-trace runs: its text does not matter, the trace routes every token
ROUTE_PROMPT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on in the sun."


def _read_route(args: argparse.Namespace):
    """The request of --route-trace to force, or None."""
    if not args.route_trace:
        return None
    from .trace import TraceError, request_route

    try:
        return request_route(_read_trace(args.route_trace), args.request)
    except TraceError as exc:
        raise SliceMoEError(f"{args.route_trace}: {exc}", 3) from exc


def cmd_run(args: argparse.Namespace) -> int:
    from .runtime import Model, Sampling

    route = _read_route(args)
    text = _read_prompt(args) if route is None or args.prompt or args.file else ROUTE_PROMPT
    profiles = _profiles(args)
    sampling = Sampling(temperature=args.temp, top_p=args.top_p, seed=args.seed)
    budget = _cache_budget(args)
    from ._native import lib

    lib()   # the library and its backends (a Vulkan driver maps ~70 MB) are not the model's memory
    rss_before_load = _process_memory().get("rss_bytes")
    load_start = time.perf_counter()
    with Model(args.model, n_gpu_layers=args.gpu_layers, n_ctx=args.ctx_size, n_batch=args.batch_size,
               n_threads=args.threads, cache_budget=budget, forced_routes=route is not None,
               **_model_settings(args), **_cache_settings(args)) as model:
        load_ms = 1000 * (time.perf_counter() - load_start)
        from .memory import plan_of_running

        memory = plan_of_running(model)
        prompt = model.chat_tokens([{"role": "user", "content": text}]) if args.chat else model.tokenize(text)
        if route is not None:
            # the routing is the trace's: the prompt only has to have its length, and decode runs
            # exactly the trace's decode steps
            model.force_routes(route.experts, route.weights, n_experts=route.n_experts)
            prompt = (prompt * (route.n_prompt // max(len(prompt), 1) + 1))[:route.n_prompt]
            args.n_predict, args.ignore_eos = route.n_decode + 1, True
        if not args.json:
            print(f"memory: {memory.describe('slice pools' if model.has_cache else 'mapped experts')}",
                  file=sys.stderr)
        if args.json or args.logits_out:
            result = model.generate(prompt, args.n_predict, sampling, keep_logits=bool(args.logits_out),
                                    stop_at_eog=not args.ignore_eos)
        else:
            # Stream text as it is produced; decode whole prefixes so multi-byte characters that
            # span tokens come out intact.
            tokens: list[int] = []
            shown = ""
            for token, _ in model.stream(prompt, args.n_predict, sampling, stop_at_eog=not args.ignore_eos):
                tokens.append(token)
                text = model.detokenize(tokens)
                if not text.endswith("\ufffd"):
                    sys.stdout.write(text[len(shown):])
                    sys.stdout.flush()
                    shown = text
            prefill_ms, decode_ms = model.timings()
            steps = max(len(tokens) - 1, 1)
            print(f"\n\nprefill: {prefill_ms:.1f} ms, decode: {decode_ms / steps:.2f} ms/token "
                  f"({len(tokens)} tokens)", file=sys.stderr)
            cache = model.cache_stats()
            if cache:
                uses = cache["hits"] + cache["misses"]
                print(f"cache: pools {format_size(cache['pool_bytes'])} of {format_size(cache['budget_bytes'])} "
                      f"budget, {cache['hits']} hits, {cache['misses']} misses "
                      f"({100 * cache['misses'] / max(uses, 1):.1f}% of slice uses), "
                      f"{format_size(cache['flash_bytes'] / max(cache['decode_tokens'], 1))}/token from flash, "
                      f"{cache['io_ms']:.1f} ms blocked on reads", file=sys.stderr)
                if cache["load_flash_bytes"]:
                    print(f"cache: every slice read at load ({format_size(cache['load_flash_bytes'])} in "
                          f"{cache['load_io_ms']:.0f} ms), not counted above", file=sys.stderr)
                if cache.get("io_note"):
                    print(f"cache: {cache['io_note']}", file=sys.stderr)
                compute_ms = max(decode_ms - cache["io_ms"], 0.0) / steps
                _print_modelled(_modelled(cache, profiles, _msb_slice_bytes(args.model), compute_ms), profiles,
                                "(expert traffic and MACs; the latency adds this machine's compute)")
            return 0
        cache = model.cache_stats()
        measured = _process_memory()   # while the model is loaded
    if args.logits_out:
        np.save(args.logits_out, result.logits.astype(np.float32))
    if args.json:
        print(json.dumps({
            "text": result.text,
            "prompt_tokens": result.prompt_tokens,
            "tokens": result.tokens,
            "n_prompt": result.n_prompt,
            "n_decode": result.n_decode,
            "load_ms": round(load_ms, 1),
            "prefill_ms": round(result.prefill_ms, 3),
            "decode_ms_per_token": round(result.decode_ms_per_token, 3),
            **({"cache": cache} if cache else {}),
            **({"route_trace": {"path": args.route_trace, "request": route.request, "n_prompt": route.n_prompt,
                                "n_decode": route.n_decode}} if route is not None else {}),
            "memory": {**memory.as_dict(), **measured, "rss_before_load_bytes": rss_before_load},
            **({"modelled": _modelled(cache, profiles, _msb_slice_bytes(args.model),
                                      max(result.decode_ms_per_token - cache["io_ms"] / max(cache["decode_tokens"], 1), 0.0))}
               if cache else {}),
        }))
    else:
        print(result.text)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from .runtime import Model, Sampling

    if args.file is not None:
        try:
            prompts = [line for line in Path(args.file).read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as exc:
            raise SliceMoEError(f"cannot read prompt file '{args.file}': {exc.strerror}", 2) from exc
    else:
        prompts = [args.prompt]
    if not prompts:
        raise SliceMoEError("no prompts: the prompt file has no non-empty line", 1)
    budget = _cache_budget(args)
    # the run that `slicemoe run` with these flags would make (greedy), recorded
    with Model(args.model, n_gpu_layers=args.gpu_layers, n_ctx=args.ctx_size, n_batch=args.batch_size,
               n_threads=args.threads, record_trace=True, cache_budget=budget, **_model_settings(args),
               **_cache_settings(args)) as model:
        for prompt in prompts:
            model.generate(prompt, args.n_predict, Sampling(), stop_at_eog=not args.ignore_eos)
        trace = model.routing_trace()
    trace.write(args.output)
    decode = int((trace.phase == 1).sum())
    print(f"wrote {args.output}: {len(prompts)} request(s), {len(trace)} routing records "
          f"({decode} decode, {len(trace) - decode} prefill) over {trace.header['n_layers']} MoE layers")
    return 0



def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _read_trace(path: str):
    from . import trace as traces

    try:
        return traces.read(path)
    except traces.TraceError as exc:
        raise SliceMoEError(str(exc), 3) from exc


def _parse_budget(text: str, total: int) -> int:
    return _parse_size_arg("--cache-budget", text, total)


def _parse_size_arg(flag: str, text: str, total: int | None = None) -> int:
    try:
        return parse_size(text, total)
    except ValueError as exc:
        raise SliceMoEError(f"{flag}: {exc}", 1) from exc


def _profiles(args: argparse.Namespace) -> list:
    from .energy import DEFAULT_PROFILES, load_profile

    try:
        return [load_profile(p) for p in (args.profile or DEFAULT_PROFILES)]
    except ValueError as exc:
        raise SliceMoEError(str(exc), 1) from exc


def _modelled(stats: dict, profiles: list, msb_slice_bytes: int, compute_ms: float = 0.0) -> dict:
    from .energy import per_token

    return {p.name: per_token(stats, p, msb_slice_bytes, compute_ms) for p in profiles}


def _print_modelled(modelled: dict, profiles: list, what: str) -> None:
    for p in profiles:
        m = modelled[p.name]
        print(f"modelled on {p.name} ({p.description}): {m['energy_mj_per_token']:.4g} mJ/token, "
              f"{m['latency_ms_per_token']:.4g} ms/token {what}", file=sys.stderr)




def _cache_settings(args: argparse.Namespace) -> dict:
    """The policy settings of the shared cache flags, as keyword arguments of Model and replay."""
    settings = {name: getattr(args, name) for name in defaults.CACHE_SETTINGS}
    settings["layer_slots"] = args.layer_slots
    settings["layer_sensitivity"] = args.layer_sensitivity
    settings["layer_high_uses"] = args.layer_high_uses
    return settings


def _model_settings(args: argparse.Namespace) -> dict:
    """The live-only flags (a model runs: no replay has them), as keyword arguments of Model."""
    return {"prefetch": args.prefetch, "io_mode": args.io_mode, "low_precision_prompt": args.low_precision_prompt}




def _open_model(args: argparse.Namespace, n_seq: int = 1):
    from .runtime import Model

    return Model(args.model, n_gpu_layers=args.gpu_layers, n_ctx=args.ctx_size, n_batch=args.batch_size,
                 n_threads=args.threads, cache_budget=_cache_budget(args), n_seq=n_seq, **_model_settings(args),
                 **_cache_settings(args))


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    with _open_model(args, n_seq=args.parallel) as model:
        serve(model, host=args.host, port=args.port, name=args.alias, max_queue=args.max_queue,
              max_wait_s=args.max_wait, release_idle_s=args.release_idle)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .chat import chat

    with _open_model(args) as model:
        return chat(model, max_tokens=args.n_predict, system=args.system,
                    sampling_args=(args.temp, args.top_p, args.seed))
