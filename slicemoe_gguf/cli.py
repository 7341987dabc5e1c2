"""`slicemoe`: run and inspect MoE GGUF models through the slicemoe native engine.

Flags follow llama.cpp's tools (-m, -p, -n, --temp, --seed, -t, -ngl) where they overlap. This
module is the command line's surface (every flag, its default from slicemoe_gguf.defaults, and its
checks); the commands are in cli_run.py (those that load a model), cli_replay.py (sim, plan) and
cli_demo.py.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__, defaults
from ._native import SliceMoEError
from .cli_demo import DEMO_PROMPT, cmd_demo
from .cli_replay import cmd_plan, cmd_sim
from .cli_run import (_float_list, _int_list, cmd_chat, cmd_info, cmd_inspect, cmd_run, cmd_serve, cmd_settings,
                      cmd_trace)


def _add_profile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", action="append", metavar="NAME|FILE.json",
                        help="device profile for the modelled energy and latency (repeatable; default: the "
                             "built-in phone and laptop profiles)")


def _add_cache_arguments(parser: argparse.ArgumentParser, *, live: bool) -> None:
    """The slice-cache flags, one definition for run and trace (live: a model runs) and sim (replay,
    which adds belady and needs a budget); every default comes from slicemoe_gguf.defaults."""
    d = defaults
    cache = parser.add_argument_group("slice cache (sliced models)")
    cache.add_argument("--precision", choices=["auto", "high", "low"], default=d.PRECISION,
                       help="routed experts of a sliced (AMAT) model: high = MSB+LSB slices (8-bit), "
                            "low = MSB slices only (4-bit), auto = per use by the cache policy, high "
                            f"without a cache (default {d.PRECISION}); ignored for stock models")
    if live:
        cache.add_argument("--cache-budget", metavar="SIZE",
                           help="RAM for routed-expert slices: bytes with a unit (512KB, 300MB, 2GiB), a "
                                "percentage of all expert slice bytes (50%%), or auto: the memory available now "
                                "(MemAvailable, or the memory cgroup's free room) less --ram-margin, less the dense "
                                "weights, KV cache and compute buffers. Decode then reads missing slices from the "
                                "file. Default: no cache, every expert mapped from the file")
        cache.add_argument("--ram-margin", metavar="SIZE",
                           help="--cache-budget auto: memory left free for everything else (default: 1 GiB or "
                                "10%% of the available memory, whichever is more)")
    else:
        cache.add_argument("--cache-budget", required=True, metavar="SIZE",
                           help="bytes with a unit (300MB, 2GiB) or a percentage of all slice bytes (50%%)")
    from .cache_params import policies as native_policies
    policies = list(native_policies(live_only=live)) + ([] if live else ["optimal"])
    cache.add_argument("--policy", choices=policies, default=d.POLICY,
                       help="cache policy: dbsc (SliceMoE: bit slices, precision per use), lru8 / "
                            "lfu8 (whole experts at 8 bits, least recently / frequently used out), lru4 "
                            "(MSB slices only: the 4-bit model), hobbit (misses of unimportant experts load "
                            "and run at 4 bits), dymoe (8-bit share falling with depth, --high-ratio), "
                            "cache_prior (dbsc plus cache-aware routing, --prior-lambda; changes outputs), "
                            "adapmoe (8-bit LRU with adaptive gating, --gating-t; changes outputs)"
                            + ("" if live else ", belady (whole experts, farthest next use out: the offline "
                                                "optimum of whole-expert caching), optimal (the offline optimum "
                                                "of any slice cache of the budget, serving the precision "
                                                "--precision asks for; prints every policy against it)")
                            + f" (default {d.POLICY})")
    cache.add_argument("--warmup", choices=["pcw", "none"], default=d.WARMUP,
                       help="pcw: load the slices the prompt used most before the first decode token "
                            f"(default {d.WARMUP})")
    cache.add_argument("--high-threshold", type=float, default=d.HIGH_THRESHOLD, metavar="W",
                       help="auto precision: a use runs at 8 bits if its routing weight is >= W; the "
                            f"top-ranked expert always does (default {d.HIGH_THRESHOLD})")
    cache.add_argument("--max-miss-rate", type=float, default=d.MAX_MISS_RATE, metavar="R",
                       help="auto precision: adapt the threshold at run time to keep the slice miss rate "
                            "near R (e.g. 0.05); default 0 = fixed threshold")
    cache.add_argument("--msb-share", type=float, default=d.MSB_SHARE, metavar="F",
                       help="a fixed share of each layer's budget for MSB slots, the rest for LSB slots; "
                            "default 0 = dbsc's adaptive split (one set of slots for both kinds), two thirds for "
                            "hobbit, dymoe and cache_prior")
    cache.add_argument("--high-ratio", type=float, default=d.HIGH_RATIO, metavar="F",
                       help="dymoe: share of a token's uses at 8 bits in the first MoE layer, falling by a half "
                            "cosine to 0 at the last (default 0 = 0.5)")
    cache.add_argument("--prior-lambda", type=float, default=d.PRIOR_LAMBDA, metavar="L",
                       help="cache_prior: bias of a cached expert's router logit, in mean logit ranges "
                            f"(default {d.PRIOR_LAMBDA}; 0 = the model's own routing)"
                            + ("" if live else "; replay re-picks the experts from the trace's router logits, "
                                               "which a trace recorded under cache_prior has"))
    cache.add_argument("--gating-t", type=float, default=d.GATING_T, metavar="T",
                       help="adapmoe: drop a use after the first when its routing weight < sqrt(T) "
                            f"(default {d.GATING_T}, i.e. weights below {d.GATING_T ** 0.5:g}; 0 = never, exactly lru8)")
    cache.add_argument("--lsb-background", action="store_true", default=d.LSB_BACKGROUND,
                       help="an 8-bit use whose MSB slice is resident and whose LSB slice is not runs at 4 bits, "
                            "and the LSB slice is read while the token goes on, for the layer's next token: no "
                            "decode step waits for a read that only refines precision (a use that waits for its "
                            "MSB slice reads both; off by default: the use loses its 8 bits once)")
    cache.add_argument("--layer-slots", type=_int_list, metavar="N,N,...",
                       help="whole-expert policies: slots per MoE layer (slicemoe plan --per-layer finds them); "
                            "default: an equal share of the budget")
    cache.add_argument("--layer-sensitivity", type=_float_list, metavar="S,S,...",
                       help="adapmoe: calibrated sensitivity S_l per MoE layer (a use is dropped when its weight < "
                            "sqrt(T / S_l); scripts/calibrate_policies.py measures them); default: 1 for every layer")
    cache.add_argument("--layer-high-uses", type=_int_list, metavar="N,N,...",
                       help="dymoe: how many best-ranked uses run at 8 bits in each MoE layer (calibrated by "
                            "scripts/calibrate_policies.py); default: the cosine depth schedule of --high-ratio")
    if live:
        cache.add_argument("--prefetch", action="store_true", default=d.PREFETCH,
                           help="look-ahead prefetch: apply the next MoE layer's router to this layer's input and "
                                "load its predicted MSB slices on an I/O thread while this layer computes (off "
                                "by default: see docs/design.md for the measurement)")
        cache.add_argument("--low-precision-prompt", action="store_true", default=d.LOW_PRECISION_PROMPT,
                           help="a prompt's expert products read the MSB slices only (4 bits), but for its last "
                                "token's, whose row the next token comes from: a first prompt reads about half the "
                                "expert bytes and its first token comes sooner; decode keeps the policy's precision "
                                "(off by default: the whole prompt at 8 bits; docs/measuring.md gives what it costs "
                                "in accuracy)")
        cache.add_argument("--io", choices=["auto", "direct", "buffered"], default=d.IO_MODE, dest="io_mode",
                           help="how misses are read: direct (O_DIRECT, no page-cache copy), buffered (pread, then "
                                "dropped from the page cache) or auto, direct where the file system has it "
                                f"(default {d.IO_MODE}), once a direct read at load has matched a buffered one; "
                                "--json says which ran (cache.io_mode) and why auto fell back (cache.io_note)")




def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slicemoe",
        description="Run Mixture-of-Experts GGUF models with the slicemoe llama.cpp engine.")
    parser.add_argument("--version", action="version", version=f"slicemoe-gguf {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show llama.cpp's log on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="versions, compute devices, CPU features, library path",
                          description="Print the package and pinned llama.cpp versions, the compute "
                                      "devices ggml found, the CPU features compiled in, and the library path.")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    settings = sub.add_parser("settings", help="the engine's settings: flags, overrides, variables, ranges",
                              description="Print the engine's one table of settings: each one's CLI flag, its "
                                          "slicemoe.* key-value override and SLICEMOE_* variable (a load through "
                                          "llama.cpp's own entry points, as llama-cpp-python does), its values "
                                          "and what it does.")
    settings.add_argument("--json", action="store_true", help="print one JSON object")
    settings.set_defaults(func=cmd_settings)

    inspect = sub.add_parser("inspect", help="architecture, experts and slice sizes of a GGUF",
                             description="Describe a GGUF: architecture, layers, experts, top-k, AMAT slice "
                                         "bytes per expert and per layer, totals, slicemoe.* metadata. For a "
                                         "stock file the whole expert tensors are reported as msb bytes. Also "
                                         "the resident memory a run implies: dense weights + slice pools (or "
                                         "all experts without a cache) + KV cache + compute buffers, as "
                                         "llama.cpp sizes them.")
    inspect.add_argument("model", help="path to a .gguf file")
    inspect.add_argument("--cache-budget", metavar="SIZE",
                         help="the budget to state memory for (as slicemoe run: size, %%, or auto)")
    inspect.add_argument("--ram-margin", metavar="SIZE", help="with --cache-budget auto (as slicemoe run)")
    inspect.add_argument("-c", "--ctx-size", type=int, default=defaults.N_CTX,
                         help=f"context length (default {defaults.N_CTX})")
    inspect.add_argument("-b", "--batch-size", type=int, default=defaults.N_BATCH,
                         help=f"prompt batch (default {defaults.N_BATCH})")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(func=cmd_inspect)

    run = sub.add_parser("run", help="generate text from a prompt",
                         description="Evaluate a prompt and decode tokens. Works on any llama.cpp GGUF.")
    _add_model_arguments(run)
    source = run.add_mutually_exclusive_group()
    source.add_argument("-p", "--prompt", help="prompt text (required unless --route-trace)")
    source.add_argument("-f", "--file", help="read the prompt from this file")
    run.add_argument("--route-trace", metavar="TRACE.jsonl",
                     help="trace-driven decode: every MoE layer runs the trace's experts and router "
                          "probabilities instead of its router's choice, for one request of the trace, whose "
                          "prompt and decode lengths replace the prompt's and -n (the prompt text, default a "
                          "fixed one, is repeated or cut to the trace's length). The trace's MoE layer count, "
                          "expert count and top-k must be the model's. Works on stock models too")
    run.add_argument("--request", type=int, metavar="N",
                     help="with --route-trace: the trace's request number to replay (default its first)")
    run.add_argument("-n", "--n-predict", type=int, default=defaults.N_PREDICT,
                     help=f"tokens to decode (default {defaults.N_PREDICT})")
    run.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1 = off)")
    run.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    _add_cache_arguments(run, live=True)
    run.add_argument("--ignore-eos", action="store_true", help="keep decoding past end-of-generation tokens")
    run.add_argument("--chat", action="store_true",
                     help="the prompt is a user message: apply the model's chat template (chatml if it has "
                          "none), as slicemoe serve's /v1/chat/completions and slicemoe chat do")
    _add_profile_argument(run)
    run.add_argument("--json", action="store_true",
                     help="print one JSON object: text, prompt_tokens, tokens, n_prompt, n_decode, "
                          "prefill_ms, decode_ms_per_token")
    run.add_argument("--logits-out", metavar="FILE.npy",
                     help="save the float32 logits [n_decode, n_vocab] each decoded token was chosen from")
    run.set_defaults(func=cmd_run)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)",
                           description="Serve the model over HTTP with the OpenAI API: /v1/models, /v1/completions "
                                       "and /v1/chat/completions (streaming too), /metrics (Prometheus text). Each "
                                       "response carries its cache counters under \"slicemoe\". --parallel requests "
                                       "decode together; the others wait in arrival order. A parameter the server does not "
                                       "honour (tools, n > 1, ...) is a 400 that names it. SIGTERM or Ctrl-C stops "
                                       "every decode at its next token and exits.")
    _add_model_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    serve.add_argument("--alias", metavar="NAME", help="model id in the API (default: the file name)")
    serve.add_argument("-np", "--parallel", type=int, default=1, metavar="N",
                       help="requests decoded together in one batch per token, the cache serving the union of "
                            "their experts; each gets --ctx-size / N tokens of context (default 1)")
    serve.add_argument("--max-queue", type=int, default=defaults.MAX_QUEUE, metavar="N",
                       help=f"requests that may wait for the model; more get 503 with Retry-After "
                            f"(default {defaults.MAX_QUEUE})")
    serve.add_argument("--max-wait", type=float, default=defaults.MAX_WAIT_S, metavar="SECONDS",
                       help=f"the longest a request waits for the model before a 503 (default {defaults.MAX_WAIT_S} s)")
    serve.add_argument("--release-idle", type=float, default=defaults.RELEASE_IDLE_S, metavar="SECONDS",
                       help="after this long without a request, hand the slice pools' memory back to the system; the "
                            "next request reads its slices again. For a phone, where memory pressure would swap an "
                            "idle server's pools out and fault them back far slower (docs/building.md) "
                            "(default 0: never)")
    _add_cache_arguments(serve, live=True)
    serve.set_defaults(func=cmd_serve)

    chat = sub.add_parser("chat", help="an interactive chat in the terminal",
                          description="Chat with the model in the terminal: its chat template, streamed replies "
                                      "and one line of cache numbers after each. /reset clears the history; "
                                      "Ctrl-C stops a reply; Ctrl-D or Ctrl-C at the prompt exits.")
    _add_model_arguments(chat)
    chat.add_argument("-n", "--n-predict", type=int, default=256, help="most tokens per reply (default 256)")
    chat.add_argument("--system", metavar="TEXT", help="a system message that opens the conversation")
    chat.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default 0)")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1 = off)")
    chat.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    _add_cache_arguments(chat, live=True)
    chat.set_defaults(func=cmd_chat)

    demo = sub.add_parser("demo", help="the embedded Shakespeare MoE under a tight RAM budget: SliceMoE vs lru8",
                          description="Convert the embedded model once (cached), decode a prompt with a tight "
                                      "budget under SliceMoE (dbsc + pcw) and under whole-expert lru8, and print "
                                      "the text with a table of hits, misses, flash traffic, modelled energy and "
                                      "measured ms/token.")
    demo.add_argument("--model-path", action="store_true",
                      help="print the converted GGUF's path (converting it if needed) and exit")
    demo.add_argument("-p", "--prompt", default=DEMO_PROMPT, help="prompt text (default: a line of Romeo)")
    demo.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to decode (default 64)")
    demo.add_argument("--cache-budget", default="25%", metavar="SIZE",
                      help="bytes with a unit or a percentage of all expert slice bytes (default 25%%)")
    demo.add_argument("-t", "--threads", type=int, default=defaults.N_THREADS,
                      help="compute threads (default: one per fast core; every core where they are alike)")
    demo.add_argument("--runs", type=int, default=3,
                      help="runs per policy, alternating; ms/token is their median (default 3)")
    _add_profile_argument(demo)
    demo.set_defaults(func=cmd_demo)

    trace = sub.add_parser("trace", help="record expert routing to a slicemoe-trace JSONL file",
                           description="Run greedy decoding and record, for every MoE layer of every token, "
                                       "the chosen experts and their router probabilities (format in docs/design.md).")
    _add_model_arguments(trace)
    source = trace.add_mutually_exclusive_group(required=True)
    source.add_argument("-p", "--prompt", help="prompt text (one request)")
    source.add_argument("-f", "--file", help="prompts, one request per non-empty line")
    trace.add_argument("-n", "--n-predict", type=int, default=defaults.N_PREDICT,
                       help=f"tokens to decode per request (default {defaults.N_PREDICT})")
    trace.add_argument("-o", "--output", required=True, help="the .jsonl file to write")
    trace.add_argument("--ignore-eos", action="store_true", help="keep decoding past end-of-generation tokens")
    _add_cache_arguments(trace, live=True)
    trace.set_defaults(func=cmd_trace)

    sim = sub.add_parser("sim", help="replay a routing trace through the cache manager (no compute)",
                         description="Drive the native slice cache with a recorded trace: the same policies as "
                                     "slicemoe run, plus belady (the offline optimum).")
    sim.add_argument("trace", help="a slicemoe-trace .jsonl file")
    _add_cache_arguments(sim, live=False)
    _add_profile_argument(sim)
    sim.add_argument("--json", action="store_true",
                     help="one JSON object, with the counter names of slicemoe run --json's cache object")
    sim.set_defaults(func=cmd_sim)

    plan = sub.add_parser("plan", help="a dbsc deployment meeting a miss-rate target, with what it costs in accuracy",
                          description="Miss-rate-constrained deployment on a trace. With --cache-budget and "
                                      "--max-miss-rate: the configuration with the most 8-bit uses (the lowest "
                                      "--high-threshold, else every use at 4 bits) whose slice miss rate meets the "
                                      "target at that budget, with its share of 8-bit uses (and with --accuracy, its "
                                      "KL and top-1 agreement against the 8-bit model on held-out text). With "
                                      "--max-miss-rate alone: the smallest budget (and MSB split) that meets it. With "
                                      "--cache-budget alone: the MSB split with the lowest miss rate at that budget.")
    plan.add_argument("trace", help="a slicemoe-trace .jsonl file")
    plan.add_argument("--max-miss-rate", type=float, metavar="R", help="target slice miss rate, e.g. 0.05")
    plan.add_argument("--cache-budget", metavar="SIZE", help="a fixed budget (bytes with a unit, or %% of slices)")
    plan.add_argument("--accuracy", action="store_true",
                      help="with both targets: measure the answer's KL and top-1 agreement against the 8-bit model "
                           "(teacher-forced, held-out text; see --model and --text)")
    plan.add_argument("-m", "--model", metavar="GGUF",
                      help="--accuracy: the sliced model the trace is of (default: the embedded model)")
    plan.add_argument("--text", metavar="FILE",
                      help="--accuracy: held-out text (default: the embedded model's held-out plays)")
    plan.add_argument("--high-threshold", type=float, default=defaults.HIGH_THRESHOLD, metavar="W",
                      help=f"as slicemoe run (default {defaults.HIGH_THRESHOLD})")
    plan.add_argument("--per-layer", action="store_true",
                      help="with --cache-budget: AdapMoE's DP allocation of whole-expert slots across layers "
                           "(policy lru8 or adapmoe) instead of an MSB share")
    plan.add_argument("--policy", choices=["lru8", "adapmoe"], default="lru8", help="--per-layer only")
    plan.add_argument("--gating-t", type=float, default=defaults.GATING_T, metavar="T",
                      help=f"--per-layer with adapmoe (default {defaults.GATING_T})")
    plan.add_argument("--warmup", choices=["pcw", "none"], default=defaults.WARMUP,
                      help=f"as slicemoe run (default {defaults.WARMUP})")
    _add_profile_argument(plan)
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=cmd_plan)
    return parser




def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and context flags of run, trace, serve and chat."""
    parser.add_argument("-m", "--model", required=True, help="path to a .gguf file (a sliced or a stock model)")
    parser.add_argument("-t", "--threads", type=int, default=defaults.N_THREADS,
                        help="compute threads (default: one per fast core; every core where they are alike)")
    parser.add_argument("-c", "--ctx-size", type=int, default=defaults.N_CTX,
                        help=f"context length in tokens (default {defaults.N_CTX})")
    parser.add_argument("-b", "--batch-size", type=int, default=defaults.N_BATCH,
                        help=f"prompt tokens per llama_decode call (default {defaults.N_BATCH})")
    parser.add_argument("-ngl", "--gpu-layers", type=int, default=0,
                        help="layers to offload to a GPU backend (Vulkan/Metal); -1 = all (default 0)")


