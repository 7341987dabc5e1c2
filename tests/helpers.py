"""Helpers the tests share: tiny checkpoints, reference conversion and evaluation, the CLI."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_tiny = _load_script("make_tiny_moe")
make_tiny_moe = _tiny.make_tiny_moe
convert_with_pinned_llama_cpp = _tiny.convert_with_pinned_llama_cpp


def run_cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed `slicemoe` console script; the result has .returncode, .stdout, .stderr."""
    proc = subprocess.run(["slicemoe", *args], capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"slicemoe {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def hf_greedy(hf_dir: Path, prompt_tokens: list[int], n_new: int):
    """Greedy tokens and per-step logits [n_new, n_vocab] from transformers on the same weights."""
    import numpy as np
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_tokens])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                             output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0, eos_token_id=None)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    logits = torch.stack(out.logits, dim=1)[0].float().numpy()
    return tokens, np.asarray(logits)


def run_json(*args: str) -> dict:
    return json.loads(run_cli(*args).stdout)
