"""Paged-cache formats: how one token's latent row and index key are stored, written and read back.

One definition shared by the cache (`cache.PagedCache` writes through `encode_*`), the reference
ops (which read through `read_latent` / `read_index`: only the rows asked for, dequantized to
float32), the planner (`bytes_per_token`) and any backend that reads a format natively. A backend
lists the formats its cache-reading ops take in `Capabilities.cache_formats`; the model runs the
reference for a cache in any other format (one warning). Spec: spec/quantization.md §3.

| format       | cache  | bytes/token (GLM-5.2) | one token                                                    | source |
|--------------|--------|-----------------------|--------------------------------------------------------------|--------|
| `dense`      | both   | 1152 / 256 (bf16)     | the model dtype: latent c `[C]` and k_pe `[Dr]` as two tensors, index key `[Di]` | |
| `fp8_ds_mla` | latent | 656                   | `C` e4m3 codes │ `ceil(C/128)` f32 scales │ `Dr` bf16 rope   | FlashMLA README, tests/quant.py |
| `c8_sfa`     | latent | 656                   | `C` int8 codes │ `Dr` bf16 rope │ `ceil(C/128)` f32 scales (rope BEFORE the scales) | vllm-ascend attention/utils.py |
| `fp8`        | index  | 132                   | `Di` e4m3 codes + `ceil(Di/128)` f32 scales; per block ALL values, then all scales | DeepGEMM/vLLM indexer cache, DeepSeek-V3.2 act_quant |
| `c8_li`      | index  | 130                   | `Di` int8 codes of the ROTATED key + one f16 scale; per block all values, then all scales | vllm-ascend sfa_v1.py (LI C8) |

(C = kv_lora_rank 512, Dr = qk_rope_head_dim 64, Di = index_head_dim 128; the sizes generalise.)

Byte layout in a paged tensor. Every quantized format is stored in one uint8 tensor per layer,
`[num_blocks, block_size * bytes_per_token]`. A block holds the format's parts one after the
other, each `[block_size, width]` (`parts`): the latent formats have one part, the whole row, so a
block is `block_size` contiguous rows (FlashMLA's and Ascend's `[NB, BS, 1, 656]`); the index
formats have two, all `Di`-byte code rows of the block and then all scales (DeepGEMM's paged
layout `[BS * 128 fp8 | BS * 4 f32]` per page). Multi-byte values are little-endian, as every
supported device stores them.

How a quantized cache crosses the op contract (signatures unchanged):
- latent: `c_cache` is the codes, `[NB, BS, C]` of dtype float8_e4m3fn (fp8_ds_mla) or int8
  (c8_sfa), a strided VIEW into the packed rows (row stride = the row's bytes, 656); `kpe_cache` is
  the bfloat16 view `[NB, BS, Dr]` of the same rows' rope bytes. The dtype names the format; the
  scales live in the same rows at fixed offsets (`latent_row_layout`), and `packed_latent(c_cache)`
  gives a reader the whole rows `[NB, BS, row_bytes]` uint8 (what FlashMLA and
  npu_kv_quant_sparse_flash_attention take).
- index: `k_cache` is the codes `[NB, BS, Di]`, float8_e4m3fn (fp8) or int8 (c8_li), a view with
  block stride `BS * bytes_per_token`; `index_parts(k_cache)` gives codes and scales as uint8 views
  (the scales are `[NB, BS]` f32 / f16 values, e.g. npu_quant_lightning_indexer's key_dequant_scale).
A float dtype is the `dense` format, exactly as before.

Quantization recipes (x first cast to float32; scale arithmetic in float32):
- `fp8_ds_mla` (FlashMLA tests/quant.py): per group g of 128 latent values
  `s = 2 ** ceil(log2(max(amax_g / 448, 1e-4)))` (a power of two: the clamp is on the SCALE),
  `q = e4m3(clamp(x / s, -448, 448))` (round to nearest even). The rope is stored as bf16.
- `c8_sfa` (int8 per token per 128-group, symmetric, `npu_dynamic_block_quant`'s arithmetic as
  `quant.int8_token`): `s = amax_g / 127`, `q = clamp(round_half_even(x / s), -128, 127)`; an
  all-zero group gets `s = 0`, `q = 0`. Rope bf16.
- `fp8` index keys (`quant.fp8_g128`, DeepSeek-V3.2 act_quant): `s = max(amax, 1e-4) / 448`,
  `q = e4m3(clamp(x / s, -448, 448))`, one scale per 128 values.
- `c8_li` index keys: `k' = hadamard(k)` (Sylvester Hadamard(Di) / sqrt(Di), orthonormal and
  symmetric), then int8 per token: `s = f16(min(amax / 127, 65504))` and
  `q = clamp(round_half_even(k' / s), -128, 127)` with the STORED (f16) scale; `s = 0` -> `q = 0`.

Reading back (`decode_*`): codes times scales in float32, rope bf16 -> float32. For `c8_li` the
read-back value is the key itself, `hadamard(codes * s)` (the transform is its own inverse), so
the reference scores `q . k` with the caller's plain query. Where the query rotation lives: the
rotation is part of the format, not of the op contract. `indexer_topk` always receives the
un-rotated query; a native kernel working in the rotated space (Ascend's quant lightning indexer,
which multiplies int8 keys directly) applies `hadamard` to its query itself before quantizing it:
`(H q) . (H k) = q . k` since H is orthonormal, so both readers compute the same scores up to
rounding. The writer (`encode_index`) is the only place keys are rotated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import FLOAT_DTYPES
from .quant import FP8_MAX, quantize_fp8_groups, quantize_int8_token

GROUP = 128                  # values per scale in the latent formats and the fp8 index keys
FP8_DS_MLA_SCALE_FLOOR = 1e-4    # FlashMLA clamps the scale (not the amax) before rounding it up to 2^k
F16_MAX = 65504.0
LATENT, INDEX = "latent", "index"


@dataclass(frozen=True)
class CacheFormat:
    name: str
    kind: str                        # "latent", "index" or "both" (dense)
    code_dtype: torch.dtype | None   # dtype of the code view handed to ops; None for dense
    what: str


FORMATS: dict[str, CacheFormat] = {
    "dense": CacheFormat("dense", "both", None, "the model dtype, not quantized"),
    "fp8_ds_mla": CacheFormat("fp8_ds_mla", LATENT, torch.float8_e4m3fn,
                              "FlashMLA FP8 latent: e4m3 codes | f32 power-of-two scale per 128 | bf16 rope"),
    "c8_sfa": CacheFormat("c8_sfa", LATENT, torch.int8,
                          "Ascend SFA C8 latent: int8 codes | bf16 rope | f32 scale per 128"),
    "fp8": CacheFormat("fp8", INDEX, torch.float8_e4m3fn,
                       "FP8 index keys: e4m3 codes + f32 scale per 128; per block values then scales"),
    "c8_li": CacheFormat("c8_li", INDEX, torch.int8,
                         "Ascend LI C8 index keys: int8 codes of the Hadamard-rotated key + f16 scale"),
}
LATENT_FORMATS = ("dense", "fp8_ds_mla", "c8_sfa")
INDEX_FORMATS = ("dense", "fp8", "c8_li")
QUANTIZED_FORMATS = tuple(f for f in FORMATS if f != "dense")

# user-facing cache dtype names (vLLM's `kv_cache_dtype` spellings and the deployment YAML's) -> format
_FLOAT_NAMES = {k: v for k, v in FLOAT_DTYPES.items() if v != torch.float64}   # caches hold no float64
_QUANT_NAMES = {
    LATENT: {"fp8": "fp8_ds_mla", "fp8_e4m3": "fp8_ds_mla", "fp8_ds_mla": "fp8_ds_mla",
             "int8": "c8_sfa", "c8": "c8_sfa", "c8_sfa": "c8_sfa"},
    INDEX: {"fp8": "fp8", "fp8_e4m3": "fp8", "int8": "c8_li", "c8": "c8_li", "c8_li": "c8_li"},
}


def _kind_formats(kind: str) -> tuple[str, ...]:
    if kind not in (LATENT, INDEX):
        raise ValueError(f"cache kind must be {LATENT!r} or {INDEX!r}, got {kind!r}")
    return LATENT_FORMATS if kind == LATENT else INDEX_FORMATS


def check_format(fmt: str, kind: str) -> CacheFormat:
    """The format `fmt` for a `kind` ("latent" | "index") cache; a clear error otherwise."""
    known = _kind_formats(kind)
    if fmt not in known:
        other = INDEX_FORMATS if kind == LATENT else LATENT_FORMATS
        hint = f" ({fmt!r} is an {'index' if kind == LATENT else 'latent'} cache format)" if fmt in other else ""
        raise ValueError(f"unknown {kind} cache format {fmt!r}{hint}; known: {', '.join(known)}")
    return FORMATS[fmt]


def format_for(kind: str, name: str | torch.dtype) -> tuple[str, torch.dtype | None]:
    """A cache dtype name -> (format, the dtype of a dense cache; None for "auto" and quantized
    formats). Names: vLLM's `kv_cache_dtype` spellings ("auto", "bfloat16", "fp8", "fp8_e4m3", ...),
    the deployment YAML's (fp32, bf16, fp8, int8), or a format name. The planner sizes a YAML's
    caches with `bytes_per_token(*format_for(kind, name) ...)`."""
    known = _kind_formats(kind)
    arg = "kv_cache_dtype" if kind == LATENT else "index_cache_dtype"
    if isinstance(name, torch.dtype):
        if name not in _FLOAT_NAMES.values():
            raise ValueError(f"{arg}={name}: a dense cache is float32, bfloat16 or float16")
        return "dense", name
    if not isinstance(name, str):
        raise ValueError(f"{arg} must be a string such as 'auto', 'fp8' or 'int8', got {type(name).__name__} {name!r}")
    key = name.strip().lower()
    if key in ("auto", "dense"):
        return "dense", None
    if key in _FLOAT_NAMES:
        return "dense", _FLOAT_NAMES[key]
    if key in _QUANT_NAMES[kind]:
        return _QUANT_NAMES[kind][key], None
    if key == "fp8_e5m2":
        raise ValueError(f"{arg}='fp8_e5m2' is not supported: the FP8 cache formats store e4m3 "
                         f"({', '.join(f for f in known if f != 'dense')})")
    choices = ["auto", "bfloat16", "float32", "float16", *_QUANT_NAMES[kind]]
    raise ValueError(f"{arg}={name!r} is not a cache dtype; choose one of {', '.join(choices)}")


def resolve(kind: str, name: str | torch.dtype, model_dtype: torch.dtype) -> str:
    """A user's cache dtype (`kv_cache_dtype` / `index_cache_dtype`: "auto", a float dtype, "fp8",
    "int8", or a format name) -> the cache format. A float name must be the model's dtype: a dense
    cache is held in the dtype the model computes in."""
    fmt, dt = format_for(kind, name)
    if dt is not None and dt != model_dtype:
        arg = "kv_cache_dtype" if kind == LATENT else "index_cache_dtype"
        raise ValueError(f"{arg}={name!r}: a float cache is held in the model's dtype ({model_dtype}); "
                         f"pass 'auto', a quantized format, or build the model with that dtype")
    return fmt


# ---- sizes and byte layout --------------------------------------------------------------------------

def _groups(n: int) -> int:
    return -(-n // GROUP)


def latent_row_layout(fmt: str, C: int, Dr: int) -> dict[str, tuple[int, int]]:
    """`{"codes" | "scales" | "rope": (byte offset, bytes)}` inside one packed latent row."""
    G = _groups(C)
    if fmt == "fp8_ds_mla":
        return {"codes": (0, C), "scales": (C, 4 * G), "rope": (C + 4 * G, 2 * Dr)}
    if fmt == "c8_sfa":
        return {"codes": (0, C), "rope": (C, 2 * Dr), "scales": (C + 2 * Dr, 4 * G)}
    raise ValueError(f"{fmt!r} is not a quantized latent cache format ({', '.join(LATENT_FORMATS[1:])})")


def _index_scale_bytes(fmt: str, Di: int) -> int:
    if fmt == "fp8":
        return 4 * _groups(Di)
    if fmt == "c8_li":
        return 2
    raise ValueError(f"{fmt!r} is not a quantized index cache format ({', '.join(INDEX_FORMATS[1:])})")


def _dims(fmt: str, cfg) -> tuple[int, ...]:
    return (cfg.kv_lora_rank, cfg.qk_rope_head_dim) if FORMATS[fmt].kind == LATENT else (cfg.index_head_dim,)


def parts(fmt: str, *dims: int) -> tuple[tuple[str, int], ...]:
    """The byte parts of one token in block order: ((name, width), ...). Latent formats: one part
    "row" (dims C, Dr); index formats: "values" then "scales" (dims Di)."""
    if fmt in ("fp8_ds_mla", "c8_sfa"):
        C, Dr = dims
        return (("row", sum(w for _, w in latent_row_layout(fmt, C, Dr).values())),)
    Di, = dims
    return (("values", Di), ("scales", _index_scale_bytes(fmt, Di)))


def bytes_per_token(fmt: str, cfg, *, kind: str | None = None, dtype: torch.dtype | None = torch.bfloat16) -> int:
    """Bytes one token takes in ONE layer's cache of format `fmt` (`cfg` a ModelConfig). `dense`
    needs `kind` ("latent": c + k_pe, "index": the key) and is counted in `dtype` (None: bf16). GLM-5.2:
    latent dense bf16 1152, fp8_ds_mla 656, c8_sfa 656; index dense bf16 256, fp8 132, c8_li 130.
    A PagedCache of the format holds exactly this many bytes per token and layer."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown cache format {fmt!r}; known: {', '.join(FORMATS)}")
    f = FORMATS[fmt]
    if kind is None:
        if f.kind == "both":
            raise ValueError("bytes_per_token: the dense format needs kind='latent' or kind='index'")
        kind = f.kind
    check_format(fmt, kind)
    if fmt == "dense":
        n = cfg.kv_lora_rank + cfg.qk_rope_head_dim if kind == LATENT else cfg.index_head_dim
        return n * torch.empty((), dtype=dtype or torch.bfloat16).element_size()
    return sum(w for _, w in parts(fmt, *_dims(fmt, cfg)))


