"""Checkpoints shaped as the published ones convert, load and reproduce transformers.

Each fixture keeps its published config.json field for field (scripts/published_configs.py) with
only sizes shrunk: padded vocabularies (50304 rows for 50280 OLMoE tokens, 151936 for 151646 /
151669 Qwen tokens, 102400 for DeepSeek's), YaRN rope, shared experts and their gate, a dense first
layer, qk-norm, head_dim above hidden / heads. transformers writes each twice: save_pretrained's
published per-expert names, and the model's own in-memory state dict (fused experts). The reference
for every value is transformers itself.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import convert, hf_greedy, run_json

from slicemoe_gguf.model_info import read_header

pytestmark = pytest.mark.slow   # the fast tier (pytest -m 'not slow') leaves it out

ARCHS = ["olmoe", "qwen2_moe", "deepseek_v2", "mixtral", "qwen3_moe"]
LAYOUTS = ["save_pretrained", "state_dict"]
PROMPT = "Once upon a time there was a small village"
F32_FIDELITY = 1e-3   # largest logit difference over the largest logit, f32 conversion vs transformers
TEXTS = [PROMPT, "Hello wörld 123!", " two  spaces", "fish, sea and stars!\nnew line", "naïve café — ok?",
         "1234567 apples, 89 pears"]


def _tokenizer_size(hf_dir) -> int:
    tok = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    return max([*tok["model"]["vocab"].values(), *(a["id"] for a in tok["added_tokens"])]) + 1


@pytest.mark.parametrize("arch", ARCHS)
def test_fixtures_keep_the_published_quirks(arch, tiny_checkpoints):
    """The fixtures are what the tests below claim: padded vocabulary, both tensor layouts."""
    from safetensors import safe_open

    per_expert, fused = tiny_checkpoints(arch), tiny_checkpoints(arch, "state_dict")
    config = json.loads((per_expert / "config.json").read_text())
    published_rows = {"olmoe": 50304, "qwen2_moe": 151936, "deepseek_v2": 102400, "mixtral": 32000,
                      "qwen3_moe": 151936}[arch]
    assert config["vocab_size"] == published_rows > _tokenizer_size(per_expert)
    with safe_open(per_expert / "model.safetensors", "np") as f:
        assert any(".experts.0." in k for k in f.keys())
    with safe_open(fused / "model.safetensors", "np") as f:
        assert not any(".experts.0." in k for k in f.keys())
        assert any(k.endswith("experts.gate_up_proj") for k in f.keys())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_f32_conversion_matches_transformers(arch, layout, tiny_checkpoints, tmp_path):
    hf_dir = tiny_checkpoints(arch, layout)
    out = tmp_path / "f32.gguf"
    proc = convert(hf_dir, out, "--experts", "f32", "--dense-type", "f32")
    assert proc.returncode == 0, proc.stderr
    n = 8
    logits_path = tmp_path / "logits.npy"
    result = run_json("run", "-m", str(out), "-p", PROMPT, "-n", str(n), "--ignore-eos", "--json",
                      "--logits-out", str(logits_path))
    # the reference always loads the save_pretrained copy: the same weights, transformers' own reader
    hf_tokens, hf_logits = hf_greedy(tiny_checkpoints(arch), result["prompt_tokens"], n)
    assert result["tokens"] == hf_tokens
    # within 1e-3 of the largest logit: measured 7.6e-4 (qwen2_moe) to 9.5e-4 (mixtral), which is
    # llama.cpp's f16 KV cache; a wrong tensor or hyperparameter is 10x that
    logits = np.load(logits_path)
    assert np.abs(logits - hf_logits).max() <= F32_FIDELITY * np.abs(hf_logits).max()


def test_an_all_zero_shared_expert_gate_scales_the_shared_expert_by_one_half(tiny_checkpoints, tmp_path):
    """Qwen1.5-MoE scales its shared expert by sigmoid(gate . x). A gate of zeros (zero-initialized,
    or pruned) scales it by 0.5; upstream llama.cpp computed that sigmoid as silu(x) / x, 0 / 0 there,
    and every logit was NaN (patch 0006)."""
    import torch
    import transformers

    source = tiny_checkpoints("qwen2_moe")
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    gates = [p for name, p in model.named_parameters() if name.endswith("shared_expert_gate.weight")]
    assert gates
    with torch.no_grad():
        for gate in gates:
            gate.zero_()
    hf_dir = tmp_path / "zero-gate"
    model.save_pretrained(hf_dir)
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(hf_dir)
    out = tmp_path / "f32.gguf"
    proc = convert(hf_dir, out, "--experts", "f32", "--dense-type", "f32")
    assert proc.returncode == 0, proc.stderr
    logits_path = tmp_path / "logits.npy"
    result = run_json("run", "-m", str(out), "-p", PROMPT, "-n", "4", "--ignore-eos", "--json",
                      "--logits-out", str(logits_path))
    hf_tokens, hf_logits = hf_greedy(hf_dir, result["prompt_tokens"], 4)
    logits = np.load(logits_path)
    assert np.isfinite(logits).all()
    assert result["tokens"] == hf_tokens
    assert np.abs(logits - hf_logits).max() <= F32_FIDELITY * np.abs(hf_logits).max()


@pytest.mark.parametrize("arch", ARCHS)
def test_amat_conversion_of_both_layouts_is_the_same_file_content(arch, tiny_checkpoints, tmp_path):
    outs = []
    for layout in LAYOUTS:
        outs.append(tmp_path / f"{layout}.gguf")
        proc = convert(tiny_checkpoints(arch, layout), outs[-1])
        assert proc.returncode == 0, proc.stderr
    (_, a), (_, b) = (read_header(p) for p in outs)
    assert [(t.name, t.shape) for t in a] == [(t.name, t.shape) for t in b]
    data = [p.read_bytes() for p in outs]
    for ta, tb in zip(a, b):
        assert data[0][ta.offset:ta.offset + ta.n_bytes] == data[1][tb.offset:tb.offset + tb.n_bytes], ta.name
    result = run_json("run", "-m", str(outs[0]), "-p", PROMPT, "-n", "4", "--ignore-eos", "--json",
                      "--cache-budget", "50%")
    assert result["n_decode"] == 4 and result["cache"]["misses"] > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_tokenization_and_special_tokens_match_transformers(arch, tiny_checkpoints, tmp_path):
    import transformers

    from slicemoe_gguf import Model

    hf_dir = tiny_checkpoints(arch)
    out = tmp_path / "m.gguf"
    assert convert(hf_dir, out, "--experts", "q8_0").returncode == 0
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    fields, _ = read_header(out)
    config = json.loads((hf_dir / "config.json").read_text())
    assert fields["tokenizer.ggml.eos_token_id"] == hf.eos_token_id
    if hf.chat_template:
        assert fields["tokenizer.chat_template"] == hf.chat_template
    # BOS follows tokenizer_config.json's add_bos_token, as llama.cpp's converter and transformers 4
    # read it (DeepSeek's tokenizer.json leaves adding BOS to that flag, which transformers 5's
    # generic backend ignores); the text's own tokens must match transformers exactly.
    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    bos = [hf.bos_token_id] if tokenizer_config.get("add_bos_token") else []
    with Model(out) as model:
        assert model.n_vocab == config["vocab_size"]
        for text in TEXTS:
            assert model.tokenize(text) == bos + hf.encode(text, add_special_tokens=False), text


def test_a_file_llama_cpp_would_refuse_is_not_written(tiny_checkpoints, tmp_path):
    """A config.json that disagrees with its weights (head_dim edited) converts tensor by tensor,
    but llama.cpp would reject the shapes: the converter says so and leaves nothing behind."""
    import shutil

    hf = tmp_path / "hf"
    shutil.copytree(tiny_checkpoints("qwen3_moe"), hf)
    config = json.loads((hf / "config.json").read_text())
    config["head_dim"] = 16
    (hf / "config.json").write_text(json.dumps(config))
    out = tmp_path / "o.gguf"
    proc = convert(hf, out)
    assert proc.returncode == 1
    assert "would not load in llama.cpp" in proc.stderr and "attn_q" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".o.gguf.*"))


def test_the_converter_is_installed_under_our_own_name():
    from importlib import metadata

    import slicemoe_convert.cli   # noqa: F401

    top_level = {f.parts[0] for f in metadata.files("slicemoe-gguf") if f.suffix == ".py"}
    assert "convert" not in top_level and {"slicemoe_convert", "slicemoe_gguf"} <= top_level
