"""Several sequences decoded together on one context: the slice cache serves the union of the
experts their tokens select, a missing slice is read once for every sequence routed to it, and each
sequence computes exactly what it computes alone."""

from __future__ import annotations

import pytest

from slicemoe_gguf import Model
from slicemoe_gguf._native import SliceMoEError
from slicemoe_gguf.embedded import embedded_gguf
from slicemoe_gguf.model_info import describe
from slicemoe_gguf.runtime import Sampling

PROMPTS = ["ROMEO.\nBut soft, what light", "JULIET.\nO Romeo, Romeo", "HAMLET.\nTo be, or not",
           "KING RICHARD.\nNow is the winter"]
N = 24


@pytest.fixture(scope="module")
def embedded():
    return embedded_gguf(progress=False)


def _budget(path, fraction: float) -> int:
    info = describe(path)
    return int(fraction * (info["expert_msb_bytes"] + info["expert_lsb_bytes"]))


def _alone(path, prompt: str, **cache) -> tuple[list[int], dict]:
    with Model(path, n_ctx=512, **cache) as model:
        tokens = model.generate(prompt, N, stop_at_eog=False).tokens
        return tokens, model.cache_stats()


def _together(path, prompts: list[str], **cache) -> tuple[list[list[int]], dict]:
    """Each prompt evaluated on its own sequence, then one batch per step with a token of each."""
    with Model(path, n_ctx=512 * len(prompts), n_seq=len(prompts), **cache) as model:
        samplers = [model.sampler(Sampling()) for _ in prompts]
        outputs = []
        for seq, prompt in enumerate(prompts):
            model.eval_seq(seq, model.tokenize(prompt))
            outputs.append([model.sample(samplers[seq], seq)])
        seqs = list(range(len(prompts)))
        for _ in range(N - 1):
            model.decode_batch(seqs, [out[-1] for out in outputs])
            for seq in seqs:
                outputs[seq].append(model.sample(samplers[seq], seq))
        return outputs, model.cache_stats()


@pytest.mark.parametrize("precision", ["high", "low"])
def test_each_sequence_of_a_batch_decodes_what_it_decodes_alone(embedded, precision):
    cache = {"cache_budget": _budget(embedded, 0.5), "precision": precision}
    together, _ = _together(embedded, PROMPTS, **cache)
    assert together == [_alone(embedded, prompt, **cache)[0] for prompt in PROMPTS]
    assert len({tuple(out) for out in together}) == len(PROMPTS)


def test_a_slice_two_sequences_need_is_read_once_for_both(embedded):
    # the same prompt twice: every step both sequences select the same experts
    cache = {"cache_budget": _budget(embedded, 0.3), "precision": "high", "warmup": "none"}
    tokens, alone = _alone(embedded, PROMPTS[0], **cache)
    together, both = _together(embedded, [PROMPTS[0], PROMPTS[0]], **cache)
    assert together == [tokens, tokens]
    assert alone["misses"] > 0
    assert both["flash_bytes"] == alone["flash_bytes"] and both["misses"] == alone["misses"]
    assert both["hits"] == 2 * alone["hits"] + alone["misses"]   # the second sequence hits what the first read


def test_batching_four_sequences_reads_less_flash_per_token_than_one(embedded):
    cache = {"cache_budget": _budget(embedded, 0.5), "precision": "high"}
    per_token_alone = [stats["flash_bytes"] / N for _, stats in (_alone(embedded, p, **cache) for p in PROMPTS)]
    _, together = _together(embedded, PROMPTS, **cache)
    assert together["flash_bytes"] / (N * len(PROMPTS)) < min(per_token_alone)


def test_a_batch_whose_experts_exceed_the_slots_fails_with_the_reason_and_the_context_stays_usable(embedded):
    info = describe(embedded)
    # the smallest budget that holds one token's top-k at 4 bits: four sequences cannot fit their union
    budget = info["top_k"] * info["msb_slice_bytes"] * len(info["layers"])
    with Model(embedded, n_ctx=2048, n_seq=4, cache_budget=budget, precision="low") as model:
        firsts = []
        for seq, prompt in enumerate(PROMPTS):
            model.eval_seq(seq, model.tokenize(prompt))
            firsts.append(int(model.logits_seq(seq).argmax()))
        with pytest.raises(SliceMoEError, match="for the experts of a batch of 4 sequences"):
            model.decode_batch([0, 1, 2, 3], firsts)
        model.decode_batch([0], firsts[:1])   # one sequence alone still decodes
        assert model.logits_seq(0).shape == (model.n_vocab,)


def test_bad_sequence_arguments_are_refused(embedded):
    with Model(embedded, n_ctx=512, n_seq=2) as model:
        model.eval_seq(0, model.tokenize(PROMPTS[0]))
        with pytest.raises(SliceMoEError, match="distinct"):
            model.decode_batch([0, 0], [5, 6])
        with pytest.raises(SliceMoEError, match="outside"):
            model.eval_seq(2, [5])
        with pytest.raises(SliceMoEError, match="no logits"):
            model.logits_seq(1)
