"""A CPU emulator of the torch_npu fused ops that the Ascend backend calls.

`NpuEmulator()` has the attributes of `torch_npu` that the backend's op files use, with the same
argument names, defaults and keyword-only markers, the same layouts (BSND, TND with prefix-sum lengths,
PA_BSND with block tables), the argument checks the documentation states, the documented math
(in float32), and output shapes and dtypes that agree with the wheel's meta registrations. It
exists so the backend's own code (layouts, lengths, block tables, routing bookkeeping) runs and is
checked numerically on machines without an NPU; it is used only when asked (GLM52_ASCEND_EMULATE=1).

Sources, read from the torch-npu 2.14.0 wheel (PyPI) without installing it:
  schema  torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml     (names, defaults)
  docs    torch_npu/_op_plugin_docs.py, and the fuller pages it is generated from,
          Ascend/op-plugin docs/zh/custom_APIs/torch_npu/torch_npu-<op>.md   (checks, math)
  shapes  torch_npu/op_plugin/meta/_meta_registrations.py              (output shapes, dtypes)
Section names in comments are the doc pages' own: 参数说明 (parameters), 约束说明 (constraints),
功能说明 (function / formula), 等价计算逻辑 (equivalent numpy code), 返回值说明 (outputs).

Where the documents describe several chips, the emulator follows Atlas A2/A3 (910B/910C). Where
they differ between release lines it follows the line of its declared CANN (`NpuEmulator(cann=...)`,
default versions.EMULATED_CANN; the lines and their differences: versions.py), read from that line's
branch of Ascend/op-plugin: e.g. npu_lightning_indexer takes exactly 64 index heads and no float32
weights on the 7.3.0 line (CANN 8.5.0), up to 64 heads and float32 weights from 26.0.0 (CANN 9.0.0).
What it cannot reproduce is listed in backends/ascend/README.md ("The emulator"); in short:
float32 accepted by the ops documented for bfloat16/float16 only on A2/A3 (the two attention ops and
npu_interleave_rope; `allow_float32`, an emulation convenience), values the device leaves undefined
(filled with -1 / 0 / NaN here), tie order, bf16 rounding inside kernels, and the variants the backend
never uses (static-quant routing, int4 / int64-scale / int32-output matmuls, hash, drop-pad: rejected
as "not emulated"). The int8 ops (npu_dynamic_quant, npu_quantize, npu_quant_matmul, quant_mode=1
routing, int8 npu_grouped_matmul) follow the A2/A3 dtype tables of their pages; float32 activations
and outputs there are the same `allow_float32` convenience.

In this class the instance is called `emu`: torch_npu itself names some tensor arguments `self`.
"""

from __future__ import annotations

import functools
import weakref

import torch

from glm52_backends.ops.protocol import device_kernel

from .emulator_mc2 import Mc2Emulation
from .npu_errors import NpuOpError, _check, _not_emulated
from .versions import EMULATED_CANN, line_for, parse_cann

INT64_MAX = 9223372036854775807  # default of pre_tokens / next_tokens in every schema
ACL_FORMAT_ND, ACL_FORMAT_FRACTAL_NZ = 2, 29     # npu_format_cast's acl_format values
HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)

# npu_lightning_indexer, 参数说明 sparse_count: [1, 2048] and, from the 26.0.0 line on, these
LI_SPARSE_COUNTS_LARGE = (3072, 4096, 5120, 6144, 7168, 8192)
# npu_interleave_rope, 约束说明 (Atlas A2/A3): D of x, cos and sin must be 64
IROPE_DIM = 64
# npu_sparse_flash_attention, 参数说明 query: N1 on Atlas A2/A3
SFA_HEADS = (1, 2, 4, 8, 16, 32, 64, 128)


