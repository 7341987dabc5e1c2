"""`slicemoe-convert HF_DIR -o OUT.gguf`: a Hugging Face MoE checkpoint to GGUF."""

from __future__ import annotations

import argparse
import sys

from slicemoe_gguf import amat

from .architectures import ARCHITECTURES
from .checkpoint import CheckpointError
from .converter import DENSE_MIXES, DENSE_TYPES, EXPERT_TYPES, Converter


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slicemoe-convert",
        description="Convert a Hugging Face MoE checkpoint (safetensors) to GGUF. With --experts amat "
                    "(the default) every routed expert is AMAT-quantized once to 8 bits and stored as two "
                    "nested Q4_1 slices: blk.L.ffn_P_exps.weight (MSB, a 4-bit model by itself) and "
                    "blk.L.ffn_P_exps.lsb (LSB, refines it to 8 bits). Other --experts values write a "
                    "stock llama.cpp GGUF.",
        epilog=f"supported architectures (config.json model_type): {', '.join(sorted(ARCHITECTURES))}")
    parser.add_argument("hf_dir", help="checkpoint directory: config.json, *.safetensors, tokenizer.json")
    parser.add_argument("-o", "--output", required=True, help="the GGUF file to write")
    parser.add_argument("--experts", choices=EXPERT_TYPES, default="amat",
                        help="routed expert encoding (default: amat)")
    parser.add_argument("--grid", choices=amat.GRIDS, default=amat.DEFAULT_GRID,
                        help="AMAT grid of --experts amat (default: %(default)s): searched = each group's 4-bit "
                             "step and offset searched for the least error (MSB slice more accurate than stock "
                             "Q4_1); aligned = Q4_1's own 4-bit levels (faster to convert); paper = the grid of "
                             "arXiv 2512.12990, for reproducing its results (format version 1)")
    parser.add_argument("--dense-type", choices=DENSE_TYPES, default="q8_0",
                        help="attention, embeddings, shared experts (default: q8_0; routers and norms stay "
                             "f32). q4_k_m, q5_k_m, q6_k: the dense tensors as llama.cpp's quantizer makes "
                             "that file type (its per-tensor mix, e.g. a Q6_K output head), the routed "
                             "experts kept as --experts says: a sliced file whose dense part matches the "
                             "stock file of that name")
    parser.add_argument("--tokenizer-pre", metavar="NAME",
                        help="llama.cpp pre-tokenizer name (tokenizer.ggml.pre) when it cannot be detected "
                             "from tokenizer.json, e.g. deepseek-llm")
    parser.add_argument("--dry-run", action="store_true", help="print the tensors and sizes, write nothing")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        conv = Converter(args.hf_dir, experts=args.experts, dense_type=args.dense_type,
                         tokenizer_pre=args.tokenizer_pre, grid=args.grid)
        roles = conv.bytes_by_role()
        if args.dry_run:
            for t in conv.tensors():
                print(f"{t.name:40s} {t.qtype.name:5s} {'x'.join(map(str, reversed(t.shape))):>18s} {_mib(t.nbytes):>12s}")
            print(f"{len(conv.tensors())} tensors, {_mib(sum(roles.values()))} of tensor data "
                  f"({conv.arch.gguf_arch}); nothing written (--dry-run)")
            if args.dense_type in DENSE_MIXES:
                print(f"the F32 dense tensors are then quantized to {args.dense_type.upper()} by llama.cpp's "
                      "quantizer, which chooses each one's type")
            return 0
        summary = conv.write(args.output, force=args.force, progress=not args.quiet)
    except (CheckpointError, ValueError) as exc:   # ValueError: AMAT input checks, which name the tensor
        print(f"slicemoe-convert: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"slicemoe-convert: error: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("slicemoe-convert: interrupted; no output written", file=sys.stderr)
        return 130
    parts = [f"{name} {_mib(n)}" for name, n in sorted(summary.bytes_by_role.items())]
    print(f"wrote {summary.path} ({summary.arch}): {_mib(summary.file_bytes)} in {summary.seconds:.1f} s; "
          + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
