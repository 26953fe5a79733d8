"""Model configuration: the HF `config.json` of a GLM-5.x (`glm_moe_dsa`) checkpoint.

Field names are the checkpoint's own. Derived facts (IndexShare schedule, dense/MoE layer
types, which layer an MTP head lives in) are computed once here so the model, the loader, the
checkpoint writer and the planner agree on them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .files import regular_file


class ConfigError(ValueError):
    """A `config.json` (or a deployment YAML) that cannot describe a valid model."""


# Keys a config.json must list: every tensor shape depends on them, so a missing one is refused
# (naming it) instead of silently taking GLM-5.2's value and failing later on dozens of shapes.
# `n_routed_experts` may also be given as `num_local_experts`.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                 "v_head_dim", "index_n_heads", "index_head_dim", "index_topk", "n_routed_experts",
                 "num_experts_per_tok", "n_shared_experts", "first_k_dense_replace")

_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                  "v_head_dim", "index_n_heads", "index_head_dim", "index_topk", "max_position_embeddings",
                  "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "moe_layer_freq")
_NON_NEGATIVE_INTS = ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers")
_POSITIVE_FLOATS = ("rms_norm_eps", "latent_norm_eps", "indexer_norm_eps", "rope_theta", "routed_scaling_factor")
_BOOLS = ("norm_topk_prob", "rope_interleave", "indexer_rope_interleave", "index_share_for_mtp_iteration",
          "tie_word_embeddings")


# Floating dtypes by name: torch's own and the short spellings. The one table the CLI, the deployment
# YAML, the cache dtypes, conformance and the benchmarks read (each may accept fewer).
FLOAT_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
                "float64": torch.float64, "fp64": torch.float64, "f64": torch.float64}


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field that is one engine setting (engine_config.py): its default and help text, and
    for the command line `minimum=`, `choices=`, `metavar=`, `parse=` ("dtype" | "graph"), `cli=False`."""
    return field(default=default, metadata={"help": help, **meta})