def check_dims(fmt: str, *dims: int) -> None:
    """The dimensions a quantized format can store (the rope is viewed as bf16: even offsets)."""
    if fmt in ("fp8_ds_mla", "c8_sfa"):
        C, Dr = dims
        if C % 2:
            raise ValueError(f"cache format {fmt}: kv_lora_rank {C} must be even (the bf16 rope follows the codes)")
    elif fmt == "c8_li":
        Di, = dims
        if Di < 1 or Di & (Di - 1):
            raise ValueError(f"cache format c8_li: index_head_dim {Di} must be a power of two (Hadamard rotation)")


# ---- storage in a paged tensor --------------------------------------------------------------------

def allocate(fmt: str, dims: tuple[int, ...], num_blocks: int, block_size: int,
             device: str | torch.device = "cpu") -> torch.Tensor:
    """The owning uint8 tensor `[num_blocks, block_size * bytes_per_token]` of one layer (zeros)."""
    check_dims(fmt, *dims)
    width = sum(w for _, w in parts(fmt, *dims))
    return torch.zeros(num_blocks, block_size * width, dtype=torch.uint8, device=device)


def part_views(fmt: str, dims: tuple[int, ...], storage: torch.Tensor, block_size: int) -> dict[str, torch.Tensor]:
    """`{part: uint8 view [NB, BS, width]}` into `storage` (written by `PagedCache`)."""
    out, off = {}, 0
    NB = storage.shape[0]
    for name, w in parts(fmt, *dims):
        out[name] = storage[:, off:off + block_size * w].view(NB, block_size, w)
        off += block_size * w
    return out


