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
    moe_blocks: tuple[str, ...]        # modules that may hold router and experts, published name first
    router: str                        # router weight name inside moe_block
    expert_proj: dict[str, str]        # gguf projection (gate/up/down) -> HF per-expert name
    norm_topk: bool | None             # what llama.cpp does with the top-k weights for this arch
    permute_qk: bool = False           # llama.cpp's "llama" arch rotates interleaved pairs
    shared_expert: bool = False
    extra: dict[str, str] = field(default_factory=dict)  # HF suffix in a layer -> gguf suffix
    dense_ffn: bool = False            # llama.cpp runs leading dense FFN layers (first_k_dense_replace)
    mla: bool = False                  # multi-head latent attention: kv_b_proj is split into k_b / v_b


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
        Architecture("qwen2_moe", "qwen2moe", ("mlp",), "gate", _GATE_UP_DOWN,
                     norm_topk=None, shared_expert=True,
                     extra={"mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
                            "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
                            "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
                            "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight"}),
        Architecture("olmoe", "olmoe", ("mlp",), "gate", _GATE_UP_DOWN, norm_topk=False),
        # Mixtral is published as block_sparse_moe.experts.N.w1/w2/w3; transformers 5 holds it in
        # memory as mlp.gate and fused mlp.experts (what a state dict written directly keeps).
        Architecture("mixtral", "llama", ("block_sparse_moe", "mlp"), "gate", {"gate": "w1", "up": "w3", "down": "w2"},
                     norm_topk=True, permute_qk=True),
        Architecture("qwen3_moe", "qwen3moe", ("mlp",), "gate", _GATE_UP_DOWN, norm_topk=True),
    ]
}


DENSE_FFN_TENSORS = {
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

ARCHITECTURES["deepseek_v2"] = Architecture(
    "deepseek_v2", "deepseek2", ("mlp",), "gate", _GATE_UP_DOWN, norm_topk=None, dense_ffn=True, mla=True,
    extra={"self_attn.q_a_proj.weight": "attn_q_a.weight",
           "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
           "self_attn.q_b_proj.weight": "attn_q_b.weight",
           "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
           "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
           "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
           "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
           "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight"})


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
    # MLA runs as MQA over the compressed latent: one KV head
    w.add_head_count_kv(1 if arch.mla else c.get("num_key_value_heads", n_head))
    rope_theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    w.add_rope_freq_base(float(rope_theta))
    w.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    w.add_expert_count(n_expert(c))
    w.add_expert_used_count(c["num_experts_per_tok"])
    if "moe_intermediate_size" in c:
        w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    if arch.shared_expert:
        w.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])
    if arch.mla:
        _write_mla_hparams(w, c)
        return
    head_dim = c.get("head_dim")
    if head_dim and (head_dim != c["hidden_size"] // n_head or arch.gguf_arch == "qwen3moe"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch.gguf_arch == "llama":
        w.add_rope_dimension_count(c["hidden_size"] // n_head)
    w.add_vocab_size(c["vocab_size"])


def _rope_scaling(c: dict) -> dict:
    scaling = c.get("rope_scaling") or c.get("rope_parameters") or {}
    return scaling if (scaling.get("type") or scaling.get("rope_type")) == "yarn" else {}


def _write_mla_hparams(w: gguf.GGUFWriter, c: dict) -> None:
    """DeepSeek-V2 keys. llama.cpp reads q_lora_rank unless it guesses a "lite" model from the
    layer count, so 0 (no q LoRA, as in V2-Lite) is written explicitly."""
    kv_lora = c["kv_lora_rank"]
    rope_dim = c["qk_rope_head_dim"]
    w.add_leading_dense_block_count(c.get("first_k_dense_replace", 0))
    w.add_q_lora_rank(c.get("q_lora_rank") or 0)
    w.add_kv_lora_rank(kv_lora)
    w.add_key_length(kv_lora + rope_dim)
    w.add_value_length(kv_lora)
    w.add_key_length_mla(c["qk_nope_head_dim"] + rope_dim)
    w.add_value_length_mla(c["v_head_dim"])
    w.add_expert_shared_count(c.get("n_shared_experts") or 0)
    if c.get("routed_scaling_factor") is not None:
        w.add_expert_weights_scale(float(c["routed_scaling_factor"]))
    if c.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    if c.get("n_group"):
        w.add_expert_group_count(c["n_group"])
        w.add_expert_group_used_count(c.get("topk_group") or c["n_group"])
    w.add_rope_dimension_count(rope_dim)
    yarn = _rope_scaling(c)
    if yarn:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(yarn["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(yarn["original_max_position_embeddings"]))
        if yarn.get("mscale_all_dim") is not None:
            # llama.cpp divides this key by 0.1 again for deepseek2 (a historical convention)
            w.add_rope_scaling_yarn_log_mul(0.1 * float(yarn["mscale_all_dim"]))


def n_expert(c: dict) -> int:
    """Routed expert count; published configs and transformers 5 name it differently."""
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if c.get(key):
            return int(c[key])
    raise CheckpointError("config.json has no expert count (num_experts / num_local_experts)")


def moe_layers(arch: Architecture, c: dict) -> list[int]:
    """Indices of the layers whose FFN is a routed MoE block."""
    if arch.dense_ffn:
        first = c.get("first_k_dense_replace", 0) or 0
        freq = c.get("moe_layer_freq", 1) or 1
        return [i for i in range(first, c["num_hidden_layers"]) if i % freq == 0]
    step = c.get("decoder_sparse_step", 1) or 1
    skip = set(c.get("mlp_only_layers", []) or [])
    return [i for i in range(c["num_hidden_layers"]) if (i + 1) % step == 0 and i not in skip]
