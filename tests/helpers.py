"""Helpers the tests share: tiny checkpoints, reference conversion and evaluation, the CLI."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # dataclasses look their module up there
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


def rss_anon_bytes(pid: int | str = "self") -> int:
    """A process's anonymous resident memory (RssAnon of /proc/PID/status), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["RssAnon"].split()[0]) * 1024


def run_json(*args: str) -> dict:
    return json.loads(run_cli(*args).stdout)


def rewrite_checkpoint(src: Path, dst: Path, *, shards: int = 1) -> Path:
    """Copy a checkpoint (to edit it), optionally re-sharded into `shards` files with a
    model.safetensors.index.json as published checkpoints are. Tensors keep their names."""
    import shutil

    import numpy as np
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, dst / "model.safetensors")
    else:
        weight_map = {}
        for i, chunk in enumerate(np.array_split(np.array(names, dtype=object), shards)):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: tensors[k].contiguous() for k in chunk}, dst / fname)
            weight_map.update({k: fname for k in chunk})
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def convert(hf_dir: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["slicemoe-convert", str(hf_dir), "-o", str(out), "-q", *args],
                          capture_output=True, text=True, timeout=600)


def gguf_dequantize(tensor):
    """float32 values of a tensor read by gguf.GGUFReader, decoded by gguf-py itself."""
    import gguf
    import numpy as np

    return gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).astype(np.float32)


def hf_logits_with_gguf_experts(hf_dir: Path, gguf_path: Path, precision: str, tokens: list[int], n_prompt: int,
                                return_margins: bool = False):
    """Teacher-forced transformers logits [len(tokens) - n_prompt + 1, n_vocab] of the model whose
    routed experts are replaced by the AMAT slices stored in gguf_path, dequantized by gguf-py (an
    implementation independent of ours): MSB + LSB for precision "high", MSB only for "low".
    With return_margins, also each position's routing margin (_routing_margins)."""
    import gguf
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    tensors = {t.name: t for t in gguf.GGUFReader(gguf_path).tensors}

    def experts(layer: int, proj: str) -> torch.Tensor:
        msb = tensors[f"blk.{layer}.ffn_{proj}_exps.weight"]
        shape = tuple(int(d) for d in reversed(msb.shape))
        w = gguf_dequantize(msb).reshape(shape)
        if precision == "high":
            w = w + gguf_dequantize(tensors[f"blk.{layer}.ffn_{proj}_exps.lsb"]).reshape(shape)
        return torch.from_numpy(w)

    with torch.no_grad():
        for layer in range(model.config.num_hidden_layers):
            if f"blk.{layer}.ffn_up_exps.weight" not in tensors:
                continue
            prefix = f"model.layers.{layer}.mlp.experts"
            params[f"{prefix}.gate_up_proj"].copy_(torch.cat([experts(layer, "gate"), experts(layer, "up")], dim=1))
            params[f"{prefix}.down_proj"].copy_(experts(layer, "down"))
        out = model(torch.tensor([tokens]), output_router_logits=True)
    logits = out.logits[0][n_prompt - 1:].float().numpy()
    if not return_margins:
        return logits
    return logits, _routing_margins(out, model.config, len(tokens))[n_prompt - 1:]


def _routing_margins(out, config, n_tokens: int):
    """Per position, the smallest gap over MoE layers between the router probabilities of the k-th
    and the (k+1)-th expert: near 0, a rounding difference can pick another expert (a routing flip),
    which no tolerance on the logits should have to absorb. +inf where the model reports no router
    logits."""
    import numpy as np
    import torch

    margins = np.full(n_tokens, np.inf)
    k = config.num_experts_per_tok
    for router in getattr(out, "router_logits", None) or ():
        if router is None:
            continue
        probs = torch.softmax(router.reshape(n_tokens, -1).float(), dim=-1).sort(dim=-1, descending=True).values
        margins = np.minimum(margins, (probs[:, k - 1] - probs[:, k]).numpy())
    return margins


class Server:
    """`slicemoe serve` running on 127.0.0.1 (a real process, a real port): .base is its URL, .proc
    the process, .log its output so far. `launcher` is the command that runs the CLI (the arm64 tier
    runs it under emulation)."""

    def __init__(self, model: Path, workdir: Path, *flags: str, launcher: tuple[str, ...] = ("slicemoe",),
                 env: dict | None = None, start_timeout: float = 60):
        import socket
        import time
        import urllib.request

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log_path = workdir / f"serve-{self.port}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([*launcher, "serve", "-m", str(model), "--port", str(self.port), *flags],
                                     stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir, env=env)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                urllib.request.urlopen(self.base + "/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"slicemoe serve did not start:\n{self.log}") from None
                time.sleep(0.2)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, sig: int | None = None) -> int:
        """Sends `sig` (default SIGINT, Ctrl-C) and returns the exit status."""
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGINT)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self._log.close()