def is_int(v: Any) -> bool:
    """An integer (Python's or numpy's) that is not a bool (JSON/YAML `true` must not pass as 1)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


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
        if is_int(self.eos_token_id) or isinstance(self.eos_token_id, tuple):  # Python callers: 7 or (7, 8)
            self.eos_token_id = [self.eos_token_id] if is_int(self.eos_token_id) else list(self.eos_token_id)
        self._validate_scalars()  # before deriving anything from them (moe_layer_freq 0 would divide by 0)
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
    def _validate_scalars(self) -> None:
        """Types and ranges of the scalar fields: integers, finite positive floats, booleans."""
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"config.json: {msg}")

        for name in _POSITIVE_INTS:
            v = getattr(self, name)
            if not is_int(v) or v <= 0:
                raise bad(f"'{name}' must be a positive integer, got {v!r}")
        for name in _NON_NEGATIVE_INTS:
            v = getattr(self, name)
            if not is_int(v) or v < 0:
                raise bad(f"'{name}' must be an integer >= 0, got {v!r}")
        for name in _POSITIVE_FLOATS:
            v = getattr(self, name)
            if not _is_number(v) or not math.isfinite(v) or v <= 0:
                raise bad(f"'{name}' must be a positive finite number, got {v!r}")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise bad(f"'{name}' must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.eos_token_id, list) or not all(is_int(t) for t in self.eos_token_id):
            raise bad(f"'eos_token_id' must be an integer or a list of integers, got {self.eos_token_id!r}")
        for t in self.eos_token_id:
            if not 0 <= t < self.vocab_size:
                raise bad(f"'eos_token_id' {t} is outside the vocabulary [0, {self.vocab_size})")
        if self.pad_token_id is not None and (not is_int(self.pad_token_id)
                                              or not 0 <= self.pad_token_id < self.vocab_size):
            raise bad(f"'pad_token_id' must be null or a token id in [0, {self.vocab_size}), got {self.pad_token_id!r}")
        for name in ("indexer_types", "mlp_layer_types"):
            if not isinstance(getattr(self, name), list):
                raise bad(f"'{name}' must be a list, got {getattr(self, name)!r}")
        if not isinstance(self.hidden_act, str):
            raise bad(f"'hidden_act' must be a string, got {self.hidden_act!r}")
        if self.quantization_config is not None and not isinstance(self.quantization_config, dict):
            raise bad(f"'quantization_config' must be an object, got {self.quantization_config!r}")

    def validate(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"config.json: {msg}")

        self._validate_scalars()
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
        """From an HF `config.json` object. Every key of `REQUIRED_KEYS` must be present (no
        silent GLM-5.2 default for a shape); types are checked before anything is derived."""
        if not isinstance(d, dict):
            raise ConfigError("config.json: top level must be a JSON object")
        mt = d.get("model_type")
        if mt is not None and mt != "glm_moe_dsa":
            raise ConfigError(f"config.json: model_type {mt!r} is not 'glm_moe_dsa' (GLM-5.x)")
        missing = [k for k in REQUIRED_KEYS if d.get(k) is None
                   and not (k == "n_routed_experts" and d.get("num_local_experts") is not None)]
        if missing:
            raise ConfigError(f"config.json: required key{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(repr(k) for k in missing)} missing; every GLM-5.x config.json lists "
                              f"{'them' if len(missing) > 1 else 'it'} and no default is assumed (tensor shapes "
                              f"depend on {'them' if len(missing) > 1 else 'it'})")
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
        if eos is not None and not (is_int(eos) or isinstance(eos, list)):
            raise ConfigError(f"config.json: 'eos_token_id' must be an integer or a list of integers, got {eos!r}")
        kw["eos_token_id"] = [] if eos is None else ([eos] if is_int(eos) else list(eos))
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for k, v in list(kw.items()):
            typ = types[k]
            if typ in ("int", "int | None") and not is_int(v):
                raise ConfigError(f"config.json: '{k}' must be an integer, got {v!r}")
            if typ == "float" and (not _is_number(v) or not math.isfinite(v)):
                raise ConfigError(f"config.json: '{k}' must be a finite number, got {v!r}")
            if typ == "bool" and not isinstance(v, bool):
                raise ConfigError(f"config.json: '{k}' must be true/false, got {v!r}")
            if typ == "str" and not isinstance(v, str):
                raise ConfigError(f"config.json: '{k}' must be a string, got {v!r}")
            if typ.startswith("list") and not isinstance(v, list):
                raise ConfigError(f"config.json: '{k}' must be a list, got {v!r}")
            if typ == "dict | None" and not isinstance(v, dict):
                raise ConfigError(f"config.json: '{k}' must be an object, got {v!r}")
        if not d.get("indexer_types"):
            kw["indexer_types"] = indexshare_schedule(kw["num_hidden_layers"], d.get("index_topk_pattern"),
                                                      d.get("index_topk_freq", 1), d.get("index_skip_topk_offset", 2))
        return cls(**kw)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if os.path.exists(path) and not regular_file(path):    # a FIFO would block open() forever
            raise ConfigError(f"{path}: not a regular file (a FIFO, socket, device or folder); config.json must be "
                              f"a JSON file")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: malformed JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
        except RecursionError:
            raise ConfigError(f"{path}: malformed JSON (nested too deeply)") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
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
    if not is_int(num_layers) or num_layers <= 0:
        raise ConfigError(f"config.json: 'num_hidden_layers' must be a positive integer, got {num_layers!r}")
    if pattern is not None:
        if not isinstance(pattern, (str, list)):
            raise ConfigError(f"config.json: 'index_topk_pattern' must be a string of F/S, got {pattern!r}")
        types = [{"F": "full", "S": "shared"}.get(c, c) if isinstance(c, str) else c for c in pattern]
        if len(types) != num_layers or any(t not in ("full", "shared") for t in types):
            raise ConfigError(f"config.json: 'index_topk_pattern' must have one F/S per layer "
                              f"({num_layers}), got {pattern!r}")
        return types
    if not is_int(freq) or not is_int(offset):
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