def _contiguous(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None:
            _check(t.is_contiguous(), op, f"{name} must be contiguous (不支持非连续)")


def _int32_vector(op: str, name: str, t: torch.Tensor) -> list[int]:
    _check(t.dtype == torch.int32, op, f"{name} must be int32, got {t.dtype}")
    _check(t.dim() == 1, op, f"{name} must be 1-D, got shape {tuple(t.shape)}")
    return [int(v) for v in t.tolist()]


def _prefix_sums(op: str, name: str, t: torch.Tensor, total: int) -> list[tuple[int, int]]:
    """TND lengths are prefix sums (参数说明: 前缀和): element b ends batch b; returns [start, end)."""
    ends = _int32_vector(op, name, t)
    _check(len(ends) > 0, op, f"{name} must hold one entry per batch")
    starts = [0] + ends[:-1]
    _check(all(e >= s for s, e in zip(starts, ends)) and ends[0] >= 0, op,
           f"{name} is a prefix sum for TND: non-negative and non-decreasing, got {ends}")
    _check(ends[-1] <= total, op, f"{name} ends at {ends[-1]} but the tensor holds {total} tokens")
    return list(zip(starts, ends))


def _valid_first(op: str, sparse_indices: torch.Tensor) -> None:
    # "每行有效值均在前半部分，无效值均在后半部分": once a row turns invalid (< 0) it stays invalid
    invalid = (sparse_indices < 0).int()
    _check(bool((invalid.cummax(-1).values == invalid).all()), op,
           "sparse_indices rows must hold their valid entries first and the invalid (-1) ones after")


def _sfa_math(op, query, query_rope, key, key_rope, value, sparse_indices, scale_value, block_table,
              actual_seq_lengths_query, actual_seq_lengths_kv, sbs, layout_query, layout_kv, sparse_mode,
              return_softmax_lse):
    """The sparse flash attention both ops compute, on checked arguments (key / key_rope / value in any
    float dtype: the C8 op hands them over dequantized): (out in query's dtype, softmax_max, softmax_sum)."""
    N1 = query.shape[-2]
    batches = _queries(op, query, layout_query, actual_seq_lengths_query)
    B = len(batches)
    gathers = [_keys(op, t, layout_kv, actual_seq_lengths_kv, block_table, B, "actual_seq_lengths_kv")
               for t in (key, key_rope, value)]
    kvs = [lambda fs=fs: torch.cat([f() for f in fs], -1) for fs in zip(*gathers)]   # [Lkv, 1, 512+64+512]
    if layout_query == "BSND":
        rope_q = [query_rope[b, :q.shape[0]] for (b, _), q in batches]
        idx_rows = [sparse_indices[b, :q.shape[0], 0] for (b, _), q in batches]
    else:
        rope_q = [query_rope[where] for where, _ in batches]
        idx_rows = [sparse_indices[where, 0] for where, _ in batches]

    out = torch.zeros(query.shape, dtype=query.dtype)           # rows no batch claims stay 0
    lse_shape = (1, query.shape[0], N1) if layout_query == "TND" else (query.shape[0], 1, query.shape[1], N1)
    smax = torch.full(lse_shape, float("-inf")) if return_softmax_lse else torch.empty(0)
    ssum = torch.zeros(lse_shape) if return_softmax_lse else torch.empty(0)
    # 功能说明: softmax(Q K~^T * scale) V~, K~/V~ gathered by sparse_indices: index b selects tokens
    # b*sparse_block_size .. +sparse_block_size-1; mode 3 also keeps only j <= (Lkv - Lq) + i.
    for (where, q), qr, sel, get_kv in zip(batches, rope_q, idx_rows, kvs):
        kv = get_kv()[:, 0].float()                                   # [Lkv, 512 + 64 + 512]
        Lq, Lkv = q.shape[0], kv.shape[0]
        if Lq == 0:
            continue
        pos = (sel.long()[..., None] * sbs + torch.arange(sbs)).flatten(1)    # [Lq, S * sbs]
        ok = (sel[..., None] >= 0).expand(-1, -1, sbs).flatten(1) & (pos < Lkv)
        if sparse_mode == 3:
            ok &= pos <= (Lkv - Lq) + torch.arange(Lq)[:, None]
        g = kv[pos.clamp(0, max(Lkv - 1, 0))] if Lkv else torch.zeros(*pos.shape, kv.shape[-1])
        g = torch.where(ok[..., None], g, 0.0)       # entries it skips (-1, masked) are never read
        k_cat, v = g[..., :576], g[..., 576:]                         # [Lq, S*sbs, 576], [.., 512]
        q_cat = torch.cat([q, qr], -1).float()                        # [Lq, N1, 576]
        s = torch.einsum("qnd,qsd->qns", q_cat, k_cat) * scale_value
        s = s.masked_fill(~ok[:, None, :], float("-inf"))
        m = s.amax(-1)                                                # [Lq, N1]
        e = torch.exp(s - m[..., None]).nan_to_num(0.0)               # rows without keys -> 0
        den = e.sum(-1)
        o = torch.einsum("qns,qsd->qnd", e, v) / den.clamp(min=1e-30)[..., None]
        out[where] = o.to(query.dtype)
        if return_softmax_lse:
            if layout_query == "TND":
                smax[0, where], ssum[0, where] = m, den
            else:
                b, rows = where
                smax[b, 0, rows], ssum[b, 0, rows] = m, den
    return out, smax, ssum


def _queries(op: str, query: torch.Tensor, layout: str, act: torch.Tensor | None):
    """Per batch: (index of its rows in a [B,S,...] or [T,...] output, its query [Lq, N, D])."""
    if layout == "TND":
        _check(act is not None, op, "actual_seq_lengths_query is required when layout_query is TND")
        return [(slice(s, e), query[s:e]) for s, e in _prefix_sums(op, "actual_seq_lengths_query", act,
                                                                     query.shape[0])]
    B, S = query.shape[0], query.shape[1]
    lens = [S] * B if act is None else _int32_vector(op, "actual_seq_lengths_query", act)
    _check(len(lens) == B, op, f"actual_seq_lengths_query has {len(lens)} entries for batch {B}")
    _check(all(0 <= n <= S for n in lens), op, f"actual_seq_lengths_query must lie in [0, S1={S}], got {lens}")
    return [((b, slice(0, n)), query[b, :n]) for b, n in enumerate(lens)]


def _keys(op: str, key: torch.Tensor, layout: str, act: torch.Tensor | None, block_table: torch.Tensor | None,
          B: int, act_name: str):
    """Per batch: a function returning its keys [Lk, N2, D] in position order."""
    if layout == "TND":
        _check(act is not None, op, f"{act_name} is required when the key layout is TND")
        spans = _prefix_sums(op, act_name, act, key.shape[0])
        _check(len(spans) == B, op, f"{act_name} has {len(spans)} entries for batch {B}")
        return [lambda s=s, e=e: key[s:e] for s, e in spans]
    if layout == "BSND":
        S = key.shape[1]
        _check(key.shape[0] == B, op, f"key batch {key.shape[0]} != query batch {B}")
        lens = [S] * B if act is None else _int32_vector(op, act_name, act)
        _check(len(lens) == B and all(0 <= n <= S for n in lens), op, f"{act_name} must give B={B} lengths in [0, {S}]")
        return [lambda b=b, n=n: key[b, :n] for b, n in enumerate(lens)]
    # PA_BSND: key [block_count, block_size, N2, D] addressed through block_table [B, max_blocks]
    _check(act is not None, op, f"{act_name} is required when the key layout is PA_BSND")
    _check(block_table is not None, op, "block_table is required when the key layout is PA_BSND")
    lens = _int32_vector(op, act_name, act)
    _check(len(lens) == B and all(n >= 0 for n in lens), op, f"{act_name} must give B={B} non-negative lengths")
    _check(block_table.dtype == torch.int32 and block_table.dim() == 2, op,
           f"block_table must be a 2-D int32 tensor, got {block_table.dtype} {tuple(block_table.shape)}")
    nblk, bs = key.shape[0], key.shape[1]
    need = max([-(-n // bs) for n in lens] + [0])
    _check(block_table.shape[0] == B, op, f"block_table has {block_table.shape[0]} rows for batch {B}")
    _check(block_table.shape[1] >= need, op,
           f"block_table has {block_table.shape[1]} columns, fewer than maxBlockNumPerSeq={need}")

    def gather(b: int, n: int) -> torch.Tensor:
        pos = torch.arange(n)
        blocks = block_table[b, pos // bs].long()
        _check(bool(((blocks >= 0) & (blocks < nblk)).all()), op,
               f"block_table row {b} points outside the {nblk} cache blocks")
        return key[blocks, pos % bs]
    return [lambda b=b, n=n: gather(b, n) for b, n in enumerate(lens)]


def _int8_codes(xf: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(xf / scale) per row (scale [...] for xf [..., K]), half to even, saturated to int8 [-128, 127];
    a row whose scale is 0 (all zeros: 0/0 on the device, unspecified by the docs) gets codes 0."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round(xf / safe[..., None]).clamp(-128, 127).to(torch.int8)


def _right_down_causal(Lq: int, Lk: int) -> torch.Tensor:
    """sparse_mode=3: query i of a batch may see key j iff j <= (Lk - Lq) + i.  -> [Lq, Lk] bool"""
    return torch.arange(Lk)[None, :] <= (Lk - Lq) + torch.arange(Lq)[:, None]


def _li_layouts(op: str, layout_query: str, layout_key: str) -> None:
    """Both lightning indexers' layout arguments (参数说明 layout_query / layout_key)."""
    _check(layout_query in ("BSND", "TND"), op, f"layout_query must be BSND or TND, got {layout_query!r}")
    _check(layout_key in ("PA_BSND", "BSND", "TND"), op, f"layout_key must be PA_BSND, BSND or TND, got {layout_key!r}")
    _check(layout_key == "PA_BSND" or layout_key == layout_query, op,
           f"without PageAttention layout_key must equal layout_query ({layout_key} != {layout_query})")


def _li_shapes(op: str, query, key, layout_query: str, layout_key: str) -> int:
    """Both lightning indexers' query / key shapes: the layouts' ranks, D = 128, N2 = 1, PA_BSND block
    sizes a multiple of 16 up to 1024. -> N1 (the line-dependent head limits are the caller's)."""
    _check(query.dim() == (4 if layout_query == "BSND" else 3), op,
           f"query must be {'[B,S1,N1,D]' if layout_query == 'BSND' else '[T1,N1,D]'}, got {tuple(query.shape)}")
    key_dims = {"PA_BSND": 4, "BSND": 4, "TND": 3}[layout_key]
    _check(key.dim() == key_dims, op, f"key must be {key_dims}-D for {layout_key}, got {tuple(key.shape)}")
    N1, D = query.shape[-2], query.shape[-1]
    _check(D == 128 and key.shape[-1] == 128, op, f"query and key D must be 128, got {D} and {key.shape[-1]}")
    _check(key.shape[-2] == 1, op, f"key N2 must be 1, got {key.shape[-2]}")
    if layout_key == "PA_BSND":
        bs = key.shape[1]
        _check(bs % 16 == 0 and 0 < bs <= 1024, op, f"block_size must be a multiple of 16 up to 1024, got {bs}")
    return N1


def _li_topk(batches, score, out_shape, sparse_count: int, sparse_mode: int, value_dtype):
    """The top-k step both lightning indexers share: per batch `score(where, q, b)` [Lq, Lk], the
    sparse_mode=3 mask, the best `sparse_count` keys (-1 where there are fewer). -> (indices int32
    `out_shape`, the values in `value_dtype`, or an empty tensor when None)."""
    indices = torch.full(out_shape, -1, dtype=torch.int32)     # -1 where the device leaves no index
    values = torch.full(out_shape, float("-inf"), dtype=value_dtype) if value_dtype is not None else \
        torch.empty(0)
    for b, (where, q) in enumerate(batches):
        s = score(where, q, b)
        Lq, Lk = s.shape
        if Lq == 0 or Lk == 0:
            continue
        if sparse_mode == 3:
            s = s.masked_fill(~_right_down_causal(Lq, Lk), float("-inf"))
        n = min(sparse_count, Lk)
        # best first; the device's tie order is unspecified, here exact ties go to the earlier key
        top_v, top_i = s.sort(dim=-1, descending=True, stable=True)
        top_v, top_i = top_v[:, :n], top_i[:, :n]
        valid = top_v > float("-inf")
        indices[where][..., 0, :n] = torch.where(valid, top_i, -1).to(torch.int32)
        if value_dtype is not None:
            values[where][..., 0, :n] = top_v.to(value_dtype)
    return indices, values


def _gmm_layouts(op: str, x, weight) -> list[bool]:
    """npu_grouped_matmul's layout checks (约束说明): x not transposed, weights all contiguous or all
    transposed views, last dims below the InnerLimit 65536. -> which weights are transposed."""
    for i, t in enumerate(x):
        _check(t.is_contiguous(), op, f"x[{i}] must not be transposed (x不支持转置)")
        _check(t.shape[-1] < 65536, op, f"x[{i}]'s last dim must be < 65536 (InnerLimit)")
    transposed = [w.dim() >= 2 and not w.is_contiguous() and w.transpose(-1, -2).is_contiguous() for w in weight]
    for i, w in enumerate(weight):
        _check(w.is_contiguous() or transposed[i], op, f"weight[{i}] must be contiguous or a transposed view")
        _check((w.shape[-2] if transposed[i] else w.shape[-1]) < 65536, op,
               f"weight[{i}]'s last dim must be < 65536 (InnerLimit)")
    _check(len(set(transposed)) == 1, op, "weights must all be transposed or all not")
    return transposed


def _gmm_groups(op: str, x, weight, group_list, split_item: int, group_list_type: int):
    """group_type=0 (groups along M), 单单单 (one x, one 3-D weight [E, K, N]) or 单多单 (one x, E 2-D
    weights): -> (the E weights [K, N], each group's [start, end) rows of x)."""
    _check(split_item in (2, 3), op, "group_type=0 supports only split_item 2 or 3 (one output tensor)")
    _check(len(x) == 1 and x[0].dim() == 2, op, "group_type=0 is emulated with a single 2-D x")
    single = len(weight) == 1 and weight[0].dim() == 3
    _check(single or all(w.dim() == 2 for w in weight), op, "weight is one 3-D tensor or a list of 2-D tensors")
    ws = list(weight[0]) if single else list(weight)
    E, (M, Kd) = len(ws), x[0].shape
    _check(all(w.shape[0] == Kd for w in ws), op, "every weight's K must equal x's last dim")
    _check(len({w.shape[1] for w in ws}) == 1, op, "every weight must have the same N")
    _check(isinstance(group_list, torch.Tensor), op, "group_list must be given (an int64 tensor)")
    _check(group_list.dtype == torch.int64 and group_list.dim() == 1, op, "group_list must be a 1-D int64 tensor")
    _check(group_list.shape[0] == E, op, f"group_list has {group_list.shape[0]} entries for {E} weights")
    _check(E <= (1024 if single else 128), op, f"at most {1024 if single else 128} groups, got {E}")
    _check(group_list_type in (0, 1), op,
           f"group_list_type must be 0 (cumsum) or 1 (counts), got {group_list_type}")
    gl = [int(v) for v in group_list.tolist()]
    if group_list_type == 0:
        _check(all(v >= 0 for v in gl) and all(b >= a for a, b in zip(gl, gl[1:])), op,
               "with group_list_type=0 group_list must be non-negative and non-decreasing")
        _check(gl[-1] == M, op, f"group_list's last value ({gl[-1]}) must equal x's first dim ({M})")
        ends = gl
    else:
        _check(all(v >= 0 for v in gl) and len(gl) != 1, op,
               "with group_list_type=1 group_list must be non-negative and not of length 1")
        _check(sum(gl) == M, op, f"group_list sums to {sum(gl)} but x has {M} rows")
        ends = torch.tensor(gl).cumsum(0).tolist()
    return ws, list(zip([0] + ends[:-1], ends))


def trans_quant_scale(encoded: torch.Tensor) -> torch.Tensor:
    """The float32 scale an npu_trans_quant_param int64 carries (its low 32 bits; the offset bits are read
    only where the op takes an offset too, which the backend never passes)."""
    return (encoded & 0xFFFFFFFF).to(torch.int32).view(torch.float32)


def _kernels(cls):
    """Each `npu_*` op runs as a device kernel (`device_kernel`): the values it reads from its inputs
    are read on the NPU by the real op, so graph capture (engine/graph.py, the "trace" stand-in of an
    NPU graph) records the op and replays it on the buffers' current values, while a host read in the
    backend's own code around the ops still refuses the capture, as on the device."""
    for name, fn in list(vars(cls).items()):
        if name.startswith("npu_") and callable(fn):
            def kernel(*a, _fn=fn, **k):
                with device_kernel():
                    return _fn(*a, **k)
            setattr(cls, name, functools.wraps(fn)(kernel))
    return cls


@_kernels
class NpuEmulator(_kernels(Mc2Emulation)):
    """The torch_npu ops used by the Ascend backend, on the CPU, as documented for the release line
    of `cann` (a CANN version string; versions.py). `allow_float32` lets the ops documented for
    bfloat16/float16 only on Atlas A2/A3 (npu_lightning_indexer, npu_sparse_flash_attention,
    npu_interleave_rope) take float32 too, an emulation convenience."""

    emulated = True

    def __init__(emu, *, allow_float32: bool = True, cann: str = EMULATED_CANN):
        parsed = parse_cann(cann)
        if parsed is None:
            raise ValueError(f"NpuEmulator: cann={cann!r} is not a CANN version (e.g. '8.5.0', '9.1.0')")
        emu.allow_float32 = allow_float32
        emu.half_op_dtypes = FLOATS if allow_float32 else HALF
        emu.cann_version = str(cann)
        emu.line = line_for(parsed)           # None: older than 8.5.0, no fused attention ops

    def __repr__(emu) -> str:
        return f"NpuEmulator(allow_float32={emu.allow_float32}, cann={emu.cann_version!r})"

    def _since_73(emu, op: str) -> str:
        """The emulated line's name; NpuOpError when `op` is not in it (added in the 7.3.0 line)."""
        if emu.line is None:
            raise NpuOpError(f"{op}: not in torch_npu before the 7.3.0 line (CANN 8.5.0); the emulated CANN is "
                             f"{emu.cann_version}")
        return emu.line.name

    # ---- hot op 1: npu_lightning_indexer ------------------------------------------------------
    def npu_lightning_indexer(emu, query, key, weights, *, actual_seq_lengths_query=None,
                              actual_seq_lengths_key=None, block_table=None, layout_query="BSND",
                              layout_key="BSND", sparse_count=2048, sparse_mode=3, pre_tokens=INT64_MAX,
                              next_tokens=INT64_MAX, return_value=False):
        op = "npu_lightning_indexer"
        line = emu._since_73(op)
        # 参数说明 / 约束说明 (torch_npu-npu_lightning_indexer.md of the emulated line)
        for name, t in (("query", query), ("key", key), ("weights", weights)):
            _check(t is not None and t.numel() > 0, op, f"{name} must be a non-empty tensor")
        _contiguous(op, query=query, key=key, weights=weights)
        _li_layouts(op, layout_query, layout_key)
        _check(query.dtype in emu.half_op_dtypes, op, f"query must be bfloat16 or float16, got {query.dtype}")
        _check(key.dtype == query.dtype, op, f"key dtype {key.dtype} must equal query dtype {query.dtype}")
        if line == "7.3.0":   # 参数说明 weights: bfloat16/float16; 约束说明: query, key, weights of one dtype
            _check(weights.dtype == query.dtype, op,
                   f"weights must have the query dtype on the 7.3.0 line (CANN 8.5.0), got {weights.dtype} for "
                   f"{query.dtype} queries (float32 weights are accepted from the 26.0.0 line on)")
        _check(weights.dtype in FLOATS, op, f"weights must be bfloat16, float16 or float32, got {weights.dtype}")
        _check(weights.dtype in (torch.float32, query.dtype), op,
               f"weights that are not float32 must have the query dtype ({weights.dtype} != {query.dtype})")
        N1 = _li_shapes(op, query, key, layout_query, layout_key)
        if line == "7.3.0":   # 参数说明 query: "N1仅支持64"
            _check(N1 == 64, op, f"query N1 must be 64 on the 7.3.0 line (CANN 8.5.0), got {N1} (the 26.0.0 line, "
                                 f"CANN 9.0.0, takes N1 <= 64)")
        _check(N1 <= 64, op, f"query N1 must be <= 64, got {N1}")
        _check(tuple(weights.shape) == tuple(query.shape[:-1]), op,
               f"weights must be {tuple(query.shape[:-1])} ([B,S1,N1] or [T,N1]), got {tuple(weights.shape)}")
        large = LI_SPARSE_COUNTS_LARGE if line != "7.3.0" else ()
        _check(1 <= sparse_count <= 2048 or sparse_count in large, op,
               f"sparse_count must be in [1, 2048]{f' or {large}' if large else ' on the 7.3.0 line'}, "
               f"got {sparse_count}")
        _check(sparse_mode in (0, 3), op, f"sparse_mode must be 0 or 3, got {sparse_mode}")
        _check(pre_tokens == INT64_MAX and next_tokens == INT64_MAX, op,
               "pre_tokens and next_tokens support only their default 2^63-1")
        _check(not (return_value and layout_key == "PA_BSND"), op,
               "return_value is supported only in training and not with layout_key PA_BSND")

        batches = _queries(op, query, layout_query, actual_seq_lengths_query)
        keys = _keys(op, key, layout_key, actual_seq_lengths_key, block_table, len(batches), "actual_seq_lengths_key")

        # 功能说明: Indices = Top-k over S_k of  sum_g W_g * ReLU(Q_g . K)
        def score(where, q, b):
            k = keys[b]()[:, 0].float()                                             # [Lk, D]
            return torch.einsum("qh,qhs->qs", weights[where].float(),
                                torch.relu(torch.einsum("qhd,sd->qhs", q.float(), k)))   # [Lq, Lk]
        indices, values = _li_topk(batches, score, (*query.shape[:-2], 1, sparse_count), sparse_count, sparse_mode,
                                   query.dtype if return_value else None)
        # 返回值说明 + meta: [B,S1,N2,sparse_count] or [T1,N2,sparse_count] int32; values [0] unless asked
        return indices, values if return_value else torch.empty(0, dtype=query.dtype)

    # ---- hot op 1, C8: npu_quant_lightning_indexer --------------------------------------------
    def npu_quant_lightning_indexer(emu, query, key, weights, query_dequant_scale, key_dequant_scale,
                                    query_quant_mode=0, key_quant_mode=0, *, actual_seq_lengths_query=None,
                                    actual_seq_lengths_key=None, block_table=None, layout_query="BSND",
                                    layout_key="BSND", sparse_count=2048, sparse_mode=3, pre_tokens=INT64_MAX,
                                    next_tokens=INT64_MAX, query_dtype=None, key_dtype=None):
        op = "npu_quant_lightning_indexer"
        line = emu._since_73(op)
        # 参数说明 / 约束说明 (torch_npu-npu_quant_lightning_indexer.md: docs/context on the 7.3.0 line,
        # docs/zh/custom_APIs later; the Atlas A2/A3 rows)
        tensors = (("query", query), ("key", key), ("weights", weights), ("query_dequant_scale", query_dequant_scale),
                   ("key_dequant_scale", key_dequant_scale))
        for name, t in tensors:
            _check(t is not None and t.numel() > 0, op, f"{name} must be a non-empty tensor")
        early = line in ("7.3.0", "26.0.0")     # the pages without the Atlas 350 column
        if early:             # every input 不支持非连续
            _contiguous(op, **dict(tensors))
        else:                 # 26.1.0 on: key and key_dequant_scale 支持非连续 (e.g. views of a packed cache)
            _contiguous(op, query=query, weights=weights, query_dequant_scale=query_dequant_scale)
        _check(query_quant_mode == 0 and key_quant_mode == 0, op,
               f"query_quant_mode and key_quant_mode support only 0 (per-token-head), got {query_quant_mode} and "
               f"{key_quant_mode}")
        if query_dtype is not None or key_dtype is not None:
            raise _not_emulated(op, "query_dtype / key_dtype (float8 / hifloat8 codes: Atlas 350 only)")
        _check(query.dtype == torch.int8 and key.dtype == torch.int8, op,
               f"query and key must be int8 on Atlas A2/A3, got {query.dtype} and {key.dtype}")
        for name, t in tensors[2:]:    # 约束说明 (Atlas A2/A3): weights, both scales float16, float16, float16
            _check(t.dtype == torch.float16, op, f"{name} must be float16 on Atlas A2/A3, got {t.dtype}")
        _li_layouts(op, layout_query, layout_key)
        N1 = _li_shapes(op, query, key, layout_query, layout_key)
        if early:             # 参数说明 query: "N1仅支持64"
            _check(N1 == 64, op, f"query N1 must be 64 on the {line} line, got {N1} (the 26.1.0 line, CANN 9.1.0, "
                                 f"takes 1..64)")
        _check(1 <= N1 <= 64, op, f"query N1 must be in [1, 64], got {N1}")
        for name, t in (("weights", weights), ("query_dequant_scale", query_dequant_scale)):
            _check(tuple(t.shape) == tuple(query.shape[:-1]), op,
                   f"{name} must be {tuple(query.shape[:-1])} ([B,S1,N1] or [T,N1]), got {tuple(t.shape)}")
        _check(tuple(key_dequant_scale.shape) == tuple(key.shape[:-1]), op,
               f"key_dequant_scale must be {tuple(key.shape[:-1])} (key without D), got {tuple(key_dequant_scale.shape)}")
        _check(1 <= sparse_count <= 2048, op, f"sparse_count must be in [1, 2048], got {sparse_count}")
        _check(sparse_mode in (0, 3), op, f"sparse_mode must be 0 or 3, got {sparse_mode}")
        _check(pre_tokens == INT64_MAX and next_tokens == INT64_MAX, op,
               "pre_tokens and next_tokens support only their default 2^63-1")
        # 约束说明: both dequant scales >= 0 (the key's: checked on the rows the op reads, below); W * Scale_Q
        # within float16's range
        _check(bool((query_dequant_scale >= 0).all()), op, "query_dequant_scale must be >= 0")
        _check(bool(((weights.float() * query_dequant_scale.float()).abs() <= 65504).all()), op,
               "weights * query_dequant_scale must lie in float16's range")

        batches = _queries(op, query, layout_query, actual_seq_lengths_query)
        keys = _keys(op, key, layout_key, actual_seq_lengths_key, block_table, len(batches), "actual_seq_lengths_key")
        kscales = _keys(op, key_dequant_scale, layout_key, actual_seq_lengths_key, block_table, len(batches),
                        "actual_seq_lengths_key")

        # 计算公式: out = Top-k over S_k of  sum_g W_g * ReLU((Scale_Q,g * Scale_K) * (Q_g^INT8 . K^INT8))
        def score(where, q, b):
            k, sk = keys[b]()[:, 0].float(), kscales[b]()[:, 0].float()          # [Lk, D], [Lk]
            _check(bool((sk >= 0).all()), op, f"key_dequant_scale must be >= 0 (batch {b} reads a row that is not)")
            dots = torch.einsum("qhd,sd->qhs", q.float(), k)                     # int8 products: exact in f32
            scaled = query_dequant_scale[where].float()[..., None] * sk[None, None, :] * dots
            return torch.einsum("qh,qhs->qs", weights[where].float(), torch.relu(scaled))
        # 返回值说明 + meta: one tensor, [B,S1,N2,k] or [T,N2,k] int32
        return _li_topk(batches, score, (*query.shape[:-2], 1, sparse_count), sparse_count, sparse_mode, None)[0]

    # ---- hot op 2: npu_sparse_flash_attention -------------------------------------------------
    def npu_sparse_flash_attention(emu, query, key, value, sparse_indices, scale_value, *, block_table=None,
                                   actual_seq_lengths_query=None, actual_seq_lengths_kv=None, query_rope=None,
                                   key_rope=None, sparse_block_size=1, layout_query="BSND", layout_kv="BSND",
                                   sparse_mode=3, pre_tokens=INT64_MAX, next_tokens=INT64_MAX, attention_mode=0,
                                   return_softmax_lse=False, sinks=None):
        op = "npu_sparse_flash_attention"
        line = emu._since_73(op)
        # 参数说明 / 约束说明 (torch_npu-npu_sparse_flash_attention.md); meta for the empty checks
        for name, t in (("query", query), ("key", key), ("sparse_indices", sparse_indices)):
            _check(t is not None and t.numel() > 0, op, f"{name} must be a non-empty tensor")
        _check(value is not None, op, "value=None is only supported with CANN >= 9.2.0 (meta registration)")
        _check(value.numel() > 0, op, "value must be a non-empty tensor")
        _check(attention_mode == 2, op, f"attention_mode supports only 2 (MLA-absorb), got {attention_mode}")
        _check(query_rope is not None and key_rope is not None, op,
               "attention_mode=2 concatenates query_rope/key_rope to query/key: both are required")
        _check(sinks is None, op, f"sinks is not in the schema of the {line} line (it came after 26.1.0), and "
                                  f"aclnnSparseFlashAttentionV2 is not supported on Atlas A2/A3")
        _contiguous(op, query=query, key=key, value=value, sparse_indices=sparse_indices,
                    query_rope=query_rope, key_rope=key_rope)
        _check(layout_query in ("BSND", "TND"), op, f"layout_query must be BSND or TND, got {layout_query!r}")
        _check(layout_kv in ("TND", "BSND", "PA_BSND"), op,
               f"layout_kv must be TND, BSND or PA_BSND, got {layout_kv!r}")
        _check(layout_kv == "PA_BSND" or layout_kv == layout_query, op,
               f"layout_kv {layout_kv} must equal layout_query {layout_query} unless it is PA_BSND")
        _check(query.dtype in emu.half_op_dtypes, op, f"query must be bfloat16 or float16, got {query.dtype}")
        _check(key.dtype == query.dtype and value.dtype == query.dtype, op,
               f"query, key and value dtypes must agree ({query.dtype}, {key.dtype}, {value.dtype})")
        _check(query_rope.dtype == query.dtype and key_rope.dtype == query.dtype, op,
               "query_rope and key_rope must have the query dtype")
        _check(tuple(value.shape) == tuple(key.shape), op,
               f"value shape {tuple(value.shape)} != key shape {tuple(key.shape)}")
        qdims = 4 if layout_query == "BSND" else 3
        kdims = 3 if layout_kv == "TND" else 4
        _check(query.dim() == qdims and query_rope.dim() == qdims, op,
               f"query/query_rope must be {qdims}-D for {layout_query}, got {tuple(query.shape)}")
        _check(key.dim() == kdims and key_rope.dim() == kdims, op,
               f"key/key_rope must be {kdims}-D for {layout_kv}, got {tuple(key.shape)}")
        N1 = query.shape[-2]
        _check(N1 in SFA_HEADS, op, f"query N1 must be one of {SFA_HEADS}, got {N1}")
        _check(key.shape[-2] == 1, op, f"KV_N must be 1, got {key.shape[-2]}")
        _check(query.shape[-1] == 512 and key.shape[-1] == 512, op,
               f"D of query/key/value must be 512, got {query.shape[-1]} and {key.shape[-1]}")
        _check(query_rope.shape[-1] == 64 and key_rope.shape[-1] == 64, op,
               f"D of query_rope/key_rope must be 64, got {query_rope.shape[-1]} and {key_rope.shape[-1]}")
        _check(tuple(query_rope.shape[:-1]) == tuple(query.shape[:-1]) and
               tuple(key_rope.shape[:-1]) == tuple(key.shape[:-1]), op, "rope tensors must match query/key but for D")
        _check(sparse_indices.dtype == torch.int32, op, f"sparse_indices must be int32, got {sparse_indices.dtype}")
        _check(tuple(sparse_indices.shape[:-1]) == (*query.shape[:-2], 1), op,
               f"sparse_indices must be {(*query.shape[:-2], 1, 'sparse_size')}, got {tuple(sparse_indices.shape)}")
        sbs = sparse_block_size
        _check(1 <= sbs <= 128 and sbs & (sbs - 1) == 0, op,
               f"sparse_block_size must be a power of 2 in [1, 128], got {sbs}")
        if layout_kv == "PA_BSND":
            bs = key.shape[1]
            _check(bs % 16 == 0 and 0 < bs <= 1024, op, f"block_size must be a multiple of 16 up to 1024, got {bs}")
            _check(bs % sbs == 0, op, f"sparse_block_size {sbs} must divide block_size {bs}")
        _check(sparse_mode in (0, 3), op, f"sparse_mode must be 0 or 3, got {sparse_mode}")
        _check(pre_tokens == INT64_MAX and next_tokens == INT64_MAX, op,
               "pre_tokens and next_tokens support only their default 2^63-1")
        _check(not (return_softmax_lse and layout_kv == "PA_BSND"), op,
               "return_softmax_lse is supported only in training and not with layout_kv PA_BSND")
        _valid_first(op, sparse_indices)
        return _sfa_math(op, query, query_rope, key, key_rope, value, sparse_indices, scale_value, block_table,
                         actual_seq_lengths_query, actual_seq_lengths_kv, sbs, layout_query, layout_kv, sparse_mode,
                         return_softmax_lse)

    def npu_kv_quant_sparse_flash_attention(emu, query, key, value, sparse_indices, scale_value, sparse_block_size,
                                            key_quant_mode, value_quant_mode, *, key_dequant_scale=None,
                                            value_dequant_scale=None, block_table=None, actual_seq_lengths_query=None,
                                            actual_seq_lengths_kv=None, layout_query="BSND", layout_kv="BSND",
                                            sparse_mode=3, attention_mode=0, quant_scale_repo_mode=0, tile_size=0,
                                            rope_head_dim=0):
        """The C8 sparse attention (torch_npu-npu_kv_quant_sparse_flash_attention.md, the 7.3.0 line on):
        npu_sparse_flash_attention over a key cache whose rows are the int8 k_nope, the query-dtype k_rope
        and the float32 per-tile scales concatenated along D (quant_scale_repo_mode=1, "combine"), each
        128-wide tile of k_nope dequantized by its scale (key/value_quant_mode=2, per_tile); MLA-absorb
        (attention_mode=2): query is q_nope || q_rope, key and value the same rows."""
        op = "npu_kv_quant_sparse_flash_attention"
        emu._since_73(op)
        for name, t in (("query", query), ("key", key), ("value", value), ("sparse_indices", sparse_indices)):
            _check(t is not None and t.numel() > 0, op, f"{name} must be a non-empty tensor")
        _contiguous(op, query=query, key=key, value=value, sparse_indices=sparse_indices)
        _check(query.dtype == torch.bfloat16, op, f"query must be bfloat16, got {query.dtype}")
        _check(key.dtype == torch.int8 and value.dtype == torch.int8, op,
               f"key and value must be int8, got {key.dtype} and {value.dtype}")
        _check(key_quant_mode == 2 and value_quant_mode == 2, op,
               f"key_quant_mode and value_quant_mode support only 2 (per_tile), got {key_quant_mode}, {value_quant_mode}")
        _check(key_dequant_scale is None and value_dequant_scale is None, op,
               "key_dequant_scale / value_dequant_scale are reserved (not supported)")
        _check(attention_mode == 2, op, f"attention_mode supports only 2 (MLA-absorb), got {attention_mode}")
        _check(quant_scale_repo_mode == 1, op,
               f"quant_scale_repo_mode supports only 1 (combine: scales stored with the data), got {quant_scale_repo_mode}")
        _check(layout_query in ("BSND", "TND"), op, f"layout_query must be BSND or TND, got {layout_query!r}")
        _check(layout_kv == "PA_BSND", op, f"layout_kv supports only PA_BSND, got {layout_kv!r}")
        _check(sparse_mode in (0, 3), op, f"sparse_mode must be 0 or 3, got {sparse_mode}")
        _check(sparse_indices.dtype == torch.int32, op, f"sparse_indices must be int32, got {sparse_indices.dtype}")
        _check(rope_head_dim == 64 and tile_size == 128, op,
               f"rope_head_dim must be 64 and tile_size 128 (the GLM / DeepSeek C8 rows), got {rope_head_dim}, {tile_size}")
        qdims = 4 if layout_query == "BSND" else 3
        _check(query.dim() == qdims and key.dim() == 4, op,
               f"query must be {qdims}-D for {layout_query} and key 4-D [block_num, block_size, KV_N, D], got "
               f"{tuple(query.shape)} and {tuple(key.shape)}")
        N1, Dq = query.shape[-2:]
        _check(N1 in SFA_HEADS, op, f"query N1 must be one of {SFA_HEADS}, got {N1}")
        nope = Dq - rope_head_dim
        _check(nope == 512, op, f"query D must be 512 + rope_head_dim {rope_head_dim}, got {Dq}")
        width = nope + 2 * rope_head_dim + 4 * (nope // tile_size)     # int8 | bf16 rope | f32 per-tile scales
        _check(key.shape[-2] == 1 and key.shape[-1] == width, op,
               f"key must be [block_num, block_size, 1, {width}] (int8 {nope} | bf16 rope {rope_head_dim} | f32 "
               f"{nope // tile_size} scales), got {tuple(key.shape)}")
        _check(tuple(value.shape) == tuple(key.shape), op, "value must be the key rows (MLA-absorb: the same cache)")
        bs = key.shape[1]
        _check(bs % 16 == 0 and 0 < bs <= 1024, op, f"block_size must be a multiple of 16 up to 1024, got {bs}")
        sbs = sparse_block_size
        _check(sbs == 1, op, f"sparse_block_size supports only 1 here, got {sbs}")
        _check(tuple(sparse_indices.shape[:-1]) == (*query.shape[:-2], 1), op,
               f"sparse_indices must be {(*query.shape[:-2], 1, 'sparse_size')}, got {tuple(sparse_indices.shape)}")
        _valid_first(op, sparse_indices)
        raw = key.view(torch.uint8)
        codes = key[..., :nope].float()
        rope = raw[..., nope:nope + 2 * rope_head_dim].contiguous().view(torch.bfloat16)
        scales = raw[..., nope + 2 * rope_head_dim:].contiguous().view(torch.float32)
        k_nope = codes * scales.repeat_interleave(tile_size, dim=-1)
        out, _, _ = _sfa_math(op, query[..., :nope], query[..., nope:], k_nope, rope.float(), k_nope, sparse_indices,
                              scale_value, block_table, actual_seq_lengths_query, actual_seq_lengths_kv, sbs,
                              layout_query, layout_kv, sparse_mode, False)
        return out

    # ---- hot op 3: routing and grouped GEMM ---------------------------------------------------
    def npu_moe_gating_top_k(emu, x, k, *, bias=None, input_ids=None, tid2eid=None, k_group=1, group_count=1,
                             group_select_mode=0, renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0,
                             eps=1e-20):
        op = "npu_moe_gating_top_k"
        # 参数说明 (torch_npu-npu_moe_gating_top_k.md)
        _check(x.dim() == 2, op, f"x must be 2-D, got shape {tuple(x.shape)}")
        _check(x.dtype in FLOATS, op, f"x must be float16, bfloat16 or float32, got {x.dtype}")
        E = x.shape[-1]
        _check(E <= 2048, op, f"the expert count (x's last dim) must be <= 2048, got {E}")
        if bias is not None:
            _check(bias.dim() == 1 and bias.shape[0] == E, op, f"bias must be 1-D [{E}], got {tuple(bias.shape)}")
            _check(bias.dtype == x.dtype, op, f"bias dtype {bias.dtype} must equal x dtype {x.dtype}")
        _check((input_ids is None) == (tid2eid is None), op,
               "input_ids and tid2eid must be both provided or both omitted")
        if input_ids is not None:
            raise _not_emulated(op, "hash mode (input_ids / tid2eid)")
        _check(group_count > 0 and E % group_count == 0 and E // group_count > 2, op,
               f"x's last dim ({E}) must divide into group_count={group_count} groups of more than 2 experts")
        _check(-(-(E // group_count) // 32) * 32 * group_count <= 2048, op,
               "the group size aligned up to 32, times group_count, must be <= 2048")
        _check(1 <= k_group <= group_count, op, f"k_group must be in [1, group_count={group_count}], got {k_group}")
        _check(1 <= k <= E // group_count * k_group, op,
               f"k must be in [1, x_shape[-1] / group_count * k_group = {E // group_count * k_group}], got {k}")
        _check(group_select_mode in (0, 1), op, f"group_select_mode must be 0 or 1, got {group_select_mode}")
        _check(renorm == 0, op, f"renorm supports only 0 (norm before top-k), got {renorm}")
        _check(norm_type in (0, 1), op, f"norm_type must be 0 (softmax) or 1 (sigmoid), got {norm_type}")

        # 等价计算逻辑 (the doc's numpy golden), in float32; sorts are stable like numpy's kind='stable'
        xf = x.float()
        normed = torch.softmax(xf, -1) if norm_type == 0 else torch.sigmoid(xf)        # normOut [T, E]
        choice = normed + bias.float() if bias is not None else normed.clone()
        T = x.shape[0]
        if group_count > 1:
            grouped = choice.view(T, group_count, E // group_count)
            if group_select_mode == 0:
                score = grouped.amax(-1)
            else:
                score = grouped.sort(dim=-1, descending=True).values[..., :2].sum(-1)
            keep = score.sort(dim=-1, descending=True, stable=True).indices[:, :k_group]   # [T, k_group]
            mask = torch.ones(T, group_count, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(mask[..., None], float("-inf")).view(T, E)
        idx = choice.sort(dim=-1, descending=True, stable=True).indices[:, :k]            # [T, k]
        y = normed.gather(1, idx)
        if norm_type == 1:
            y = y / (y.sum(-1, keepdim=True) + eps)
        y = y * routed_scaling_factor
        # meta: (y [T,k] x.dtype, expert_idx [T,k] int32, norm_out [T,E] float32)
        return y.to(x.dtype), idx.to(torch.int32), normed

    def npu_moe_init_routing_v2(emu, x, expert_idx, *, scale=None, offset=None, active_num=-1, expert_capacity=-1,
                                expert_num=-1, drop_pad_mode=0, expert_tokens_num_type=0,
                                expert_tokens_num_flag=False, quant_mode=-1, active_expert_range=[],  # noqa: B006
                                row_idx_type=0, x_dtype=None):
        op = "npu_moe_init_routing_v2"
        # 参数说明 (torch_npu-npu_moe_init_routing_v2.md) and the meta registration's checks
        _check(x.dim() == 2, op, f"the x shape support only 2d, got {tuple(x.shape)}")
        _check(expert_idx.dim() == 2, op, f"the expert_idx shape support only 2d, got {tuple(expert_idx.shape)}")
        _check(x.shape[0] == expert_idx.shape[0], op, "the first dim of expert_idx and x should be the same")
        _check(x.dtype in FLOATS + (torch.int8,), op, f"x must be float16, bfloat16, float32 or int8, got {x.dtype}")
        _check(expert_idx.dtype == torch.int32, op, f"expert_idx must be int32, got {expert_idx.dtype}")
        _check(drop_pad_mode in (0, 1), op, f"drop_pad_mode must be in [0, 1], got {drop_pad_mode}")
        _check(expert_tokens_num_type in (0, 1, 2), op,
               f"expert_tokens_num_type must be in [0, 1, 2], got {expert_tokens_num_type}")
        _check(row_idx_type in (0, 1), op, f"row_idx_type must be in [0, 1], got {row_idx_type}")
        _check(active_num >= -1, op, f"active_num must be >= 0 (or the default -1), got {active_num}")
        limit = 5120 if expert_tokens_num_type == 2 else 10240
        _check(-1 <= expert_num <= limit, op, f"expert_num must be in [0, {limit}], got {expert_num}")
        # 参数说明 active_expert_range: "传入默认值时，视为活跃的expert范围在0到expert_num之间", its end
        # "不大于expert_num", and the count output is [expert_end - expert_start]: with the default
        # expert_num=-1 there is no range and nothing to size that output by.
        _check(expert_num >= 0 or not (expert_tokens_num_flag or len(active_expert_range)), op,
               "expert_num=-1 (the default) leaves the active expert range [0, expert_num) and the "
               "expert_token_cumsum_or_count output [expert_end - expert_start] unsized: pass expert_num")
        if len(active_expert_range):
            _check(len(active_expert_range) == 2, op, "active_expert_range must be int[2]")
            start, end = int(active_expert_range[0]), int(active_expert_range[1])
            _check(end > start, op, "active_expert_range must be increasing")
            _check(start >= 0 and end <= 10240, op, "active_expert_range must be within [0, 10240]")
            _check(end <= expert_num, op, f"active_expert_range end {end} exceeds expert_num {expert_num}")
        else:
            start, end = 0, expert_num if expert_num >= 0 else None
        if expert_num > 0:
            _check(bool((expert_idx < expert_num).all()), op, f"expert ids must not exceed expert_num={expert_num}")
        # 参数说明 quant_mode: -1 none, 0 static int8, 1 dynamic int8 (the values of this page's lines)
        _check(quant_mode in (-1, 0, 1), op,
               f"quant_mode must be -1 (none), 0 (static) or 1 (dynamic), got {quant_mode}")
        if quant_mode == 0 or x_dtype is not None:
            raise _not_emulated(op, f"quant_mode={quant_mode} / x_dtype={x_dtype}")
        if drop_pad_mode == 1:
            raise _not_emulated(op, "drop_pad_mode=1")
        if quant_mode == 1:
            # 返回值说明 expanded_x: "量化场景下，当x的数据类型为int8时，输出值无意义"
            if x.dtype == torch.int8:
                raise _not_emulated(op, "quant_mode=1 with int8 x (the doc leaves its output undefined)")
            _check(offset is None, op, "offset is not an input of dynamic quantisation (quant_mode=1): pass None")
            if scale is not None:   # smooth scales: (expert_end - expert_start, H) or (1, H), float32
                _check(scale.dtype == torch.float32, op, f"scale must be float32, got {scale.dtype}")
                _check(scale.dim() == 2 and scale.shape[1] == x.shape[1], op,
                       f"in dynamic quant mode scale must be 2-D (expert_end - expert_start, H={x.shape[1]}) or "
                       f"(1, H), got {tuple(scale.shape)}")
                _check(scale.shape[0] == 1 or (end is not None and scale.shape[0] == end - start), op,
                       f"scale has {scale.shape[0]} rows; dynamic quant mode takes 1 or expert_end - expert_start")
        elif scale is not None:
            _check(scale.dim() == 1 and scale.shape[0] == x.shape[0], op,
                   "the scale shape support only 1D (bs,) in no quant mode")

        # 功能说明 1-6 and 等价计算逻辑 (dropless; no quantisation or dynamic int8, quant_mode=1)
        NUM_ROWS, K = expert_idx.shape
        flat = expert_idx.flatten().long()
        in_range = (flat >= start) & (flat < end if end is not None else torch.ones_like(flat, dtype=torch.bool))
        sort_key = torch.where(flat < start, torch.iinfo(torch.int32).max, flat)      # ids below the range go last
        order = sort_key.sort(stable=True).indices                                   # sortedRowIdx
        available = int(in_range.sum())
        if row_idx_type == 1:
            expanded_row_idx = order.to(torch.int32)                                 # scatter index
        else:
            expanded_row_idx = torch.full((NUM_ROWS * K,), -1, dtype=torch.int32)    # gather index
            expanded_row_idx[order[:available]] = torch.arange(available, dtype=torch.int32)
        n_out = NUM_ROWS * K if active_num <= 0 else min(active_num, NUM_ROWS * K)   # meta: rows of expanded_x
        n_valid = min(available, n_out)
        expanded_scale = torch.zeros(n_out, dtype=torch.float32)
        if quant_mode == 1:
            # 功能说明 4 (dynamic) and the numpy golden: each expanded row, in float32 and times its
            # expert's smooth scale row when one is given, gets s = row_max(|row|) / 127 and the codes
            # round(row / s) (np.round: half to even; saturated); rows past the available ones are
            # unspecified: 0 here, scale 0. A row of zeros gets s = 0 and codes 0 (0/0 on the device).
            rows = x[order[:n_valid] // K].float()
            if scale is not None:
                rows = rows * (scale.float()[:1] if scale.shape[0] == 1 else
                               scale.float()[flat[order[:n_valid]] - start])
            s = rows.abs().amax(-1) / 127 if rows.shape[1] else torch.zeros(n_valid)
            expanded_x = torch.zeros((n_out, x.shape[1]), dtype=torch.int8)
            expanded_x[:n_valid] = _int8_codes(rows, s)
            expanded_scale[:n_valid] = s
        else:
            # rows past the available ones are unspecified (返回值说明): NaN here, 0 for int8 x
            expanded_x = torch.full((n_out, x.shape[1]), float("nan") if x.is_floating_point() else 0,
                                    dtype=x.dtype)
            expanded_x[:n_valid] = x[order[:n_valid] // K]
            if scale is not None:
                expanded_scale[:n_valid] = scale[order[:n_valid] // K].float()
        if not expert_tokens_num_flag:
            counts = torch.zeros((), dtype=torch.int64)                              # meta: shape []
        else:
            width = end - start                                                      # sized by the range
            hist = torch.bincount(flat[in_range] - start, minlength=width)[:width]
            if expert_tokens_num_type == 0:
                counts = hist.cumsum(0)
            elif expert_tokens_num_type == 1:
                counts = hist
            else:                                                                    # key_value: non-zero experts first
                _check(expert_num > 0, op, "expert_tokens_num_type=2 needs expert_num")
                counts = torch.zeros(expert_num, 2, dtype=torch.int64)
                nz = hist.nonzero().flatten()
                counts[:len(nz), 0], counts[:len(nz), 1] = nz + start, hist[nz]
            counts = counts.to(torch.int64)
        return expanded_x, expanded_row_idx, counts, expanded_scale

    def npu_grouped_matmul(emu, x, weight, *, bias=None, scale=None, offset=None, antiquant_scale=None,
                           antiquant_offset=None, per_token_scale=None, group_list=None, activation_input=None,
                           activation_quant_scale=None, activation_quant_offset=None, split_item=0, group_type=None,
                           group_list_type=0, act_type=0, tuning_config=None, output_dtype=None, x_dtype=None,
                           weight_dtype=None, scale_dtype=None, per_token_scale_dtype=None):
        op = "npu_grouped_matmul"
        # 参数说明 / 约束说明 (torch_npu-npu_grouped_matmul.md) of Atlas A2/A3: the non-quantised float path
        # (公式1) and the int8 x int8 全量化 path with per-channel scale and per-token scale (公式2/3)
        _check(isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)), op,
               "x and weight are lists of tensors")
        _check(0 < len(x) <= 128 and 0 < len(weight) <= 128, op, "x and weight hold 1..128 tensors")
        for i, t in enumerate(x):
            emu._nz_input(op, f"x[{i}]", t, weight=False)
        for i, t in enumerate(weight):
            emu._nz_input(op, f"weight[{i}]", t, weight=True)
        _check(x_dtype is None and weight_dtype is None and scale_dtype is None and per_token_scale_dtype is None, op,
               "x_dtype / weight_dtype / scale_dtype / per_token_scale_dtype are not supported on Atlas A2/A3")
        _check(offset is None, op, "offset supports only None")
        if antiquant_scale is not None or antiquant_offset is not None:
            raise _not_emulated(op, "pseudo-quantised (antiquant_scale / antiquant_offset) matmul")
        _check(activation_input is None and activation_quant_scale is None and activation_quant_offset is None, op,
               "activation_input / activation_quant_scale / activation_quant_offset only support None")
        if group_type == 2:
            raise _not_emulated(op, "group_type=2 (groups along K)")
        _check(group_type in (-1, 0), op, f"group_type supports -1, 0 and 2 on Atlas A2/A3, got {group_type}")
        _check(split_item in (0, 1, 2, 3), op, f"split_item must be 0..3, got {split_item}")
        int8 = x[0].dtype == torch.int8
        if int8 or any(w.dtype in (torch.int8, torch.int32) for w in weight):
            return emu._grouped_matmul_int8(op, x, weight, bias, scale, per_token_scale, group_list, split_item,
                                            group_type, group_list_type, act_type, output_dtype)
        _check(scale is None and per_token_scale is None, op,
               "scale / per_token_scale belong to the int8 (全量化) path; x is not int8")
        _check(act_type == 0, op, "activation functions are computed only in the per-token quantised case")
        dt = x[0].dtype
        for t in (*x, *weight):
            _check(t.dtype in FLOATS and t.dtype == dt, op, f"x and weight must share one float dtype, got {t.dtype}")
        _check(output_dtype in (None, dt), op, f"output_dtype must be None or {dt} without quantisation")
        _gmm_layouts(op, x, weight)
        if bias is not None:
            _check(group_type == -1 and len(bias) == len(weight), op, "bias is emulated for group_type=-1 only")

        if group_type == -1:                                    # 多多多: independent matmuls, no group_list
            _check(split_item in (0, 1) and group_list is None and len(x) == len(weight), op,
                   "group_type=-1 needs split_item 0/1, no group_list and as many x as weight tensors")
            out = []
            for i, (xi, wi) in enumerate(zip(x, weight)):
                _check(wi.dim() == 2 and xi.shape[-1] == wi.shape[0], op, f"x[{i}] and weight[{i}] do not chain")
                yi = xi.float() @ wi.float() + (bias[i].float() if bias is not None else 0.0)
                out.append(yi.to(dt))
            return out

        ws, spans = _gmm_groups(op, x, weight, group_list, split_item, group_list_type)
        # 计算公式 (公式1): y_i = x_i @ weight_i for the rows of group i
        y = torch.empty(x[0].shape[0], ws[0].shape[1], dtype=dt)
        for w, (s, e) in zip(ws, spans):
            y[s:e] = (x[0][s:e].float() @ w.float()).to(dt)
        return [y]

    def _grouped_matmul_int8(emu, op, x, weight, bias, scale, per_token_scale, group_list, split_item, group_type,
                             group_list_type, act_type, output_dtype):
        """npu_grouped_matmul with int8 x and int8 weights, groups along M (表 2, A2/A3, group_list a Tensor):
        per-channel scale [E, N] (one 3-D weight) or [N] per 2-D weight, float32 or bfloat16, optional
        per-token scale [M] float32; y = (x_i @ weight_i) * scale_i (* per_token_scale rows), 公式2/3."""
        if x[0].dtype != torch.int8 or any(w.dtype == torch.int32 for w in weight):
            raise _not_emulated(op, "int4 weights, and int8 weights with float x (weight-only, 伪量化)")
        for i, t in enumerate(x):
            _check(t.dtype == torch.int8, op, f"x[{i}] must be int8 like x[0], got {t.dtype}")
        for i, w in enumerate(weight):
            _check(w.dtype == torch.int8, op, f"weight[{i}] must be int8 for int8 x, got {w.dtype}")
        if group_type != 0:
            raise _not_emulated(op, f"the int8 path with group_type={group_type} (only 0, groups along M)")
        if group_list_type == 2:
            raise _not_emulated(op, "group_list_type=2 ([E, 2] index/count pairs)")
        _check(act_type == 0 or per_token_scale is not None, op,
               "activation functions are computed only in the per-token quantised case")
        if act_type != 0:
            raise _not_emulated(op, f"act_type={act_type} (fused activation)")
        if bias is not None:
            raise _not_emulated(op, "bias in the int8 path")
        _check(scale is not None, op, "int8 x needs scale (the per-channel dequantisation scale)")
        _check(isinstance(scale, (list, tuple)) and len(scale) == len(weight), op,
               "scale is a list with one tensor per weight tensor")
        sdt = scale[0].dtype
        if sdt == torch.int64:
            raise _not_emulated(op, "int64 scale (npu_trans_quant_param bit patterns, int8 output)")
        _check(all(t.dtype == sdt for t in scale) and sdt in (torch.float32, torch.bfloat16), op,
               f"scale must be float32 or bfloat16 (or int64) on Atlas A2/A3, got {sdt}")
        if per_token_scale is not None:
            _check(isinstance(per_token_scale, (list, tuple)) and len(per_token_scale) == len(x), op,
                   "per_token_scale is a list with one tensor per x tensor")
            for i, (p, xi) in enumerate(zip(per_token_scale, x)):
                _check(p.dtype == torch.float32, op, f"per_token_scale[{i}] must be float32, got {p.dtype}")
                _check(p.dim() == 1 and p.shape[0] == xi.shape[0], op,
                       f"per_token_scale[{i}] must be 1-D [M={xi.shape[0]}], got {tuple(p.shape)}")
        # 表 2: scale bfloat16 -> output bfloat16; scale float32 -> output float16 (with or without
        # per_token_scale); float32 output only as the emulator's float32 convenience
        want = {torch.bfloat16: torch.bfloat16, torch.float32: torch.float16}[sdt]
        ok = output_dtype == want or (emu.allow_float32 and sdt == torch.float32 and output_dtype == torch.float32)
        _check(ok, op, f"with int8 x and {str(sdt).removeprefix('torch.')} scale the output dtype must be "
                       f"{str(want).removeprefix('torch.')} on Atlas A2/A3 (表 2), got output_dtype={output_dtype}")
        _gmm_layouts(op, x, weight)
        ws, spans = _gmm_groups(op, x, weight, group_list, split_item, group_list_type)
        N = ws[0].shape[1]
        single = len(weight) == 1 and weight[0].dim() == 3
        if single:
            _check(scale[0].dim() == 2 and tuple(scale[0].shape) == (len(ws), N), op,
                   f"scale of a 3-D weight [E, K, N] must be [E={len(ws)}, N={N}], got {tuple(scale[0].shape)}")
            scales = list(scale[0])
        else:
            for i, t in enumerate(scale):
                _check(t.dim() == 1 and t.shape[0] == N, op, f"scale[{i}] must be 1-D [N={N}], got {tuple(t.shape)}")
            scales = list(scale)
        # 公式2 / 公式3-1 without bias: y_i = (x_i @ weight_i) * scale_i [* pertokenscale_i], int32
        # accumulation (exact here: int64), the scaling in float32
        xq = x[0]
        pts = per_token_scale[0].float() if per_token_scale is not None else None
        y = torch.empty(xq.shape[0], N, dtype=output_dtype)
        for w, sc, (s, e) in zip(ws, scales, spans):
            acc = (xq[s:e].long() @ w.long()).float() * sc.float()[None, :]
            if pts is not None:
                acc = acc * pts[s:e, None]
            y[s:e] = acc.to(output_dtype)
        return [y]

    def npu_swiglu(emu, self, dim=-1):
        op = "npu_swiglu"
        # 功能描述: out = swish(A) * B = A * sigmoid(A) * B, A/B the halves of self along dim
        _check(self.dtype in FLOATS, op, f"self must be float32, float16 or bfloat16, got {self.dtype}")
        _check(1 <= self.dim() <= 8, op, f"self must have 1-8 dims, got {self.dim()}")
        _check(self.shape[dim] % 2 == 0, op, f"the split dim must be even, got {self.shape[dim]}")
        a, b = self.float().chunk(2, dim=dim)
        return (a * torch.sigmoid(a) * b).to(self.dtype)

    def npu_moe_token_unpermute(emu, permuted_tokens, sorted_indices, probs=None, padded_mode=False,
                                restore_shape=None):
        op = "npu_moe_token_unpermute"
        # 参数说明 / 约束说明 (torch_npu-npu_moe_token_unpermute.md) and the meta registration
        _check(permuted_tokens.dim() == 2, op, f"permuted_tokens must be 2-D, got {permuted_tokens.dim()}-D")
        _check(sorted_indices.dim() == 1, op, f"sorted_indices must be 1-D, got {sorted_indices.dim()}-D")
        _check(permuted_tokens.dtype in FLOATS, op,
               f"permuted_tokens must be float16/bfloat16/float32, got {permuted_tokens.dtype}")
        _check(sorted_indices.dtype == torch.int32, op, f"sorted_indices must be int32, got {sorted_indices.dtype}")
        _check(not padded_mode and restore_shape is None, op,
               "padded_mode supports only False, restore_shape only None")
        topk = 1
        if probs is not None:
            _check(probs.dim() == 2, op, f"probs must be 2-D, got {probs.dim()}-D")
            _check(probs.dtype in FLOATS, op, f"probs must be float16/bfloat16/float32, got {probs.dtype}")
            topk = probs.shape[1]
        _check(topk <= 512, op, f"topK_num must be <= 512 on Atlas A2/A3, got {topk}")
        NK = sorted_indices.shape[0]
        _check(NK % topk == 0, op, f"sorted_indices length {NK} is not tokens_num * topK_num ({topk})")
        tokens = NK // topk
        if probs is not None:
            _check(probs.shape[0] == tokens, op, f"probs must be [{tokens}, {topk}], got {tuple(probs.shape)}")
        s = sorted_indices.long()
        _check(bool(((s >= 0) & (s < NK)).all()), op, f"sorted_indices must lie in [0, {NK - 1}]")
        _check(s.unique().numel() == NK, op, "sorted_indices must not repeat an index")
        _check(permuted_tokens.shape[0] >= NK, op, f"permuted_tokens has {permuted_tokens.shape[0]} rows, needs {NK}")
        # 计算公式: O[i] = sum_{j<topK} T[S[i*topK + j]] * P[i][j]
        rows = permuted_tokens[s].float().view(tokens, topk, -1)
        if probs is not None:
            rows = rows * probs.float()[..., None]
        return rows.sum(1).to(permuted_tokens.dtype)

    # ---- int8 quantisation (W8A8): npu_dynamic_quant, npu_quantize, npu_quant_matmul ----------------
    def npu_dynamic_quant(emu, input, *, smooth_scales=None, group_index=None, dst_type=None,  # noqa: A002
                          quant_mode="pertoken", dst_type_max=0.0):
        op = "npu_dynamic_quant"
        # 参数说明 / 约束说明 (torch_npu-npu_dynamic_quant.md, Atlas A2/A3): input float16/bfloat16 with more
        # than one dim (non-contiguous allowed); dst_type int8 or quint4x2; quant_mode and dst_type_max
        # are not supported there (pertoken); smooth_scales [K] of input's dtype, or [G, K] with
        # group_index int32 [G] (MoE: rows group_index[g-1]..group_index[g] use row g).
        _check(input.dtype in emu.half_op_dtypes, op, f"input must be float16 or bfloat16, got {input.dtype}")
        _check(input.dim() > 1, op, f"input must have more than one dim, got {input.dim()}")
        if dst_type == torch.quint4x2:
            raise _not_emulated(op, "dst_type=quint4x2 (int4 packed in int32)")
        _check(dst_type in (None, torch.int8), op, f"dst_type must be int8 or quint4x2 on Atlas A2/A3, got {dst_type}")
        _check(quant_mode == "pertoken", op, f"quant_mode {quant_mode!r}: Atlas A2/A3 quantise per token only "
                                             f"('perchannel' / 'pertensor' are Ascend 950 only)")
        _check(dst_type_max == 0.0, op, "dst_type_max is not supported on Atlas A2/A3")
        _check(group_index is None or smooth_scales is not None, op, "group_index needs smooth_scales")
        K = input.shape[-1]
        xf = input.float()
        if smooth_scales is not None:
            _check(smooth_scales.dtype == input.dtype, op,
                   f"smooth_scales must have input's dtype in single-operator mode ({smooth_scales.dtype} != "
                   f"{input.dtype})")
            if group_index is None:
                _check(smooth_scales.dim() == 1 and smooth_scales.shape[0] == K, op,
                       f"smooth_scales must be 1-D [{K}] (input's last dim), got {tuple(smooth_scales.shape)}")
                xf = xf * smooth_scales.float()
            else:
                G, rows = smooth_scales.shape[0], input.numel() // max(K, 1)
                _check(smooth_scales.dim() == 2 and smooth_scales.shape[1] == K and 1 <= G <= 1024, op,
                       f"with group_index smooth_scales must be [G in 1..1024, {K}], got {tuple(smooth_scales.shape)}")
                ends = _int32_vector(op, "group_index", group_index)
                _check(len(ends) == G, op, f"group_index has {len(ends)} entries for {G} smooth_scales rows")
                _check(ends[0] >= 0 and all(b >= a for a, b in zip(ends, ends[1:])) and ends[-1] == rows, op,
                       f"group_index must increase monotonically and end at the row count {rows}, got {ends}")
                grp = torch.bucketize(torch.arange(rows), torch.tensor(ends), right=True)
                xf = (xf.reshape(rows, K) * smooth_scales.float()[grp]).view(input.shape)
        # 计算公式: scale = rowMax(|x|) / DTYPE_MAX (127), y = round(x / scale) (round half to even,
        # saturated to [-128, 127]); all in float32
        scale = xf.abs().amax(-1) / 127 if K else torch.zeros(input.shape[:-1])
        return _int8_codes(xf, scale), scale

    def npu_quantize(emu, self, scales, zero_points, dtype, axis=1, div_mode=True):
        op = "npu_quantize"
        # 参数说明 (torch_npu-npu_quantize.md, Atlas A2/A3): result = self / scales + zero_points
        # (div_mode=True) or self * scales + zero_points (div_mode=False), rounded (half to even here;
        # the page names no mode) and saturated to the output dtype. Empty tensors are allowed.
        _check(self.dtype in FLOATS, op, f"self must be float32, float16 or bfloat16, got {self.dtype}")
        outs = {torch.qint8: torch.int8, torch.int8: torch.int8, torch.quint8: torch.uint8, torch.int32: torch.int32}
        if div_mode:
            _check(dtype in (torch.qint8, torch.quint8, torch.int32), op,
                   f"with div_mode=True dtype must be qint8, quint8 or int32, got {dtype}")
            _check(scales.dtype in (torch.float32, torch.bfloat16), op,
                   f"with div_mode=True scales must be float32 or bfloat16, got {scales.dtype}")
            _check(zero_points is None or zero_points.dtype in (torch.int8, torch.uint8, torch.int32, torch.bfloat16),
                   op, f"with div_mode=True zero_points must be int8, uint8, int32 or bfloat16, got "
                       f"{getattr(zero_points, 'dtype', None)}")
            _check(-self.dim() <= axis < self.dim(), op, f"axis must lie in [-{self.dim()}, {self.dim()}), got {axis}")
            ax = axis % self.dim()
        else:
            if dtype == torch.quint4x2:
                raise _not_emulated(op, "dtype=quint4x2 (int4 packed in int32)")
            _check(dtype in (torch.qint8, torch.int8), op,
                   f"with div_mode=False dtype must be qint8, int8 or quint4x2 on Atlas A2/A3, got {dtype}")
            _check(scales.dtype == self.dtype, op,
                   f"with div_mode=False scales must have self's dtype ({scales.dtype} != {self.dtype})")
            _check(zero_points is None or (zero_points.dtype == scales.dtype and zero_points.shape == scales.shape),
                   op, "with div_mode=False zero_points must have the shape and dtype of scales")
            _check(axis >= -2, op, f"with div_mode=False axis must be >= -2, got {axis}")
            ax = self.dim() - 2 if axis == -2 else self.dim() - 1   # axis > -2 means the last axis

        def along(t: torch.Tensor, name: str) -> torch.Tensor:
            if t.dim() == 1:
                _check(t.shape[0] in (1, self.shape[ax]), op,
                       f"{name} has {t.shape[0]} elements; it takes 1 or self.shape[{ax}] = {self.shape[ax]}")
                return t.float().view([t.shape[0] if d == ax else 1 for d in range(self.dim())])
            _check(t.dim() == self.dim() and all(n == 1 for d, n in enumerate(t.shape) if d != ax)
                   and t.shape[ax] in (1, self.shape[ax]), op,
                   f"{name} {tuple(t.shape)} must be 1-D or of self's rank with size 1 except on axis {ax}")
            return t.float()

        v = self.float() / along(scales, "scales") if div_mode else self.float() * along(scales, "scales")
        if zero_points is not None:
            v = v + along(zero_points, "zero_points")
        info = torch.iinfo(outs[dtype])
        return torch.round(v).clamp(info.min, info.max).to(outs[dtype])

    def npu_quant_matmul(emu, x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None,
                         group_sizes=None):
        op = "npu_quant_matmul"
        # 参数说明 / 约束说明 / 表 2 (torch_npu-npu_quant_matmul.md, Atlas A2/A3), int8 x int8:
        #   no bias:                  out = x1 @ x2 * scale [* pertoken_scale] + offset
        #   bias int32:               out = (x1 @ x2 + bias) * scale [* pertoken_scale] + offset
        #   bias bfloat16 / float32:  out = x1 @ x2 * scale [* pertoken_scale] + bias      (no offset)
        # (the pertoken forms: the QuantBatchMatmulV3 page of hicann/ops-nn); int32 accumulation, the
        # rest in float32; int8 output rounded (half to even here) and saturated.
        if x1.dtype == torch.int32 or x2.dtype == torch.int32:
            raise _not_emulated(op, "int4 (int32-packed) x1 / x2")
        if group_sizes is not None:
            raise _not_emulated(op, "group_sizes (int4 per-group)")
        _check(x1.dtype == torch.int8 and x2.dtype == torch.int8, op,
               f"x1 and x2 must both be int8 (or int32 carrying int4), got {x1.dtype} and {x2.dtype}")
        _check(2 <= x1.dim() <= 6 and 2 <= x2.dim() <= 6, op,
               f"x1 and x2 must have 2 to 6 dims, got {x1.dim()} and {x2.dim()}")
        _check(x1.numel() > 0 and x2.numel() > 0 and scale.numel() > 0, op, "x1, x2 and scale must not be empty")
        (M, K), (K2, N) = x1.shape[-2:], x2.shape[-2:]
        _check(K == K2, op, f"x1 [..., M, K={K}] and x2 [..., K={K2}, N] do not chain")
        _check(x1.shape[-1] <= 65535 and x2.shape[-1] <= 65535, op,
               f"the last dims of x1 and x2 must not exceed 65535, got {x1.shape[-1]} and {x2.shape[-1]}")
        emu._nz_input(op, "x1", x1, weight=False)
        emu._nz_input(op, "x2", x2, weight=True)
        _check(scale.dtype in (torch.float32, torch.bfloat16, torch.int64), op,
               f"scale must be float32, bfloat16 or int64 on Atlas A2/A3, got {scale.dtype}")
        _check(scale.dim() == 1 and scale.shape[0] in (1, N), op,
               f"scale must be 1-D (1,) or (n={N},) for int8, got {tuple(scale.shape)}")
        if offset is not None:
            _check(offset.dtype == torch.float32 and offset.dim() == 1 and offset.shape[0] in (1, N), op,
                   f"offset must be float32 (1,) or (n={N},), got {offset.dtype} {tuple(offset.shape)}")
        if pertoken_scale is not None:
            _check(pertoken_scale.dtype == torch.float32 and pertoken_scale.dim() == 1 and
                   pertoken_scale.shape[0] == M, op,
                   f"pertoken_scale must be float32 (m={M},), got {pertoken_scale.dtype} {tuple(pertoken_scale.shape)}")
        batch = torch.broadcast_shapes(x1.shape[:-2], x2.shape[:-2])
        if bias is not None:
            _check(bias.dtype in (torch.int32, torch.bfloat16, torch.float16, torch.float32), op,
                   f"bias must be int32, bfloat16, float16 or float32, got {bias.dtype}")
            _check((bias.dim() == 1 and bias.shape[0] == N) or
                   (bias.dim() == 3 and len(batch) == 1 and tuple(bias.shape) == (batch[0], 1, N)), op,
                   f"bias must be (n={N},) or, for a 3-D output, (batch, 1, n), got {tuple(bias.shape)}")
        out = torch.int8 if output_dtype is None else output_dtype
        ib = bias is not None and bias.dtype == torch.int32
        fb = bias is not None and not ib
        name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
        combo = (f"scale {name(scale.dtype)}, offset {'given' if offset is not None else 'None'}, bias "
                 f"{name(bias.dtype) if bias is not None else 'None'}, pertoken_scale "
                 f"{'given' if pertoken_scale is not None else 'None'}, output {name(out)}")
        # 表 2 rows (Atlas A2/A3); the emulator also lets the bfloat16 row output float32 (allow_float32)
        if out == torch.int32:
            raise _not_emulated(op, "output_dtype=int32")
        if out == torch.int8:
            ok = scale.dtype in (torch.float32, torch.int64) and pertoken_scale is None and not fb
        elif out == torch.float16:
            # float32 scale, or npu_trans_quant_param's int64 without a per-token scale (the page's example:
            # "pertoken_scale为空时，输出fp16必须先调用npu_trans_quant_param" in graph mode)
            ok = (scale.dtype == torch.float32 or (scale.dtype == torch.int64 and pertoken_scale is None)) and \
                offset is None and (not fb or (pertoken_scale is not None and bias.dtype in (torch.bfloat16, torch.float32)))
        elif out == torch.bfloat16 or (out == torch.float32 and emu.allow_float32):
            ok = offset is None and scale.dtype in ((torch.float32, torch.bfloat16) if out == torch.bfloat16
                                                    else (torch.float32,)) and (
                not fb or bias.dtype in (torch.bfloat16, torch.float32))
        else:
            _check(False, op, f"output_dtype must be int8, float16, bfloat16 or int32, got {output_dtype}")
        _check(ok, op, f"unsupported combination on Atlas A2/A3 (表 2): {combo}")
        acc = torch.matmul(x1.long(), x2.long())                                     # exact accumulation
        if ib:
            acc = acc + bias.long()
        y = acc.float() * (trans_quant_scale(scale) if scale.dtype == torch.int64 else scale.float())
        if pertoken_scale is not None:
            y = y * pertoken_scale.float()[:, None]
        if fb:
            y = y + bias.float()
        if offset is not None:
            y = y + offset.float()
        if out == torch.int8:
            return torch.round(y).clamp(-128, 127).to(torch.int8)
        return y.to(out)

    def npu_trans_quant_param(emu, scale, offset=None, round_mode=0):
        op = "npu_trans_quant_param"
        # 功能说明 (torch_npu-npu_trans_quant_param.md): out = (bits(scale) & 0xFFFFE000) | (1 << 46), the
        # offset (rounded, clamped to [-256, 255]) in bits 37-45; round_mode 0 truncates to the 19 high bits
        _check(scale.dtype == torch.float32 and scale.numel() > 0, op, f"scale must be a non-empty float32 tensor, "
                                                                       f"got {scale.dtype} {tuple(scale.shape)}")
        _check(scale.is_contiguous(), op, "scale must be contiguous (不支持非连续的Tensor)")
        _check(scale.dim() == 1 or (scale.dim() == 2 and scale.shape[0] == 1), op,
               f"the scale shape support only (1, ) and (1, n), got {tuple(scale.shape)}")    # meta
        _check(round_mode in (0, 1), op, f"round_mode should be 0 or 1, got {round_mode}")
        if round_mode == 1:
            raise _not_emulated(op, "round_mode=1 (R_INT)")
        out = (scale.view(torch.int32).long() & 0xFFFFE000) | (1 << 46)
        if offset is not None:
            _check(offset.dtype == torch.float32 and offset.shape == scale.shape, op,
                   "offset must be float32 of scale's shape (the shapes the backend passes)")
            o = torch.round(offset).clamp(-256, 255).long()
            out = (out & 0x4000FFFFFFFF) | ((o & 0x1FF) << 37)
        return out                                                                # meta: scale's shape, int64

    def npu_format_cast(emu, self, acl_format):
        op = "npu_format_cast"
        # the storage format is a property of the device tensor; here a copy whose format is recorded (by
        # storage, shape and strides: `get_npu_format`), which the ops that take FRACTAL_NZ operands check
        _check(acl_format in (ACL_FORMAT_ND, ACL_FORMAT_FRACTAL_NZ), op,
               f"acl_format {acl_format} is not emulated (ND {ACL_FORMAT_ND}, FRACTAL_NZ {ACL_FORMAT_FRACTAL_NZ})")
        out = self.clone(memory_format=torch.contiguous_format)
        if acl_format == ACL_FORMAT_FRACTAL_NZ:
            _check(self.is_contiguous() and self.dim() >= 2, op,
                   "cast to FRACTAL_NZ a contiguous tensor of 2 or more dims, in the layout the op takes (the "
                   "npu_quant_matmul page: transposed to (k, n), made contiguous, then cast)")
            formats = emu.__dict__.setdefault("_nz", {})
            key = out.data_ptr()
            formats[key] = (tuple(out.shape), tuple(out.stride()))
            weakref.finalize(out, formats.pop, key, None)
        return out

    def get_npu_format(emu, t) -> int:
        """torch_npu.get_npu_format: 29 for a tensor cast to FRACTAL_NZ (and its views), else 2 (ND)."""
        return ACL_FORMAT_FRACTAL_NZ if t.data_ptr() in emu.__dict__.get("_nz", {}) else ACL_FORMAT_ND

    def _nz_input(emu, op: str, name: str, t, *, weight: bool) -> None:
        """An operand in FRACTAL_NZ: only the weight operands take it, and as cast (a view of an NZ tensor
        with other strides would be read in the wrong order)."""
        cast = emu.__dict__.get("_nz", {}).get(t.data_ptr())
        if cast is None:
            return
        _check(weight, op, f"{name} is in FRACTAL_NZ; only the weight operand takes it (activations are ND)")
        _check((tuple(t.shape), tuple(t.stride())) == cast, op,
               f"{name} is a view {tuple(t.shape)} strides {tuple(t.stride())} of a FRACTAL_NZ tensor cast as "
               f"{cast[0]}: pass the cast tensor itself ([.., k, n])")

    # ---- supporting ops ---------------------------------------------------------------------------
    def npu_rms_norm(emu, self, gamma, epsilon=1e-06):
        op = "npu_rms_norm"
        # 参数说明: self/gamma float16, bfloat16 or float32 of one dtype, 2-8 dims; gamma the trailing dims
        _check(self.dtype in FLOATS, op, f"self must be float16, bfloat16 or float32, got {self.dtype}")
        _check(gamma.dtype == self.dtype, op, f"gamma dtype {gamma.dtype} must equal self dtype {self.dtype}")
        _check(2 <= self.dim() <= 8, op, f"self must have 2-8 dims, got {self.dim()}")
        _check(gamma.dim() <= self.dim() and tuple(self.shape[self.dim() - gamma.dim():]) == tuple(gamma.shape), op,
               f"gamma {tuple(gamma.shape)} must match the trailing dims of self {tuple(self.shape)}")
        red = tuple(range(self.dim() - gamma.dim(), self.dim()))
        xf = self.float()
        rstd = torch.rsqrt(xf.pow(2).mean(red, keepdim=True) + epsilon)      # meta: [..., 1, ..., 1] float32
        return (xf * rstd * gamma.float()).to(self.dtype), rstd

    def npu_rotary_mul(emu, input, r1, r2, rotary_mode="half", rotate=None):  # noqa: A002 - the doc's name
        op = "npu_rotary_mul"
        # 功能描述 / 约束说明 (jit_compile=False): 4-D input, D even and < 896, r1/r2 broadcast layouts
        _check(input.dim() == 4 and r1.dim() == 4 and r2.dim() == 4, op, "input, r1 and r2 must be 4-D")
        _check(input.dtype in FLOATS and r1.dtype == input.dtype and r2.dtype == input.dtype, op,
               f"input, r1, r2 must share one of float16/bfloat16/float32, got {input.dtype}, {r1.dtype}, {r2.dtype}")
        _check(rotary_mode in ("half", "interleave"), op,
               f"rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}")
        D = input.shape[-1]
        _check(D % 2 == 0 and D < 896, op, f"D must be even and < 896, got {D}")
        _check(tuple(r1.shape) == tuple(r2.shape) and r1.shape[-1] == D, op, "r1 and r2 must agree, with D last")
        _check(bool((r1.abs() <= 1).all() and (r2.abs() <= 1).all()), op,
               "r1 and r2 must lie in [-1, 1] (数据范围)")
        a, b, c = input.shape[:3]
        if rotary_mode == "interleave":     # r1 is 11SD (BNSD), 1S1D (BSND) or S11D (SBND); B * N < 1000
            layouts = {(1, 1, c): a * b, (1, b, 1): a * c, (a, 1, 1): b * c}
            _check(tuple(r1.shape[:3]) in layouts, op,
                   f"interleave mode needs r1 of layout 11SD, 1S1D or S11D for input {tuple(input.shape)}, "
                   f"got {tuple(r1.shape)}")
            _check(layouts[tuple(r1.shape[:3])] < 1000, op, "interleave mode needs B * N < 1000")
        else:
            _check(all(r in (1, s) for r, s in zip(r1.shape[:3], input.shape[:3])), op,
                   f"r1 {tuple(r1.shape)} must broadcast to input {tuple(input.shape)}")
        x = input.float()
        if rotate is not None:
            _check(emu.line is not None and emu.line.name != "7.3.0", op,
                   "rotate is in the schema from the 26.0.0 line (CANN 9.0.0) on")
            _check(rotate.dim() == 2 and tuple(rotate.shape) == (D, D), op, f"rotate must be [{D}, {D}]")
            x_new = x @ rotate.float()
        elif rotary_mode == "half":
            x1, x2 = x.chunk(2, -1)
            x_new = torch.cat([-x2, x1], -1)
        else:
            x_new = torch.stack([-x[..., 1::2], x[..., 0::2]], -1).flatten(-2)
        return (r1.float() * x + r2.float() * x_new).to(input.dtype)

    def npu_interleave_rope(emu, x, cos, sin):
        op = "npu_interleave_rope"
        # 参数说明 / 约束说明 (torch_npu-npu_interleave_rope.md, alike on every line since 7.0.0; A2/A3):
        # x [B, N, S, D], cos/sin [B, 1, S or 1, D] of x's dtype (bfloat16/float16), contiguous, D = 64
        _check(x.dim() == 4 and cos.dim() == 4 and sin.dim() == 4, op, "x, cos and sin must be 4-D [B, N, S, D]")
        _check(x.dtype in emu.half_op_dtypes, op, f"x must be bfloat16 or float16, got {x.dtype}")
        _check(cos.dtype == x.dtype and sin.dtype == x.dtype, op,
               f"cos and sin must have x's dtype {x.dtype}, got {cos.dtype} and {sin.dtype}")
        _contiguous(op, x=x, cos=cos, sin=sin)
        B, N, S, D = x.shape
        _check(D == IROPE_DIM and cos.shape[-1] == IROPE_DIM, op, f"D of x, cos and sin must be 64, got {D}")
        _check(tuple(sin.shape) == tuple(cos.shape), op, f"sin {tuple(sin.shape)} must match cos {tuple(cos.shape)}")
        _check(cos.shape[0] == B and cos.shape[1] == 1 and cos.shape[2] in (1, S), op,
               f"cos/sin must be [B={B}, 1, 1 or S={S}, 64], got {tuple(cos.shape)}")
        # 功能说明: q = reshape(x, [B,N,S,D/2,2]).transpose(-1,-2).reshape([B,N,S,D]) (the pairs split into
        # halves), q_embed = q * cos + RotateHalf(q) * sin; the output stays in that half-split order
        q = x.float().reshape(B, N, S, D // 2, 2).transpose(-1, -2).reshape(B, N, S, D)
        q1, q2 = q.chunk(2, -1)
        rotated = torch.cat([-q2, q1], -1)
        return (q * cos.float() + rotated * sin.float()).to(x.dtype)


def describe() -> str:
    """One line for reports: what is emulated, on which chip's documented limits."""
    return (f"torch_npu op emulator (CPU, float32 math; Atlas A2/A3 limits; "
            f"ops: {', '.join(n for n in dir(NpuEmulator) if n.startswith('npu_'))})")


__all__ = ["NpuEmulator", "NpuOpError", "INT64_MAX", "describe"]
