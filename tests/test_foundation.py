"""The foundation: the installed package carries a working native library built from the pinned
llama.cpp, and `slicemoe run` on a stock GGUF reproduces transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import hf_greedy, run_cli, run_json

import slicemoe_gguf
from slicemoe_gguf import Model, Sampling, SliceMoEError

PROMPT = "Once upon a time there was a small village"


def test_info_reports_versions_devices_and_library():
    info = run_json("info", "--json")
    assert info["version"] == slicemoe_gguf.__version__
    assert "0.3.36" in info["llama_cpp"] and "0c1e570" in info["llama_cpp"]
    assert any(d["name"] == "CPU" for d in info["devices"])
    assert Path(info["library"]).is_file()
    assert "AVX" in info["system_info"] or "NEON" in info["system_info"]
    from slicemoe_gguf import kernels   # the kernel decode runs is the best this CPU has
    assert info["product_kernel"] == kernels.available()[-1] == kernels.best()
    assert Path(info["build"]["llama_cpp_source"], "src", "llama-graph.cpp").is_file()


def test_info_human_readable():
    out = run_cli("info").stdout
    assert "llama.cpp" in out and "devices" in out


@pytest.mark.parametrize("arch", ["qwen2_moe", "olmoe"])
@pytest.mark.slow
def test_greedy_run_matches_transformers(arch, tiny_checkpoints, stock_gguf, tmp_path):
    n = 16
    logits_path = tmp_path / "logits.npy"
    result = run_json("run", "-m", str(stock_gguf(arch)), "-p", PROMPT, "-n", str(n), "--temp", "0",
                      "--ignore-eos", "--json", "--logits-out", str(logits_path))

    assert result["n_prompt"] == len(result["prompt_tokens"]) > 0
    assert result["n_decode"] == len(result["tokens"]) == n
    assert result["prefill_ms"] > 0 and result["decode_ms_per_token"] > 0

    hf_tokens, hf_logits = hf_greedy(tiny_checkpoints(arch), result["prompt_tokens"], n)
    assert result["tokens"] == hf_tokens

    logits = np.load(logits_path)
    assert logits.dtype == np.float32 and logits.shape == hf_logits.shape
    # llama.cpp keeps the KV cache in f16; on these weights that moves logits by ~2e-3 at most.
    np.testing.assert_allclose(logits, hf_logits, atol=1e-2, rtol=0)


@pytest.mark.slow
def test_tokenizer_matches_transformers(tiny_checkpoints, stock_gguf):
    import transformers

    hf = transformers.AutoTokenizer.from_pretrained(tiny_checkpoints("qwen2_moe"))
    with Model(stock_gguf("qwen2_moe")) as model:
        for text in [PROMPT, "The quick brown fox jumps over the lazy dog.", "fish, sea and stars!"]:
            ids = model.tokenize(text)
            assert ids == hf.encode(text)
            assert model.detokenize(ids) == text


@pytest.mark.slow
def test_python_api_streams_the_same_tokens_as_generate(stock_gguf):
    with Model(stock_gguf("qwen2_moe")) as model:
        result = model.generate(PROMPT, 8, keep_logits=True, stop_at_eog=False)
        streamed = [token for token, _ in model.stream(PROMPT, 8, stop_at_eog=False)]
        assert streamed == result.tokens
        assert result.logits.shape == (8, model.n_vocab)
        # greedy: each token is the argmax of the logits it was chosen from
        assert list(result.logits.argmax(axis=1)) == result.tokens


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(stock_gguf):
    hot = Sampling(temperature=1.5, seed=42)
    with Model(stock_gguf("qwen2_moe")) as model:
        a = model.generate(PROMPT, 24, hot, stop_at_eog=False).tokens
        b = model.generate(PROMPT, 24, hot, stop_at_eog=False).tokens
        greedy = model.generate(PROMPT, 24, stop_at_eog=False).tokens
        other_seed = model.generate(PROMPT, 24, Sampling(temperature=1.5, seed=7), stop_at_eog=False).tokens
    assert a == b
    assert a != greedy
    assert a != other_seed


def test_bad_calls_raise_errors_and_leave_the_context_usable(stock_gguf):
    with Model(stock_gguf("qwen2_moe"), n_ctx=64) as model:
        with pytest.raises(SliceMoEError, match="outside the vocabulary"):
            model.eval([model.n_vocab + 5])
        with pytest.raises(SliceMoEError, match="no logits"):
            model.logits()
        with pytest.raises(SliceMoEError, match="context full"):
            model.eval([1] * (model.n_ctx + 1))
        model.eval(model.tokenize(PROMPT))
        assert model.logits().shape == (model.n_vocab,)


@pytest.mark.slow
def test_sliced_gguf_with_lsb_tensors_loads_through_the_patch(stock_gguf, tmp_path):
    """native/patches/0001: llama.cpp accepts optional `blk.L.ffn_*_exps.lsb` tensors (a stock
    build rejects the file: "wrong number of tensors"); the stock graph ignores them."""
    import gguf

    src = gguf.GGUFReader(stock_gguf("olmoe"))
    out = tmp_path / "with-lsb.gguf"
    writer = gguf.GGUFWriter(out, arch=src.fields["general.architecture"].contents())
    for field in src.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub)
    n_lsb = 0
    for t in src.tensors:
        data = np.asarray(t.data)
        writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
        if t.name.endswith("_exps.weight"):
            writer.add_tensor(t.name.replace(".weight", ".lsb"), np.full_like(data, 7.0), raw_dtype=t.tensor_type)
            n_lsb += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert n_lsb == 3 * 3  # gate, up, down in each of the 3 MoE layers

    base = run_json("run", "-m", str(stock_gguf("olmoe")), "-p", PROMPT, "-n", "8", "--json", "--ignore-eos")
    sliced = run_json("run", "-m", str(out), "-p", PROMPT, "-n", "8", "--json", "--ignore-eos")
    assert sliced["tokens"] == base["tokens"]


class TestBadInput:
    """Bad model files give a one-line error and exit code 1, never a crash or a traceback."""

    def _run(self, path) -> tuple[int, str]:
        proc = run_cli("run", "-m", str(path), "-p", "hi", "-n", "2", check=False)
        assert "Traceback" not in proc.stderr
        return proc.returncode, proc.stderr

    def test_missing_file(self, tmp_path):
        code, err = self._run(tmp_path / "nope.gguf")
        assert code == 1
        assert "cannot open" in err and "No such file" in err

    def test_not_a_gguf(self, tmp_path):
        path = tmp_path / "notes.gguf"
        path.write_text("these are not the weights you are looking for\n")
        code, err = self._run(path)
        assert code == 1
        assert "not a GGUF file" in err

    @pytest.mark.parametrize("keep", [0.002, 0.5, 0.97])
    def test_truncated_gguf(self, stock_gguf, tmp_path, keep):
        data = Path(stock_gguf("qwen2_moe")).read_bytes()
        path = tmp_path / "truncated.gguf"
        path.write_bytes(data[: int(len(data) * keep)])
        code, err = self._run(path)
        assert code == 1
        # the validator reads the header before llama.cpp does: a cut header, or tensor data
        # that lies past the end, is named as such
        assert "truncated or corrupt" in err

    def test_unreadable_prompt_file(self, stock_gguf, tmp_path):
        proc = run_cli("run", "-m", str(stock_gguf("qwen2_moe")), "-f", str(tmp_path / "none.txt"), check=False)
        assert proc.returncode == 1 and "cannot read prompt file" in proc.stderr

    def test_bad_flag_values_are_usage_errors(self, stock_gguf):
        proc = run_cli("run", "-m", str(stock_gguf("qwen2_moe")), "-p", "x", "--top-p", "0", check=False)
        assert proc.returncode == 2 and "--top-p" in proc.stderr
