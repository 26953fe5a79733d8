"""The checkpoint's tensor inventory (spec §2, §10): names, shapes, which ones are block-FP8.

One function says what a GLM-5.x checkpoint of a given config holds; the loader validates
against it, `make-tiny` writes it, the planner counts it.
"""

from __future__ import annotations

from .config import ModelConfig

# In a block-FP8 checkpoint these linear weights are F8_E4M3 with a `weight_scale_inv` (spec §10).
# Everything else (embeddings, lm_head, norms, router, indexer weights_proj, MTP glue) stays BF16,
# the correction bias F32. The loader decides by the presence of a scale tensor, not by this list.
_FP8_SUFFIXES = (
    "self_attn.q_a_proj.weight", "self_attn.q_b_proj.weight", "self_attn.kv_a_proj_with_mqa.weight",
    "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight", "self_attn.indexer.wq_b.weight",
    "self_attn.indexer.wk.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight",
)


def is_fp8_weight(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith(_FP8_SUFFIXES) and ".mlp.gate.weight" not in name


def layer_tensors(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Tensors of decoder layer `i` (i == num_hidden_layers is the MTP layer)."""
    p = f"model.layers.{i}."
    Hd, H = cfg.hidden_size, cfg.num_attention_heads
    t: dict[str, tuple[int, ...]] = {
        p + "input_layernorm.weight": (Hd,),
        p + "post_attention_layernorm.weight": (Hd,),
        p + "self_attn.q_a_proj.weight": (cfg.q_lora_rank, Hd),
        p + "self_attn.q_a_layernorm.weight": (cfg.q_lora_rank,),
        p + "self_attn.q_b_proj.weight": (H * cfg.qk_head_dim, cfg.q_lora_rank),
        p + "self_attn.kv_a_proj_with_mqa.weight": (cfg.latent_dim, Hd),
        p + "self_attn.kv_a_layernorm.weight": (cfg.kv_lora_rank,),
        p + "self_attn.kv_b_proj.weight": (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank),
        p + "self_attn.o_proj.weight": (Hd, H * cfg.v_head_dim),
    }
    mtp = i >= cfg.num_hidden_layers
    if mtp or cfg.indexer_types[i] == "full":  # the MTP layer always has its own indexer
        Hi, Di = cfg.index_n_heads, cfg.index_head_dim
        t.update({
            p + "self_attn.indexer.wq_b.weight": (Hi * Di, cfg.q_lora_rank),
            p + "self_attn.indexer.wk.weight": (Di, Hd),
            p + "self_attn.indexer.k_norm.weight": (Di,),
            p + "self_attn.indexer.k_norm.bias": (Di,),
            p + "self_attn.indexer.weights_proj.weight": (Hi, Hd),
        })
    if cfg.is_moe(i):
        I, Is = cfg.moe_intermediate_size, cfg.moe_intermediate_size * cfg.n_shared_experts
        t[p + "mlp.gate.weight"] = (cfg.n_routed_experts, Hd)
        t[p + "mlp.gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
        if cfg.n_shared_experts:
            t.update({p + "mlp.shared_experts.gate_proj.weight": (Is, Hd),
                      p + "mlp.shared_experts.up_proj.weight": (Is, Hd),
                      p + "mlp.shared_experts.down_proj.weight": (Hd, Is)})
        for e in range(cfg.n_routed_experts):
            q = f"{p}mlp.experts.{e}."
            t.update({q + "gate_proj.weight": (I, Hd), q + "up_proj.weight": (I, Hd), q + "down_proj.weight": (Hd, I)})
    else:
        I = cfg.intermediate_size
        t.update({p + "mlp.gate_proj.weight": (I, Hd), p + "mlp.up_proj.weight": (I, Hd),
                  p + "mlp.down_proj.weight": (Hd, I)})
    if mtp:
        t.update({p + "enorm.weight": (Hd,), p + "hnorm.weight": (Hd,), p + "eh_proj.weight": (Hd, 2 * Hd),
                  p + "shared_head.norm.weight": (Hd,)})
    return t


def expected_tensors(cfg: ModelConfig, *, include_mtp: bool | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint (weights only; FP8 scales are derived by `fp8_scale_shape`)."""
    t = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
         "model.norm.weight": (cfg.hidden_size,),
         "lm_head.weight": (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_hidden_layers):
        t.update(layer_tensors(cfg, i))
    if include_mtp is None:
        include_mtp = cfg.num_nextn_predict_layers > 0
    if include_mtp:
        t.update(layer_tensors(cfg, cfg.num_hidden_layers))
    return t


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """`weight_scale_inv` shape of a block-quantized `[out, in]` weight: partial last blocks count."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def float32_tensor(name: str) -> bool:
    """Tensors kept in float32 whatever the model dtype (router bias; spec §1.1)."""
    return name.endswith("e_score_correction_bias")