def op_views(fmt: str, dims: tuple[int, ...], storage: torch.Tensor, block_size: int) -> tuple[torch.Tensor, ...]:
    """What the ops receive: latent -> (c_cache codes view, kpe_cache bf16 view); index -> (k_cache,)."""
    pv = part_views(fmt, dims, storage, block_size)
    code = FORMATS[fmt].code_dtype
    if FORMATS[fmt].kind == LATENT:
        C, Dr = dims
        row = pv["row"]
        c = row[..., :C].view(code)
        r0, rn = latent_row_layout(fmt, C, Dr)["rope"]
        kpe = row.view(torch.bfloat16)[..., r0 // 2:(r0 + rn) // 2]
        return c, kpe
    return (pv["values"].view(code),)


# ---- encode (quantize + pack) ---------------------------------------------------------------------

def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes along its last dim: [..., n] of dtype d -> uint8 [..., n * itemsize]."""
    return t.contiguous().view(torch.uint8)


def _grouped(x: torch.Tensor) -> torch.Tensor:
    """float32 [..., n] -> [..., G, 128], the last group zero-padded."""
    n = x.shape[-1]
    pad = _groups(n) * GROUP - n
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    return xp.reshape(*x.shape[:-1], _groups(n), GROUP)


def quantize_fp8_ds_mla(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c [..., C] -> (e4m3 codes [..., C], f32 power-of-two scales [..., ceil(C/128)]) (FlashMLA's recipe)."""
    C = c.shape[-1]
    xg = _grouped(c.float())
    s = xg.abs().amax(dim=-1) / FP8_MAX
    s = torch.exp2(torch.ceil(torch.log2(s.clamp(min=FP8_DS_MLA_SCALE_FLOOR))))
    q = (xg / s[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(*c.shape[:-1], -1)[..., :C], s


def quantize_int8_groups(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c [..., C] -> (int8 codes [..., C], f32 scales [..., ceil(C/128)]): `int8_token` per 128-group."""
    C = c.shape[-1]
    q, s = quantize_int8_token(_grouped(c.float()))
    return q.reshape(*c.shape[:-1], -1)[..., :C], s


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x [..., n] (n a power of two) -> x @ H_n / sqrt(n) in float32, H_n Sylvester's Hadamard matrix
    (H_1 = [1], H_2m = [[H, H], [H, -H]]; entry (i, j) = (-1)^popcount(i & j)). Orthonormal and
    symmetric, so it is its own inverse. A fast Walsh-Hadamard transform: elementwise, the same
    result for any batch shape (the cache's writer and readers agree bit for bit)."""
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: the last dimension {n} is not a power of two")
    y = x.float()
    lead = y.shape[:-1]
    h = 1
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    return y.reshape(*lead, n) * (1.0 / math.sqrt(n))


def quantize_c8_li(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k [..., Di] -> (int8 codes of hadamard(k) [..., Di], f16 per-token scale [...])."""
    kr = hadamard(k)
    s16 = (kr.abs().amax(dim=-1) / 127).clamp(max=F16_MAX).to(torch.float16)
    s = s16.float()
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.round(kr / safe[..., None]).clamp(-128, 127)
    q = torch.where((s == 0)[..., None], torch.zeros_like(q), q)
    return q.to(torch.int8), s16


def encode_latent(fmt: str, c: torch.Tensor, k_pe: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tokens' latent `c [N, C]` and rope keys `k_pe [N, Dr]` -> `{"row": uint8 [N, row_bytes]}`."""
    check_format(fmt, LATENT)
    if fmt == "fp8_ds_mla":
        q, s = quantize_fp8_ds_mla(c)
        pieces = {"codes": q, "scales": s, "rope": k_pe.to(torch.bfloat16)}
    elif fmt == "c8_sfa":
        q, s = quantize_int8_groups(c)
        pieces = {"codes": q, "rope": k_pe.to(torch.bfloat16), "scales": s}
    else:
        raise ValueError("encode_latent: the dense format is written as it is")
    order = latent_row_layout(fmt, c.shape[-1], k_pe.shape[-1])
    return {"row": torch.cat([_bytes(pieces[name]) for name in order], dim=-1)}


def encode_index(fmt: str, k: torch.Tensor) -> dict[str, torch.Tensor]:
    """Tokens' index keys `k [N, Di]` -> `{"values": uint8 [N, Di], "scales": uint8 [N, scale bytes]}`."""
    check_format(fmt, INDEX)
    if fmt == "fp8":
        q, s = quantize_fp8_groups(k, GROUP)
    elif fmt == "c8_li":
        q, s = quantize_c8_li(k)
        s = s[..., None]
    else:
        raise ValueError("encode_index: the dense format is written as it is")
    return {"values": _bytes(q), "scales": _bytes(s)}


# ---- decode (unpack + dequantize) to float32 ------------------------------------------------------

def _as(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return b.contiguous().view(dtype)


def decode_latent(fmt: str, rows: torch.Tensor, C: int, Dr: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows uint8 `[..., row_bytes]` -> (c float32 [..., C], k_pe float32 [..., Dr])."""
    lay = latent_row_layout(fmt, C, Dr)
    (c0, cn), (s0, sn), (r0, rn) = lay["codes"], lay["scales"], lay["rope"]
    codes = _as(rows[..., c0:c0 + cn], FORMATS[fmt].code_dtype).float()
    s = _as(rows[..., s0:s0 + sn], torch.float32)                                   # [..., G]
    c = codes * s.repeat_interleave(GROUP, dim=-1)[..., :C]
    return c, _as(rows[..., r0:r0 + rn], torch.bfloat16).float()


def decode_index(fmt: str, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Codes uint8 `[..., Di]` and scale bytes `[..., sb]` -> the keys float32 `[..., Di]`
    (for c8_li rotated back: the key itself)."""
    codes = _as(values, FORMATS[fmt].code_dtype).float()
    if fmt == "fp8":
        s = _as(scales, torch.float32)
        return codes * s.repeat_interleave(GROUP, dim=-1)[..., :codes.shape[-1]]
    s = _as(scales, torch.float16).float()                                          # [..., 1]
    return hadamard(codes * s)


# ---- readers: what the ops receive -> the format, the packed bytes -----------------------------------

# kind -> {code dtype: quantized format}, from FORMATS (each quantized format of a kind has its own code dtype)
_BY_CODE_DTYPE = {kind: {FORMATS[f].code_dtype: f for f in _kind_formats(kind)[1:]} for kind in (LATENT, INDEX)}


def _format_by_dtype(codes: torch.Tensor, kind: str, what: str) -> str:
    """The format of a `kind` cache from the dtype of the tensor `what` the ops receive: a float dtype
    (float8_e4m3fn excepted: codes) is dense, a code dtype names its quantized format; else an error."""
    if codes.is_floating_point() and codes.dtype != torch.float8_e4m3fn:
        return "dense"
    fmt = _BY_CODE_DTYPE[kind].get(codes.dtype)
    if fmt is None:
        known = " or ".join(f"{str(d).removeprefix('torch.')} ({f} codes)" for d, f in _BY_CODE_DTYPE[kind].items())
        raise ValueError(f"{what} has dtype {codes.dtype}: {'an' if kind == INDEX else 'a'} {kind} cache is "
                         f"float (dense), {known}")
    return fmt


def latent_format_of(c_cache: torch.Tensor, kpe_cache: torch.Tensor | None = None) -> str:
    """The format of a latent cache as the ops receive it: a float `c_cache` is dense; float8_e4m3fn
    codes are fp8_ds_mla and int8 codes c8_sfa, which must be views into packed rows (row stride =
    the row's bytes) with `kpe_cache` the bf16 view of the same rows' rope bytes."""
    fmt = _format_by_dtype(c_cache, LATENT, "c_cache")
    if fmt != "dense" and kpe_cache is not None:
        C, Dr = c_cache.shape[-1], kpe_cache.shape[-1]
        lay = latent_row_layout(fmt, C, Dr)
        rb = sum(w for _, w in lay.values())
        want = (c_cache.stride(0) // 2, rb // 2, 1)
        ok = (kpe_cache.dtype == torch.bfloat16 and kpe_cache.shape[:2] == c_cache.shape[:2]
              and c_cache.stride()[1:] == (rb, 1) and tuple(kpe_cache.stride()) == want
              and kpe_cache.data_ptr() == c_cache.data_ptr() + lay["rope"][0])
        if not ok:
            raise ValueError(f"a {fmt} latent cache is one tensor of packed {rb}-byte rows: c_cache the codes view "
                             f"(row stride {rb}), kpe_cache the bfloat16 view of the rope bytes of the same rows "
                             f"(byte offset {lay['rope'][0]}); got c_cache strides {tuple(c_cache.stride())}, "
                             f"kpe_cache {kpe_cache.dtype} strides {tuple(kpe_cache.stride())} at byte offset "
                             f"{kpe_cache.data_ptr() - c_cache.data_ptr()} (build caches with PagedCache)")
    return fmt


def index_format_of(k_cache: torch.Tensor) -> str:
    """The format of an index-key cache as `indexer_topk` receives it (float: dense)."""
    return _format_by_dtype(k_cache, INDEX, "k_cache")


def _behind(view: torch.Tensor, size: tuple[int, ...], stride: tuple[int, ...], extra: int, what: str) -> torch.Tensor:
    u = view.view(torch.uint8)
    try:
        return u.as_strided(size, stride, u.storage_offset() + extra)
    except RuntimeError as e:
        raise ValueError(f"{what}: the codes view does not sit in a packed cache tensor of that layout "
                         f"({e}); build caches with PagedCache") from None


def packed_latent(c_cache: torch.Tensor, kpe_cache: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(format, the packed rows uint8 [NB, BS, row_bytes]) behind a quantized latent cache."""
    fmt = latent_format_of(c_cache, kpe_cache)
    if fmt == "dense":
        raise ValueError("packed_latent: a dense latent cache has no packed rows")
    rb = sum(w for _, w in latent_row_layout(fmt, c_cache.shape[-1], kpe_cache.shape[-1]).values())
    NB, BS, _ = c_cache.shape
    return fmt, _behind(c_cache, (NB, BS, rb), (c_cache.stride(0), rb, 1), 0, f"{fmt} c_cache")


def index_parts(k_cache: torch.Tensor) -> tuple[str, torch.Tensor, torch.Tensor]:
    """(format, codes uint8 [NB, BS, Di], scale bytes uint8 [NB, BS, sb]) of a quantized index cache."""
    fmt = index_format_of(k_cache)
    if fmt == "dense":
        raise ValueError("index_parts: a dense index cache has no scales")
    NB, BS, Di = k_cache.shape
    sb = _index_scale_bytes(fmt, Di)
    if k_cache.stride()[1:] != (Di, 1) or k_cache.stride(0) < BS * (Di + sb):
        raise ValueError(f"a {fmt} index cache is per block {BS} x {Di} code bytes then {BS} x {sb} scale bytes: "
                         f"k_cache must be the codes view (strides (>= {BS * (Di + sb)}, {Di}, 1)), got "
                         f"{tuple(k_cache.stride())} (build caches with PagedCache)")
    scales = _behind(k_cache, (NB, BS, sb), (k_cache.stride(0), sb, 1), BS * Di, f"{fmt} k_cache")
    return fmt, k_cache.view(torch.uint8), scales


def read_latent(c_cache: torch.Tensor, kpe_cache: torch.Tensor, blocks: torch.Tensor, offs: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (blocks, offs) of a latent cache: dense -> the stored values as they are; quantized ->
    float32, dequantized. Reads only those rows."""
    if latent_format_of(c_cache, kpe_cache) == "dense":
        return c_cache[blocks, offs], kpe_cache[blocks, offs]
    fmt, rows = packed_latent(c_cache, kpe_cache)
    return decode_latent(fmt, rows[blocks, offs], c_cache.shape[-1], kpe_cache.shape[-1])


def read_index(k_cache: torch.Tensor, blocks: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows (blocks, offs) of an index-key cache: dense as stored; quantized -> float32 keys."""
    if index_format_of(k_cache) == "dense":
        return k_cache[blocks, offs]
    fmt, values, scales = index_parts(k_cache)
    return decode_index(fmt, values[blocks, offs], scales[blocks, offs])