def _validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from .cache_params import range_problem, settings
    if args.command in ("run", "trace", "sim", "serve", "chat", "plan"):
        for name, setting in settings().items():   # the ranges of the engine's own table
            value = getattr(args, name, None)
            if setting["kind"] == "number" and value is not None and range_problem(name, value):
                parser.error(range_problem(name, value))
    if args.command in ("trace", "demo") and args.n_predict < 1:
        parser.error("-n/--n-predict must be >= 1")
    if args.command == "demo" and args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.command == "serve" and not 0 <= args.port < 65536:
        parser.error("--port must be in [0, 65535]")
    if args.command == "serve" and (args.max_queue < 0 or not args.max_wait > 0 or not 1 <= args.parallel <= 64
                                    or not args.release_idle >= 0):
        parser.error("--max-queue must be >= 0, --max-wait > 0 (seconds), --parallel in [1, 64] and "
                     "--release-idle >= 0 (seconds)")
    if args.command == "run":
        if args.prompt is None and args.file is None and not args.route_trace:
            parser.error("one of -p/--prompt, -f/--file or --route-trace is required")
        if args.request is not None and not args.route_trace:
            parser.error("--request needs --route-trace")
        if args.route_trace and args.chat:
            parser.error("--route-trace replays a recorded request; it takes no --chat")
    if args.command in ("run", "chat"):
        if args.n_predict < 0:
            parser.error("-n/--n-predict must be >= 0")
        if args.ctx_size < 0 or args.batch_size < 1:
            parser.error("--ctx-size must be >= 0 and --batch-size >= 1")
        if not 0.0 < args.top_p <= 1.0:
            parser.error("--top-p must be in (0, 1]")
        if not 0 <= args.seed < 2**32:
            parser.error("--seed must be in [0, 2^32)")


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()   # the policy choices come from the native library
    except SliceMoEError as exc:
        print(f"slicemoe: error: {exc}", file=sys.stderr)
        return 1
    args = parser.parse_args(argv)
    _validate(args, parser)
    try:
        from ._native import lib
        if args.verbose:
            lib().slicemoe_set_verbose(True)
        return args.func(args)
    except SliceMoEError as exc:
        print(f"slicemoe: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("slicemoe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`slicemoe sim ... | head`): stop quietly, as a Unix filter does, and keep
        # Python from reporting the flush of the closed stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
