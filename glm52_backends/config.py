"""Model configuration: the HF `config.json` of a GLM-5.x (`glm_moe_dsa`) checkpoint.

Field names are the checkpoint's own. Derived facts (IndexShare schedule, dense/MoE layer
types, which layer an MTP head lives in) are computed once here so the model, the loader, the
checkpoint writer and the planner agree on them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A `config.json` (or a deployment YAML) that cannot describe a valid model."""


@dataclass
class ModelConfig:
    vocab_size: int = 154880
    hidden_size: int = 6144
    intermediate_size: int = 12288  # dense MLP (layers < first_k_dense_replace)
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 78
    num_attention_heads: int = 64
    q_lora_rank: int = 2048
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 192
    qk_rope_head_dim: int = 64
    v_head_dim: int = 256
    index_n_heads: int = 32
    index_head_dim: int = 128
    index_topk: int = 2048
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-5
    # q_a_layernorm / kv_a_layernorm: HF builds them with its RMSNorm default 1e-6 (spec §4.1);
    # vLLM uses rms_norm_eps. We follow HF so logits match the external reference.
    latent_norm_eps: float = 1e-6
    indexer_norm_eps: float = 1e-6  # indexer k_norm is a LayerNorm (weight + bias)
    rope_theta: float = 8_000_000.0
    rope_interleave: bool = True
    indexer_rope_interleave: bool = True
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 0
    index_share_for_mtp_iteration: bool = True
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    indexer_types: list[str] = field(default_factory=list)  # "full" | "shared", one per layer
    mlp_layer_types: list[str] = field(default_factory=list)  # "dense" | "sparse", one per layer
    quantization_config: dict | None = None

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if not self.indexer_types:
            self.indexer_types = ["full"] * n
        if not self.mlp_layer_types:
            self.mlp_layer_types = [
                "dense" if i < self.first_k_dense_replace or (i - self.first_k_dense_replace) % self.moe_layer_freq
                else "sparse"
                for i in range(n)
            ]
        self.validate()

    # ---- derived ---------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:  # per-token latent cache width: c (kv_lora) + k_pe (rope)
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:  # no YaRN in GLM-5.x: plain qk_head_dim^-0.5
        return self.qk_head_dim ** -0.5

    @property
    def full_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.indexer_types) if t == "full"]

    def index_source(self, layer: int) -> int:
        """The full layer whose top-k `layer` uses (itself when full)."""
        for i in range(layer, -1, -1):
            if self.indexer_types[i] == "full":
                return i
        raise ConfigError(f"layer {layer} is 'shared' but no earlier layer is 'full'")

    @property
    def mtp_layer(self) -> int | None:
        return self.num_hidden_layers if self.num_nextn_predict_layers > 0 else None

    def is_moe(self, layer: int) -> bool:
        if layer >= self.num_hidden_layers:  # MTP layer: always MoE (spec §2)
            return True
        return self.mlp_layer_types[layer] == "sparse"

    @property
    def fp8_block(self) -> tuple[int, int] | None:
        q = self.quantization_config
        if not q or q.get("quant_method") != "fp8":
            return None
        return tuple(q.get("weight_block_size", (128, 128)))

    # ---- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"config.json: {msg}")

        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "index_n_heads",
                    "index_head_dim", "index_topk", "max_position_embeddings"]
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(f"'{name}' must be a positive integer, got {v!r}")
        for name in ("rope_interleave", "indexer_rope_interleave"):
            if getattr(self, name) is not True:
                raise bad(f"'{name}' is {getattr(self, name)!r}: only interleaved (GPT-J pair) RoPE is implemented, as "
                          f"GLM-5.x checkpoints use (rope_interleave = indexer_rope_interleave = true); a half-split "
                          f"(NeoX) RoPE would be computed wrongly, so the config is refused")
        n = self.num_hidden_layers
        if len(self.indexer_types) != n or any(t not in ("full", "shared") for t in self.indexer_types):
            raise bad(f"'indexer_types' must list 'full'/'shared' for each of the {n} layers, "
                      f"got {self.indexer_types!r}")
        if self.indexer_types[0] != "full":
            raise bad("'indexer_types[0]' must be 'full': a shared layer needs an earlier full layer")
        if len(self.mlp_layer_types) != n or any(t not in ("dense", "sparse") for t in self.mlp_layer_types):
            raise bad(f"'mlp_layer_types' must list 'dense'/'sparse' for each of the {n} layers")
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.index_head_dim:
            raise bad(f"'qk_rope_head_dim' ({self.qk_rope_head_dim}) must be even and <= index_head_dim "
                      f"({self.index_head_dim}): the indexer ropes its first qk_rope_head_dim dims")
        if any(t == "sparse" for t in self.mlp_layer_types) or self.num_nextn_predict_layers:
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                raise bad(f"'num_experts_per_tok' ({self.num_experts_per_tok}) must be in "
                          f"1..n_routed_experts ({self.n_routed_experts})")
            if self.n_routed_experts % self.n_group or not 0 < self.topk_group <= self.n_group:
                raise bad(f"'n_group' ({self.n_group}) must divide n_routed_experts and "
                          f"'topk_group' ({self.topk_group}) be in 1..n_group")
        if self.hidden_act != "silu":
            raise bad(f"'hidden_act' {self.hidden_act!r} is not supported (GLM-5.x uses 'silu')")
        if self.num_nextn_predict_layers not in (0, 1):
            raise bad(f"'num_nextn_predict_layers' must be 0 or 1, got {self.num_nextn_predict_layers}")
        if self.tie_word_embeddings:
            raise bad("'tie_word_embeddings' true is not a GLM-5.x layout (lm_head is separate)")
        if self.quantization_config is not None:
            q = self.quantization_config
            if q.get("quant_method") != "fp8":
                raise bad(f"quantization_config.quant_method {q.get('quant_method')!r} is not supported "
                          f"(only block 'fp8')")
            bs = q.get("weight_block_size", [128, 128])
            if not (isinstance(bs, (list, tuple)) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)):
                raise bad(f"quantization_config.weight_block_size must be two positive ints, got {bs!r}")

    # ---- HF config.json --------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError("config.json: top level must be a JSON object")
        mt = d.get("model_type")
        if mt is not None and mt != "glm_moe_dsa":
            raise ConfigError(f"config.json: model_type {mt!r} is not 'glm_moe_dsa' (GLM-5.x)")
        known = {f.name for f in dataclasses.fields(cls)}
        kw: dict[str, Any] = {k: d[k] for k in known if k in d and d[k] is not None}
        if "num_local_experts" in d and "n_routed_experts" not in d:
            kw["n_routed_experts"] = d["num_local_experts"]
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"config.json: 'rope_parameters' must be an object, got {rope!r}")
        if rope.get("rope_type", "default") not in ("default", None):
            raise ConfigError(f"config.json: rope_type {rope.get('rope_type')!r} is not supported "
                              f"(GLM-5.x uses plain RoPE, no YaRN)")
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        elif "rope_theta" in d:
            kw["rope_theta"] = d["rope_theta"]
        eos = d.get("eos_token_id")
        kw["eos_token_id"] = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        n = d.get("num_hidden_layers", cls.num_hidden_layers)
        if not d.get("indexer_types"):
            kw["indexer_types"] = indexshare_schedule(n, d.get("index_topk_pattern"),
                                                      d.get("index_topk_freq", 1), d.get("index_skip_topk_offset", 2))
        for k, v in list(kw.items()):
            typ = {f.name: f.type for f in dataclasses.fields(cls)}[k]
            if typ == "int" and (not isinstance(v, int) or isinstance(v, bool)):
                raise ConfigError(f"config.json: '{k}' must be an integer, got {v!r}")
            if typ == "float" and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                raise ConfigError(f"config.json: '{k}' must be a number, got {v!r}")
            if typ == "bool" and not isinstance(v, bool):
                raise ConfigError(f"config.json: '{k}' must be true/false, got {v!r}")
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: malformed JSON ({e})") from None
        return cls.from_hf_dict(d)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("rope_theta")
        d.pop("latent_norm_eps")
        d.pop("indexer_norm_eps")
        if d["quantization_config"] is None:
            d.pop("quantization_config")
        return {
            "architectures": ["GlmMoeDsaForCausalLM"],
            "model_type": "glm_moe_dsa",
            "num_key_value_heads": self.num_attention_heads,
            "head_dim": self.qk_rope_head_dim,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "dtype": "bfloat16",
            **d,
        }


def indexshare_schedule(num_layers: int, pattern=None, freq: int = 1, offset: int = 2) -> list[str]:
    """IndexShare layer types (spec §6): an F/S pattern wins, else HF/vLLM's freq/offset rule."""
    if pattern is not None:
        types = [{"F": "full", "S": "shared"}.get(c, c) for c in pattern]
        if len(types) != num_layers or any(t not in ("full", "shared") for t in types):
            raise ConfigError(f"config.json: 'index_topk_pattern' must have one F/S per layer "
                              f"({num_layers}), got {pattern!r}")
        return types
    if not isinstance(freq, int) or not isinstance(offset, int):
        raise ConfigError(f"config.json: 'index_topk_freq'/'index_skip_topk_offset' must be integers, "
                          f"got {freq!r}/{offset!r}")
    freq = max(freq, 1)
    return ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(num_layers)]


GLM52_CONFIG = ModelConfig(
    num_nextn_predict_layers=1,
    indexer_types=indexshare_schedule(78, freq=4, offset=3),
    eos_token_id=[154820, 154827, 154829],
    pad_token_id=154820,
    quantization_config=None,
)
"""The real GLM-5.2 architecture (spec §1.1), for planning and benchmarks at real shapes."""
