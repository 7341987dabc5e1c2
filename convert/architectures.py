"""What differs between the supported MoE families: GGUF architecture name, hyperparameter keys,
tensor names, where the experts live, and the routing conventions llama.cpp assumes for them.

Tensor names follow llama.cpp's (`blk.L.attn_q.weight`, `blk.L.ffn_gate_exps.weight`, ...), so
with plain expert tensors the output is a stock GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gguf

from .checkpoint import CheckpointError


@dataclass(frozen=True)
class Architecture:
    model_type: str                    # config.json "model_type"
    gguf_arch: str                     # general.architecture
    moe_block: str                     # module holding router and experts ("mlp" / "block_sparse_moe")
    router: str                        # router weight name inside moe_block
    expert_proj: dict[str, str]        # gguf projection (gate/up/down) -> HF per-expert name
    norm_topk: bool | None             # what llama.cpp does with the top-k weights for this arch
    permute_qk: bool = False           # llama.cpp's "llama" arch rotates interleaved pairs
    shared_expert: bool = False
    extra: dict[str, str] = field(default_factory=dict)  # HF suffix in a layer -> gguf suffix


ATTENTION_TENSORS = {  # HF suffix inside model.layers.L -> GGUF suffix inside blk.L
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}

_GATE_UP_DOWN = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a for a in [
        Architecture("qwen2_moe", "qwen2moe", "mlp", "gate", _GATE_UP_DOWN,
                     norm_topk=None, shared_expert=True,
                     extra={"mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
                            "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
                            "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
                            "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight"}),
        Architecture("olmoe", "olmoe", "mlp", "gate", _GATE_UP_DOWN, norm_topk=False),
        Architecture("mixtral", "llama", "block_sparse_moe", "gate", {"gate": "w1", "up": "w3", "down": "w2"},
                     norm_topk=True, permute_qk=True),
        Architecture("qwen3_moe", "qwen3moe", "mlp", "gate", _GATE_UP_DOWN, norm_topk=True),
    ]
}


def architecture_for(config: dict) -> Architecture:
    model_type = config.get("model_type")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise CheckpointError(f"unsupported architecture {model_type!r} (config.json model_type); "
                              f"supported: {', '.join(sorted(ARCHITECTURES))}")
    norm = config.get("norm_topk_prob")
    if arch.norm_topk is not None and norm is not None and bool(norm) != arch.norm_topk:
        raise CheckpointError(f"{model_type} with norm_topk_prob={norm} is not what llama.cpp's "
                              f"{arch.gguf_arch} computes (norm_topk_prob={arch.norm_topk})")
    return arch


def write_hparams(w: gguf.GGUFWriter, arch: Architecture, c: dict) -> None:
    """The hyperparameter keys llama.cpp reads for this architecture."""
    n_head = c["num_attention_heads"]
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(c.get("max_position_embeddings", 4096))
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(c.get("num_key_value_heads", n_head))
    rope_theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    w.add_expert_count(n_expert(c))
    w.add_expert_used_count(c["num_experts_per_tok"])
    if "moe_intermediate_size" in c:
        w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    if arch.shared_expert:
        w.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])
    head_dim = c.get("head_dim")
    if head_dim and (head_dim != c["hidden_size"] // n_head or arch.gguf_arch == "qwen3moe"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch.gguf_arch == "llama":
        w.add_rope_dimension_count(c["hidden_size"] // n_head)
    w.add_vocab_size(c["vocab_size"])


def n_expert(c: dict) -> int:
    """Routed expert count; published configs and transformers 5 name it differently."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if c.get(key):
            return int(c[key])
    raise CheckpointError("config.json has no expert count (num_experts / num_local_experts)")


def moe_layers(arch: Architecture, c: dict) -> list[int]:
    """Indices of the layers whose FFN is a routed MoE block."""
    step = c.get("decoder_sparse_step", 1) or 1
    skip = set(c.get("mlp_only_layers", []) or [])
    return [i for i in range(c["num_hidden_layers"]) if (i + 1) % step == 0 and i not in skip]
