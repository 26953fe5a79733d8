"""The cuda backend's checks, shared by the interpreter run and the GPU run.

`tests/test_cuda_interpreter.py` runs every `check_*` here in a worker process with
TRITON_INTERPRET=1 (CPU tensors; every tl.dot in float32, see backends/cuda/common.py);
`tests/test_cuda_gpu.py` runs the same checks on a CUDA GPU, where float16/bfloat16 go through the
tensor cores, plus the `gpu_check_*` ones that only mean something there (CUDA-graph capture and
replay). Inputs are built on the CPU from seeded generators, small, odd-sized and paged with NaN in
every slot a kernel must not read (for sparse_mla: every c and k_pe row no token of the request
selects); the backend and the kernel functions are reached through `_setup()` and `_kernel()`,
which move tensor arguments to the backend's device and results back to the CPU, so one check body
serves both. The step reaches the paged ops as the contract's loose tensors only (block_table,
seq_lens, cu_seqlens_q), as the model passes them. The references (glm52_backends/ops/) run in
float64 on the same dtype-rounded inputs.
"""

from __future__ import annotations

import importlib
import os

import pytest

TOL = {"float32": 3.05e-5, "float16": 1.95e-3, "bfloat16": 1.56e-2}  # conformance/tolerances.py rows


def _device() -> str:
    import torch
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return "cuda" if torch.cuda.is_available() and not interpreting else "cpu"


DEVICE = _device()


def _move(x, device):
    import torch
    from glm52_backends.weights import Weight
    if isinstance(x, (torch.Tensor, Weight)):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_move(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _move(v, device) for k, v in x.items()}
    return x


def _on_device(fn):
    """`fn` with tensor arguments moved to DEVICE and tensor results moved back to the CPU."""
    def call(*args, **kwargs):
        out = fn(*_move(args, DEVICE), **_move(kwargs, DEVICE))
        if DEVICE != "cpu":
            import torch
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor):
                    assert t.device.type == DEVICE, f"{fn.__name__} returned a tensor on {t.device}"
        return _move(out, "cpu")
    call.__name__ = getattr(fn, "__name__", "op")
    return call


class _OnDevice:
    """A backend whose ops take and return CPU tensors while running on DEVICE."""

    def __init__(self, be):
        self._be = be

    def __getattr__(self, name):
        attr = getattr(self._be, name)
        return _on_device(attr) if callable(attr) and not name.startswith("_") else attr


def _setup():
    import torch
    from glm52_backends import ops as ref
    from glm52_backends.registry import get_backend
    be = get_backend("cuda")
    assert be.backend.device.type == DEVICE, (be.backend.device, DEVICE)
    return torch, ref, _OnDevice(be)


def _kernel(module: str, fn: str):
    """A cuda-backend kernel wrapper function (e.g. sparse_mla with n_splits) on DEVICE."""
    return _on_device(getattr(importlib.import_module(f"glm52_backends.backends.cuda.{module}"), fn))


def _batch(torch, reqs):
    cu = [0]
    for q, _ in reqs:
        cu.append(cu[-1] + q)
    return torch.tensor(cu, dtype=torch.int32), torch.tensor([L for _, L in reqs], dtype=torch.int32)


def _paged(torch, g, lens, bs, *row_sets):
    """Rows [L, D] per request, for one or more caches sharing a layout -> NaN-poisoned shuffled
    paged caches (one per row set) + the block table, with a padded column."""
    need = [-(-L // bs) for L in lens]
    nb = sum(need) + 2
    order = torch.randperm(nb, generator=g).tolist()
    caches = [torch.full((nb, bs, rows[0].shape[1]), float("nan")) for rows in row_sets]
    bt = torch.full((len(lens), max(need) + 1), order[-1], dtype=torch.int32)
    j = 0
    for b, L in enumerate(lens):
        for i in range(need[b]):
            bt[b, i] = order[j]
            for cache, rows in zip(caches, row_sets):
                chunk = rows[b][i * bs:(i + 1) * bs]
                cache[order[j], :chunk.shape[0]] = chunk
            j += 1
    return (*caches, bt)


def _positions(torch, cu, lens):
    out = []
    for b in range(len(lens)):
        q = int(cu[b + 1] - cu[b])
        out += list(range(int(lens[b]) - q, int(lens[b])))
    return out


def _ref_scores(torch, q, w, kc, bt, lens, cu):
    """float64 index scores [T, Lmax] (-inf beyond the causal row)."""
    from glm52_backends.ops._paged import gather_paged
    T = q.shape[0]
    out = torch.full((T, int(lens.max())), float("-inf"), dtype=torch.float64)
    pos = _positions(torch, cu, lens)
    for b in range(len(lens)):
        k = gather_paged(kc, bt[b], int(lens[b])).double()
        for t in range(int(cu[b]), int(cu[b + 1])):
            s = (w[t].double()[:, None] * torch.relu(q[t].double() @ k.T)).sum(0)
            out[t, :pos[t] + 1] = s[:pos[t] + 1]
    return out


def _check_topk(torch, idx, scores, topk, pos, tol, exact_sets=None):
    """Validity: per row, min(topk, pos+1) distinct causal positions first, -1 after, each with a
    score >= the reference's k-th best minus tol * max|score|. `exact_sets`: also equal the set."""
    for t in range(idx.shape[0]):
        n = min(topk, pos[t] + 1)
        row = idx[t].tolist()
        assert all(v == -1 for v in row[n:]), f"token {t}: entries after the first {n} must be -1: {row}"
        sel = row[:n]
        assert len(set(sel)) == n and all(0 <= v <= pos[t] for v in sel), f"token {t}: {sel} (pos {pos[t]})"
        s = scores[t, :pos[t] + 1]
        kth = s.sort(descending=True).values[n - 1]
        slack = tol * float(s.abs().max())
        assert float(s[sel].min()) >= float(kth) - slack, f"token {t}: a selected score is below the k-th best"
        if exact_sets is not None:
            assert sorted(sel) == sorted(exact_sets[t].tolist()[:n]), f"token {t}: set differs from the reference"


def check_indexer_mixed_batch():
    """Decode, prefill, MTP-like and short requests in one batch; f32/f16/bf16; odd sizes; the same
    indices when the step comes as int64 tensors and a strided (non-contiguous) block table."""
    torch, ref, be = _setup()
    g = torch.Generator().manual_seed(11)
    reqs = [(1, 45), (6, 23), (3, 3), (4, 70), (1, 1)]         # contexts < = > topk, one token
    Hi, Di, bs, topk = 5, 24, 16, 12                            # odd heads, Di not a power of 2
    cu, lens = _batch(torch, reqs)
    T = int(cu[-1])
    kc, bt = _paged(torch, g, lens.tolist(), bs, [torch.randn(L, Di, generator=g) for L in lens.tolist()])
    q, w = torch.randn(T, Hi, Di, generator=g), torch.randn(T, Hi, generator=g)
    pos = _positions(torch, cu, lens)
    bt_wide = torch.full((bt.shape[0], 2 * bt.shape[1]), -7, dtype=torch.int64)
    bt_wide[:, ::2] = bt
    bt_view = bt_wide[:, ::2]                                   # int64, every other column of a wider table
    assert not bt_view.is_contiguous() and torch.equal(bt_view, bt.long())
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        qd, kd = q.to(dt), kc.to(dt)
        idx = be.indexer_topk(qd, w, kd, bt, lens, cu, topk)
        assert idx.dtype == torch.int32 and idx.shape == (T, topk)
        scores = _ref_scores(torch, qd, w, kd, bt, lens, cu)
        _check_topk(torch, idx, scores, topk, pos, TOL[str(dt)[6:]])
        if dt == torch.float32:
            want = ref.indexer_topk(qd.double(), w.double(), kd.double(), bt, lens, cu, topk, cdt=torch.float64)
            _check_topk(torch, idx, scores, topk, pos, 0.0, exact_sets=want)
        as_i64 = be.indexer_topk(qd, w, kd, bt_view, lens.long(), cu.long(), topk)
        assert torch.equal(as_i64, idx), f"{dt}: indices from int64 / strided step tensors differ"
    assert be.calls["indexer_topk"]["fallback"] == 0 and be.calls["indexer_topk"]["native"] == 6


def check_indexer_concentrated_and_ties():
    """Long rows (> 2 select blocks), scores concentrated on a few keys, most exactly 0 (ReLU),
    so the k-th key sits inside a huge tie: the selected set must equal the reference's exactly
    (ties to the earlier position), with no winner dropped."""
    torch, ref, be = _setup()
    g = torch.Generator().manual_seed(12)
    reqs = [(2, 2600), (1, 700)]
    Hi, Di, bs, topk = 8, 32, 64, 256
    cu, lens = _batch(torch, reqs)
    rows = []
    for L in lens.tolist():
        k = torch.rand(L, Di, generator=g)
        k[:, 0] = torch.where(torch.rand(L, generator=g) < 0.04, 4.0, 0.01)  # ~4% strong keys
        k[:5, 0] = 4.0                                                       # exact duplicates
        k[5:9] = k[0]
        rows.append(k)
    kc, bt = _paged(torch, g, lens.tolist(), bs, rows)
    T = int(cu[-1])
    q = -torch.rand(T, Hi, Di, generator=g)
    q[:, :, 0] = 6.0                                       # relu(6*k0 - rest): 0 unless k0 is strong
    w = torch.rand(T, Hi, generator=g)
    idx = be.indexer_topk(q, w, kc, bt, lens, cu, topk)
    want = ref.indexer_topk(q.double(), w.double(), kc.double(), bt, lens, cu, topk, cdt=torch.float64)
    scores = _ref_scores(torch, q, w, kc, bt, lens, cu)
    pos = _positions(torch, cu, lens)
    assert int((scores[0, :pos[0] + 1] == 0).sum()) > 2000          # the tie really is huge
    _check_topk(torch, idx, scores, topk, pos, 0.0, exact_sets=want)


def check_indexer_negative_weights_and_bad_input():
    """Negative head weights (negative scores: the order-preserving key must handle the sign) and
    loud errors on malformed input that its shapes and dtypes show (the lengths' values are the
    caller's contract: checking them would read the host)."""
    torch, ref, be = _setup()
    g = torch.Generator().manual_seed(13)
    reqs = [(3, 300)]
    Hi, Di, bs, topk = 4, 16, 32, 40
    cu, lens = _batch(torch, reqs)
    kc, bt = _paged(torch, g, [300], bs, [torch.randn(300, Di, generator=g)])
    q, w = torch.randn(3, Hi, Di, generator=g), -torch.rand(3, Hi, generator=g)
    idx = be.indexer_topk(q, w, kc, bt, lens, cu, topk)
    want = ref.indexer_topk(q.double(), w.double(), kc.double(), bt, lens, cu, topk, cdt=torch.float64)
    _check_topk(torch, idx, _ref_scores(torch, q, w, kc, bt, lens, cu), topk, _positions(torch, cu, lens), 0.0, want)
    indexer_topk = _kernel("indexer_topk", "indexer_topk")
    with pytest.raises(ValueError, match="w must have shape"):
        indexer_topk(q, w[:, :2], kc, bt, lens, cu, topk)
    with pytest.raises(ValueError, match=r"indexer_topk: cu_seqlens_q must have shape \[2\], got \[3\]"):
        indexer_topk(q, w, kc, bt, lens, torch.tensor([0, 2, 3], dtype=torch.int32), topk)
    with pytest.raises(ValueError, match=r"indexer_topk: block_table must have shape \[1, \*\], got \[2, "):
        indexer_topk(q, w, kc, bt.repeat(2, 1), lens, cu, topk)
    with pytest.raises(ValueError, match="indexer_topk: seq_lens must be an integer tensor"):
        indexer_topk(q, w, kc, bt, lens.float(), cu, topk)
    with pytest.raises(ValueError, match="q has T=3 tokens but the step has no requests"):
        indexer_topk(q, w, kc, bt[:0], lens[:0], cu[:1], topk)
    with pytest.raises(ValueError, match="topk must be a positive int"):
        indexer_topk(q, w, kc, bt, lens, cu, 0)


def _mla_inputs(torch, g, reqs, H, Dl, Dr, bs, topk, dt):
    """q, c_cache, kpe_cache (a strided view into a wider buffer), idx, block table, lens, cu.
    Every cache row no token of its request selects is NaN in c and inf in k_pe, as are the unused
    slots: a kernel that reads one of them poisons the output. idx rows hold distinct positions
    (the contract) scattered between -1 entries."""
    cu, lens = _batch(torch, reqs)
    T = int(cu[-1])
    L_ = lens.tolist()
    c, wide, bt = _paged(torch, g, L_, bs, [torch.randn(L, Dl, generator=g) for L in L_],
                         [torch.randn(L, Dr + 5, generator=g) for L in L_])
    q = torch.randn(T, H, Dl + Dr, generator=g)
    pos = _positions(torch, cu, lens)
    idx = torch.full((T, topk), -1, dtype=torch.int32)
    for t in range(T):
        n = min(topk, pos[t] + 1) - (t % 3)                     # some rows padded with -1 inside
        if n > 0:
            sel = torch.randperm(pos[t] + 1, generator=g)[:n].int()
            idx[t, torch.randperm(topk, generator=g)[:n]] = sel
    # poison every row its request never selects (position 0 too, what a -1 clamps to elsewhere)
    for b in range(len(L_)):
        chosen = set(idx[int(cu[b]):int(cu[b + 1])].flatten().tolist())
        for p in range(L_[b]):
            if p not in chosen:
                blk, s = int(bt[b, p // bs]), p % bs
                c[blk, s] = float("nan")
                wide[blk, s] = float("inf")
    kpe = wide.to(dt)[..., 2:2 + Dr]                             # own strides: a view, not contiguous
    assert not kpe.is_contiguous()
    return q.to(dt), c.to(dt), kpe, idx, bt, lens, cu


def _mla_ref(torch, ref, q, c, kpe, idx, bt, lens, cu, scale):
    return ref.sparse_mla(q.double(), c.double(), kpe.double(), idx, bt, lens, cu, scale, return_lse=True,
                          cdt=torch.float64)


def check_sparse_mla_splits_padding_empty_rows():
    """Odd heads/dims, -1 anywhere in the row, an all -1 row, split-K with 1, 3 and 7 splits (the
    LSE merge, including splits that hold only -1)
    against one pass, with and without lse, with int32 and int64 step tensors; f32/f16/bf16."""
    torch, ref, be = _setup()
    sparse_mla = _kernel("sparse_mla", "sparse_mla")
    g = torch.Generator().manual_seed(21)
    reqs = [(1, 150), (4, 37), (2, 2), (1, 400)]
    H, Dl, Dr, bs, topk, scale = 5, 40, 12, 16, 200, 0.17
    for i, dt in enumerate((torch.float32, torch.float16, torch.bfloat16)):
        q, c, kpe, idx, bt, lens, cu = _mla_inputs(torch, g, reqs, H, Dl, Dr, bs, topk, dt)
        idx[1] = -1
        ro, rl = _mla_ref(torch, ref, q, c, kpe, idx, bt, lens, cu, scale)
        assert bool(torch.isfinite(ro).all())
        for j, splits in enumerate((1, 3, 7)):
            wide = (i + j) % 2                                   # each split count with int32 and int64 tensors
            step = (bt.long(), lens.long(), cu.long()) if wide else (bt, lens, cu)
            out, lse = sparse_mla(q, c, kpe, idx, *step, scale, return_lse=True, n_splits=splits)
            assert out.dtype == dt and out.shape == ro.shape and lse.dtype == torch.float32
            err = float((out.double() - ro).abs().max() / ro.abs().max())
            assert err <= TOL[str(dt)[6:]], f"{dt} splits={splits} int64={bool(wide)}: out rel err {err}"
            fin = torch.isfinite(rl)
            assert torch.equal(torch.isfinite(lse), fin) and bool((out[1] == 0).all())
            assert float((lse.double() - rl)[fin].abs().max()) <= 1e-5 * float(rl[fin].abs().max())
            if j == i:                                           # out only: 1 split (f32), 3 (f16), 7 (bf16)
                only = sparse_mla(q, c, kpe, idx, *step, scale, n_splits=splits)
                assert isinstance(only, torch.Tensor) and torch.equal(only, out), "return_lse=False changed out"
    out = be.sparse_mla(q, c, kpe, idx, bt, lens, cu, scale)            # through the backend: out only
    assert isinstance(out, torch.Tensor) and out.shape == ro.shape
    out, lse = be.sparse_mla(q, c, kpe, idx, bt, lens, cu, scale, return_lse=True)
    assert lse.shape == rl.shape and be.calls["sparse_mla"]["native"] == 2


def check_sparse_mla_bad_input():
    """Loud errors on what shapes and dtypes show: dtype and shape mismatches. A non-causal index is
    the caller's contract violation and is not checked (that would read the host): the kernel
    attends the row it names, as the reference does, and reads nothing past seq_len."""
    torch, ref, be = _setup()
    sparse_mla = _kernel("sparse_mla", "sparse_mla")
    from glm52_backends.ops import OpUnsupported
    g = torch.Generator().manual_seed(22)
    q, c, kpe, idx, bt, lens, cu = _mla_inputs(torch, g, [(2, 20)], 4, 16, 8, 8, 8, torch.float32)
    blk, s = int(bt[0, 19 // 8]), 19 % 8
    c[blk, s] = torch.randn(16, generator=g)                      # row 19 finite, whether selected or not
    kpe[blk, s] = torch.randn(8, generator=g)
    idx[0, 0] = 19                                                # beyond pos 18 of token 0: not checked
    out, lse = sparse_mla(q, c, kpe, idx, bt, lens, cu, 0.1, return_lse=True)
    ro, rl = _mla_ref(torch, ref, q, c, kpe, idx, bt, lens, cu, 0.1)
    assert bool(torch.isfinite(ro).all()) and bool(torch.isfinite(out).all())
    assert float((out.double() - ro).abs().max() / ro.abs().max()) <= TOL["float32"]
    assert float((lse.double() - rl).abs().max()) <= 1e-5 * float(rl.abs().max())
    idx[0, 0] = -1
    with pytest.raises(OpUnsupported, match="q is torch.float32, c_cache torch.float16"):
        sparse_mla(q, c.half(), kpe, idx, bt, lens, cu, 0.1)
    with pytest.raises(ValueError, match=r"kpe_cache must have shape \[.*, 8, 8\], got .*7\]"):
        sparse_mla(q, c, kpe[..., :7], idx, bt, lens, cu, 0.1)
    with pytest.raises(ValueError, match="Dl \\+ Dr"):
        sparse_mla(q[..., :16], c, kpe, idx, bt, lens, cu, 0.1)
    with pytest.raises(ValueError, match=r"sparse_mla: idx must have shape \[2, \*\], got \[1, 8\]"):
        sparse_mla(q, c, kpe, idx[:1], bt, lens, cu, 0.1)
    with pytest.raises(ValueError, match=r"sparse_mla: cu_seqlens_q must have shape \[3\], got \[2\]"):
        sparse_mla(q, c, kpe, idx, bt.repeat(2, 1), lens.repeat(2), cu, 0.1)
    with pytest.raises(ValueError, match="sparse_mla: cu_seqlens_q must be an integer tensor"):
        sparse_mla(q, c, kpe, idx, bt, lens, cu.float(), 0.1)


def _moe_case(torch, g, T, Hd, I, E, K, dt, ids=None):
    x = torch.randn(T, Hd, generator=g).to(dt)
    w13 = (torch.randn(E, 2 * I, Hd, generator=g) * Hd ** -0.5).to(dt)
    w2 = (torch.randn(E, Hd, I, generator=g) * I ** -0.5).to(dt)
    if ids is None:
        ids = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])   # expert E-1 empty
    return x, w13, w2, ids, torch.rand(T, K, generator=g)


def check_moe_experts_both_gemm_paths():
    """Triton grouped GEMMs (fused SiLU*mul) and torch._grouped_mm: odd sizes, empty experts,
    -1 slots, all tokens to one expert, one token; f32/f16/bf16; dense `Weight`s as tensors."""
    torch, ref, be = _setup()
    from glm52_backends.weights import Weight
    moe_experts = _kernel("moe_experts", "moe_experts")
    g = torch.Generator().manual_seed(31)
    cases = []
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        cases.append((dt, _moe_case(torch, g, 9, 40, 24, 7, 3, dt)))
    x, w13, w2, ids, wts = _moe_case(torch, g, 21, 32, 16, 5, 2, torch.float32)
    cases.append((torch.float32, (x, w13, w2, torch.full_like(ids, 3), wts)))         # one expert: 2 M-blocks+
    x, w13, w2, ids, wts = _moe_case(torch, g, 1, 24, 8, 4, 2, torch.float32)
    cases.append((torch.float32, (x, w13, w2, ids, wts)))                             # one token
    for dt, (x, w13, w2, ids, wts) in cases:
        ids = ids.clone()
        ids[0, -1] = -1                                                               # unused slot
        want = ref.moe_experts(x.double(), w13.double(), w2.double(), ids, wts.double(), cdt=torch.float64)
        for gemm in ("triton", "grouped_mm"):
            y = moe_experts(x, w13, w2, ids, wts, gemm=gemm)
            err = float((y.double() - want).abs().max() / want.abs().max())
            assert y.dtype == dt and err <= TOL[str(dt)[6:]], f"{dt} {gemm} T={x.shape[0]}: rel err {err}"
        yw = be.moe_experts(x, Weight(w13), Weight(w2), ids, wts)                     # dense Weights, native
        assert torch.equal(yw, be.moe_experts(x, w13, w2, ids, wts)), f"{dt}: a dense Weight changed the result"
    assert be.calls["moe_experts"]["fallback"] == 0 and be.calls["moe_experts"]["native"] == 2 * len(cases)


# ---- block-FP8 ("fp8_block"): activation quantizer, linear, mlp, experts ------------------------------
def _e4m3_steps(torch, a, b):
    """Steps on the e4m3 grid between two float8_e4m3fn tensors (codes are sign + a magnitude that
    grows with the value; +0 and -0 are the same point)."""
    def ordinal(q):
        u = q.view(torch.uint8).to(torch.int32)
        return torch.where(u >= 0x80, -(u & 0x7F), u)
    return (ordinal(a) - ordinal(b)).abs()


def _assert_codes(torch, q, want, what):
    """A quantizer's codes against the reference's: equal but for one-step differences on under
    0.05 % of the elements (spec/quantization.md section 2)."""
    assert q.dtype == torch.float8_e4m3fn and q.shape == want.shape, (what, q.dtype, q.shape, want.shape)
    d = _e4m3_steps(torch, q, want)
    n = int((d != 0).sum())
    assert int(d.max()) <= 1, f"{what}: a code differs by {int(d.max())} steps"
    assert n <= 0.0005 * d.numel(), f"{what}: {n} of {d.numel()} codes differ by one step (> 0.05 %)"


def _poisoned(torch, t, pad_rows, pad_cols):
    """`t` as a view into a buffer on t's device with `pad_rows` more rows and `pad_cols` more
    columns (last two dims), NaN there (FP8: the NaN code 0x7f): a kernel reading beyond t's rows
    or columns poisons its output. Build it on DEVICE (a copy to the GPU would drop the padding).
    Triton's interpreter converts the FP8 code 0x7f to 480, not NaN: beyond-K reads of FP8 codes
    (times activations masked to 0) are caught on the GPU run only; NaN activations and scales on
    both."""
    big = torch.empty(*t.shape[:-2], t.shape[-2] + pad_rows, t.shape[-1] + pad_cols, dtype=t.dtype, device=t.device)
    if t.dtype == torch.float8_e4m3fn:
        big.view(torch.uint8).fill_(0x7F)
    else:
        big.fill_(float("nan"))
    view = big[..., :t.shape[-2], :t.shape[-1]]
    view.copy_(t)
    return view


def _poisoned_weight(torch, w):
    """An fp8_block `Weight` whose codes and scales sit in NaN-padded buffers (beyond N, K and the
    last scale row and column)."""
    from glm52_backends.weights import Weight
    return Weight(_poisoned(torch, w.data, 2, 5), _poisoned(torch, w.scales, 1, 1), w.format, w.block,
                  recipe=w.recipe)


def _rel(torch, y, want):
    return float((y.double() - want.double()).abs().max() / want.double().abs().max())


def check_fp8_quantizer_matches_reference():
    """fp8.quantize_act against quant.quantize_fp8_groups for both recipes and float32/float16/
    bfloat16 rows: scales equal, codes equal but for one-step differences on under 0.05 %. K = 300
    (a partial last group) with NaN beyond K; rows spanning 6 decades, an outlier (its group's other
    codes go subnormal), all zeros and all tiny (the 1e-4 amax floor), and every midpoint of the
    e4m3 grid with amax 448 (scale 1: the ties must round to even). Also the stride-(1, M) scale
    layout torch._scaled_mm takes."""
    torch, ref, be = _setup()
    from glm52_backends import quant
    quantize_act = _kernel("fp8", "quantize_act")
    g = torch.Generator().manual_seed(61)
    M, K = 9, 300
    x = torch.randn(M, K, generator=g) * torch.logspace(-4, 2, K)[torch.randperm(K, generator=g)]
    x[1, 7] = 3e4
    x[2] = 0.0
    x[4] *= 1e-7
    grid = torch.arange(0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()     # +0 ... 448
    mids = (grid[1:] + grid[:-1]) / 2                                                   # 126 ties
    x[3, :128] = torch.cat([torch.tensor([448.0]), mids, torch.tensor([-1.0])])
    x[3, 1:127:2] *= -1
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        xd = x.to(dt)
        xv = _poisoned(torch, xd.to(DEVICE), 0, 5)
        for ue8m0 in (False, True):
            q, s = quantize_act(xv, ue8m0)
            rq, rs = quant.quantize_fp8_groups(xd, 128, ue8m0=ue8m0)
            assert s.dtype == torch.float32 and torch.equal(s, rs), f"{dt} ue8m0={ue8m0}: scales differ"
            _assert_codes(torch, q, rq, f"{dt} ue8m0={ue8m0}")
            if dt == torch.float32:
                assert torch.equal(q[3].float(), rq[3].float()), "e4m3 ties not rounded to even"
                q2, s2 = quantize_act(xv, ue8m0, scales_k_major=True)
                assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.equal(s2, s)
    assert float(x[3, :128].abs().max()) == 448.0 and int((x[2] == 0).sum()) == K
    q, s = quantize_act(x[:0], False)
    assert q.shape == (0, K) and s.shape == (0, 3)


def _fp8_linear_weights(torch, g):
    """[300, 200] in 128x128 blocks (odd N, K not a multiple of 128) and a gate/up-style
    concatenation of 72 + 61 rows at K = 260 (block (1, 128), recipe fp8_g128_ue8m0)."""
    from glm52_backends.weights import cat_rows, quantize_weight
    w1 = quantize_weight(torch.randn(300, 200, generator=g) * 200 ** -0.5, "fp8_block")
    w2 = cat_rows([quantize_weight(torch.randn(n, 260, generator=g) * 260 ** -0.5, "fp8_block",
                                   recipe="fp8_g128_ue8m0") for n in (72, 61)])
    assert w1.block == (128, 128) and w2.block == (1, 128) and w2.recipe == "fp8_g128_ue8m0"
    return w1, w2


def check_fp8_linear_matches_oracle():
    """Block-FP8 linear through the backend (native) against quant.matmul_reference on the same
    dtype-rounded input: M = 1, 7, 33; odd N, K not a multiple of 128, row block 1 and ue8m0
    scales; float32 (plus bfloat16 or float16 at M = 7); codes, scales and x in NaN-padded buffers;
    leading batch dims and M = 0. torch._scaled_mm where this torch and GPU support it, declined
    (with its reason) elsewhere. Unsupported weights and bad shapes: declined / loud."""
    torch, ref, be = _setup()
    from glm52_backends import quant
    from glm52_backends.ops import OpUnsupported
    from glm52_backends.weights import Weight, quantize_weight
    linear = _kernel("linear", "linear")
    g = torch.Generator().manual_seed(62)
    calls = 0
    for i, w in enumerate(_fp8_linear_weights(torch, g)):
        N, K = w.shape
        pw = _poisoned_weight(torch, w.to(DEVICE))
        for M in (1, 7, 33):
            x = torch.randn(M, K, generator=g)
            x[0, :3] *= 30                                      # an outlier channel
            for dt in ((torch.float32, (torch.bfloat16, torch.float16)[i]) if M == 7 else (torch.float32,)):
                xd = x.to(dt)
                y = be.linear(_poisoned(torch, xd.to(DEVICE), 0, 3), pw)
                calls += 1
                want = quant.matmul_reference(xd, w)
                err = _rel(torch, y, want)
                assert y.dtype == dt and y.shape == (M, N), (y.dtype, y.shape)
                assert err <= TOL[str(dt)[6:]], f"N={N} K={K} block={w.block} M={M} {dt}: rel err {err:.2e}"
        if i == 0:
            x3 = torch.randn(2, 3, K, generator=g)
            y3 = linear(x3, w, gemm="triton")
            assert y3.shape == (2, 3, N) and torch.equal(y3, linear(x3.reshape(6, K), w, gemm="triton").view(2, 3, N))
            assert linear(x3[:0, 0], w).shape == (0, N)
    assert be.calls["linear"] == {"native": calls, "fallback": 0}, be.calls["linear"]
    # torch._scaled_mm (1x128 activation x 128x128 weight scales): bfloat16, N and K multiples of 16
    from glm52_backends.backends.cuda.linear import scaled_mm_unsupported
    w = quantize_weight(torch.randn(256, 384, generator=g) * 384 ** -0.5, "fp8_block")     # K / 128 = 3
    for M in (1, 7, 33):
        x = torch.randn(M, 384, generator=g).bfloat16()
        why = scaled_mm_unsupported(x.to(DEVICE), w.to(DEVICE))
        if why is not None:
            with pytest.raises(OpUnsupported, match="gemm='scaled_mm'"):
                linear(x, w, gemm="scaled_mm")
            continue
        want = quant.matmul_reference(x, w)
        for gemm in ("scaled_mm", "triton", "auto"):
            err = _rel(torch, linear(x, w, gemm=gemm), want)
            assert err <= TOL["bfloat16"], f"{gemm} M={M}: rel err {err:.2e}"
    # declined: other formats, other input blocks, non-float x; malformed: scales, K
    wf = torch.randn(40, 200, generator=g)
    x = torch.randn(3, 200, generator=g)
    with pytest.raises(OpUnsupported, match="runs 'dense' and 'fp8_block' weights"):
        linear(x, quantize_weight(wf, "w8a8_dynamic"))
    with pytest.raises(OpUnsupported, match="FP8 blocks of 64 inputs"):
        linear(x, quantize_weight(wf, "fp8_block", block=(128, 64)))
    fw = quantize_weight(wf, "fp8_block")
    with pytest.raises(OpUnsupported, match="x has dtype torch.int32"):
        linear(x.int(), fw)
    with pytest.raises(ValueError, match=r"weight.scales must have shape \[1, 2\]"):
        linear(x, Weight(fw.data, fw.scales[:, :1], "fp8_block"))
    with pytest.raises(ValueError, match=r"x must be \[..., 200\]"):
        linear(x[:, :100], fw)


def check_fp8_mlp_native():
    """mlp with block-FP8 w13 (gate/up of odd width: row block 1) and w2: two native FP8 linears
    with SiLU*up rounded to x's dtype between, against the reference's mlp on the same weights."""
    torch, ref, be = _setup()
    from glm52_backends.weights import cat_rows, quantize_weight
    g = torch.Generator().manual_seed(63)
    Hd, I = 200, 72
    w13 = cat_rows([quantize_weight(torch.randn(I, Hd, generator=g) * Hd ** -0.5, "fp8_block") for _ in range(2)])
    w2 = quantize_weight(torch.randn(Hd, I, generator=g) * I ** -0.5, "fp8_block")
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(5, Hd, generator=g).to(dt)
        y, want = be.mlp(x, w13, w2), ref.mlp(x, w13, w2)
        assert y.dtype == dt and _rel(torch, y, want) <= TOL[str(dt)[6:]], (dt, _rel(torch, y, want))
    assert be.calls["mlp"] == {"native": 2, "fallback": 0}, be.calls["mlp"]


def check_fp8_moe_matches_oracle():
    """Block-FP8 experts through the backend (native) against the reference's moe_experts on the
    same weights and dtype-rounded x: unused (-1) slots, a token with no expert, experts without
    tokens, all tokens to one expert; Hd not a multiple of 128, I odd (row block 1 after the gate/up
    concatenation) and I > 128 (two activation groups); both recipes; float32/float16/bfloat16;
    16-row and 64-row M-blocks; codes, scales and x in NaN-padded buffers."""
    torch, ref, be = _setup()
    from glm52_backends.backends.cuda.moe_experts import fp8_block_m
    g = torch.Generator().manual_seed(64)
    cases = [  # dtype, T, Hd, I, E, K, recipe, routing
        (torch.float32, 9, 200, 72, 6, 3, "fp8_g128", "spread"),
        (torch.bfloat16, 5, 130, 136, 4, 2, "fp8_g128_ue8m0", "spread"),
        (torch.float16, 6, 128, 128, 3, 2, "fp8_g128", "one expert"),
        (torch.bfloat16, 70, 72, 40, 3, 3, "fp8_g128", "all"),     # 64-row M-blocks (GPU: FP8 wgmma)
    ]
    block_ms = set()
    for dt, T, Hd, I, E, K, recipe, routing in cases:
        x = torch.randn(T, Hd, generator=g).to(dt)
        w13 = torch.randn(E, 2 * I, Hd, generator=g) * Hd ** -0.5
        w2 = torch.randn(E, Hd, I, generator=g) * I ** -0.5
        W13, W2 = _stack_q(torch, w13, "fp8_block", I=I), _stack_q(torch, w2, "fp8_block")
        if recipe != "fp8_g128":
            from glm52_backends.weights import Weight
            W13, W2 = (Weight(w.data, w.scales, w.format, w.block, recipe=recipe) for w in (W13, W2))
        if routing == "spread":
            ids = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])    # expert E-1: none
            ids[0, -1] = -1
            ids[min(3, T - 1)] = -1                                                         # a token with none
        elif routing == "one expert":
            ids = torch.full((T, K), 1, dtype=torch.int64)
            ids[:, 1:] = -1
        else:
            ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        wts = torch.rand(T, K, generator=g)
        block_ms.add(fp8_block_m(T * K, E))
        want = ref.moe_experts(x, W13, W2, ids, wts)
        y = be.moe_experts(_poisoned(torch, x.to(DEVICE), 0, 3), _poisoned_weight(torch, W13.to(DEVICE)),
                           _poisoned_weight(torch, W2.to(DEVICE)), ids, wts)
        err = _rel(torch, y, want)
        assert y.dtype == dt and y.shape == (T, Hd), (y.dtype, y.shape)
        assert err <= TOL[str(dt)[6:]], f"{dt} T={T} Hd={Hd} I={I} E={E} {recipe}: rel err {err:.2e}"
        none = (ids < 0).all(-1)
        assert bool((y[none] == 0).all()), "a token routed nowhere must get zeros"
    assert block_ms == {16, 64}, block_ms
    assert be.calls["moe_experts"] == {"native": len(cases), "fallback": 0}, be.calls["moe_experts"]


def _stack_q(torch, w, fmt, I=None):
    """Experts [E, N, K] quantized one by one (`I`: gate/up halves quantized apart and concatenated,
    as the loader does) and stacked: what the model holds."""
    from glm52_backends.weights import cat_rows, quantize_weight, stack
    if I is None:
        return stack([quantize_weight(w[e], fmt) for e in range(w.shape[0])])
    return stack([cat_rows([quantize_weight(w[e, :I], fmt), quantize_weight(w[e, I:], fmt)])
                  for e in range(w.shape[0])])


def check_moe_route_and_unsupported_weights():
    """moe_route against the reference; expert weights the kernels do not run are declined with a
    clear reason (bare FP8 tensors without scales, int8 formats, a dense/FP8 mix, FP8 on
    gemm='grouped_mm'), and through the registry the reference runs them."""
    torch, ref, be = _setup()
    g = torch.Generator().manual_seed(32)
    for E, K, ng, tg, norm in ((64, 8, 1, 1, True), (64, 6, 8, 3, True), (24, 3, 1, 1, False)):
        lg, bias = torch.randn(11, E, generator=g), torch.rand(E, generator=g) * 0.1
        ids, w = be.moe_route(lg, bias, K, ng, tg, norm, 2.5)
        rids, rw = ref.moe_route(lg.double(), bias.double(), K, ng, tg, norm, 2.5, cdt=torch.float64)
        assert ids.dtype == torch.int64 and torch.equal(ids, rids), (E, ng)
        assert float((w.double() - rw).abs().max()) <= 1e-6 * float(rw.abs().max())
    x, w13, w2, ids, wts = _moe_case(torch, g, 3, 16, 8, 4, 2, torch.float32)
    moe_experts = _kernel("moe_experts", "moe_experts")
    from glm52_backends.ops import OpUnsupported
    from glm52_backends.weights import Weight
    with pytest.raises(OpUnsupported, match="bare FP8 tensors carry no scales"):
        moe_experts(x, w13.to(torch.float8_e4m3fn), w2, ids, wts)
    q13, q2 = _stack_q(torch, w13, "w8a8_dynamic"), _stack_q(torch, w2, "w8a8_dynamic")
    with pytest.raises(OpUnsupported, match="w13 is a 'w8a8_dynamic' Weight"):
        moe_experts(x, q13, q2, ids, wts)
    f13, f2 = _stack_q(torch, w13, "fp8_block", I=8), _stack_q(torch, w2, "fp8_block")
    with pytest.raises(OpUnsupported, match="w2 'dense': the FP8 path takes both"):
        moe_experts(x, f13, Weight(w2), ids, wts)
    with pytest.raises(OpUnsupported, match="no block-scaled grouped GEMM"):
        moe_experts(x, f13, f2, ids, wts, gemm="grouped_mm")
    # through the registry: declined -> reference, with one warning, the reference's result exactly
    with pytest.warns(RuntimeWarning, match="moe_experts falls back to the reference"):
        y = be.moe_experts(x, q13, q2, ids, wts)
    assert be.calls["moe_experts"]["fallback"] == 1 and y.shape == x.shape
    assert torch.equal(y, ref.moe_experts(x, q13, q2, ids, wts))


def check_supporting_ops_take_weights():
    """linear / mlp: tensors and dense `Weight`s natively (cuBLAS), int8 `Weight`s and dtype
    mismatches declined to the reference (block-FP8: check_fp8_linear_*); rms_norm / layer_norm /
    rope: the contract's references."""
    torch, ref, be = _setup()
    from glm52_backends.weights import Weight
    g = torch.Generator().manual_seed(33)
    x = torch.randn(7, 40, generator=g)
    w = torch.randn(24, 40, generator=g) * 40 ** -0.5
    w13, w2 = torch.randn(2 * 12, 40, generator=g) * 40 ** -0.5, torch.randn(40, 12, generator=g) * 12 ** -0.5
    want = ref.linear(x.double(), w.double(), cdt=torch.float64)
    for weight in (w, Weight(w)):
        y = be.linear(x, weight)
        assert float((y.double() - want).abs().max() / want.abs().max()) <= TOL["float32"]
    want = ref.mlp(x.double(), w13.double(), w2.double(), cdt=torch.float64)
    y = be.mlp(x, Weight(w13), Weight(w2))
    assert float((y.double() - want).abs().max() / want.abs().max()) <= TOL["float32"]
    assert be.calls["linear"] == {"native": 2, "fallback": 0} and be.calls["mlp"] == {"native": 1, "fallback": 0}
    from glm52_backends.weights import quantize_weight
    qw = quantize_weight(w, "w8a8_dynamic")
    with pytest.warns(RuntimeWarning, match="linear falls back to the reference"):
        y = be.linear(x, qw)
    assert torch.equal(y, ref.linear(x, qw)) and be.calls["linear"]["fallback"] == 1
    with pytest.warns(RuntimeWarning, match="mlp falls back"):
        be.mlp(x.half(), w13, w2)                                  # dtype mismatch: declined
    assert be.calls["mlp"]["fallback"] == 1
    n, nw, nb = torch.randn(5, 3, 16, generator=g), torch.rand(16, generator=g), torch.randn(16, generator=g)
    pos = torch.tensor([0, 3, 9, 10, 200])
    assert torch.equal(be.rms_norm(n, nw, 1e-6), ref.rms_norm(n, nw, 1e-6))
    assert torch.equal(be.layer_norm(n, nw, nb, 1e-6), ref.layer_norm(n, nw, nb, 1e-6))
    assert torch.equal(be.rope(n, pos, 10000.0), ref.rope(n, pos, 10000.0))


def check_capabilities_and_contract():
    """Typed capabilities, and every native op accepted by the registry's signature check."""
    torch, ref, be = _setup()
    from glm52_backends.ops import OP_NAMES, Capabilities, check_signature
    caps = be.capabilities
    assert isinstance(be._be.backend.capabilities, Capabilities)
    assert caps.dtypes == (torch.bfloat16, torch.float16, torch.float32)
    assert caps.weight_formats == ("dense", "fp8_block")
    assert caps.default_dtype == (torch.float32 if DEVICE == "cpu" else torch.bfloat16)
    assert caps.devices == (DEVICE,) and caps.get("moe_gemm") == "auto" and caps.get("fp8_gemm") == "auto"
    assert set(be.native_ops) == set(OP_NAMES)
    bad = {op: check_signature(op, getattr(be._be.backend, op)) for op in OP_NAMES}
    assert not any(bad.values()), bad


def check_mtp_verify_greedy_and_sampling():
    """Greedy: accept/miss/bonus/argmax ties; sampling with one-hot and with draft probs, exact
    equality with the reference on the same uniforms; k = 0; top_p < 1 declined."""
    torch, ref, be = _setup()
    mtp_verify = _kernel("mtp_verify", "mtp_verify")
    from glm52_backends.ops import OpUnsupported
    g = torch.Generator().manual_seed(41)
    B, k, V = 6, 3, 9001                                       # V spans two stats splits
    lg = torch.randn(B, k + 1, V, generator=g) * 4
    best = lg.argmax(-1)
    draft = best[:, :k].clone()
    draft[1, 0] = (draft[1, 0] + 1) % V                        # miss at 0
    draft[2, 2] = (draft[2, 2] + 7) % V                        # miss at 2; rows 0,3: all accepted
    lg[4, 0, 8500] = lg[4, 0, 5] = lg[4, 0].max() + 1          # argmax tie across splits -> id 5
    draft[4, 0] = 8500
    lg[5] = lg[5].half().float()
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        x = lg.to(dt)
        a, t = mtp_verify(draft, x)
        ra, rt = ref.mtp_verify(draft, x)
        assert torch.equal(a, ra) and torch.equal(t, rt), (dt, a, ra)
        if dt == torch.float32:                                # (half rounding moves some argmaxes)
            assert a.tolist()[:5] == [3, 0, 2, 3, 0] and t[4, 0] == 5
    u = torch.rand(B, k + 1, generator=g)
    peaked = lg * 3                                            # drafts = argmax get accepted often
    dprobs = torch.softmax(torch.randn(B, k, V, generator=g), -1)
    d2 = torch.multinomial(dprobs.view(-1, V), 1, generator=g).view(B, k)
    n_acc = 0
    for logits, d, q in ((peaked, draft, None), (lg, d2, dprobs)):
        for temp in (0.6, 1.3):
            a, t = mtp_verify(d, logits, q, temp, 1.0, u)
            ra, rt = ref.mtp_verify(d, logits.double(), None if q is None else q.double(), temp, 1.0,
                                    u.double(), cdt=torch.float64)
            assert torch.equal(a, ra) and torch.equal(t, rt), (temp, a, ra, t, rt)
            n_acc += int(a.sum())
    assert n_acc > 0                                           # the accept branch ran
    a, t = mtp_verify(draft[:, :0], lg[:, :1])                 # k = 0: just the bonus token
    assert a.tolist() == [0] * B and torch.equal(t[:, 0], lg[:, 0].argmax(-1))
    with pytest.raises(OpUnsupported, match="top_p"):
        mtp_verify(draft, lg, None, 1.0, 0.9, u)


def check_model_greedy_matches_cpu_ref():
    """GLM52(tiny, backend='cuda'): same greedy tokens as cpu_ref, every hot op native."""
    import tempfile
    import torch
    from glm52_backends import GLM52
    from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
    with tempfile.TemporaryDirectory() as d:
        path = make_tiny_checkpoint(d, layers=4, seed=3, index_topk=8)
        m = GLM52(path, backend="cuda", dtype=torch.float32, progress=False)
        r = GLM52(path, backend="cpu_ref", dtype=torch.float32, progress=False)
    assert m.backend_name == ("cuda (triton interpreter)" if DEVICE == "cpu" else "cuda")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, m.cfg.vocab_size, (n,), generator=g).tolist() for n in (13, 4)]
    a = m.generate(prompts, max_new_tokens=3, stop_at_eos=False)
    b = r.generate(prompts, max_new_tokens=3, stop_at_eos=False)
    assert a.tokens == b.tokens
    assert all(a.stats["ops"][op] == "native" for op in ("indexer_topk", "sparse_mla", "moe_experts", "moe_route"))


def check_custom_ops_equal_direct_calls_and_trace_as_one_node():
    """The CUDA backend's ops as torch.library triton_ops (torch.ops.glm52.<op>.cuda): on every
    conformance case (quick sizes, float32) a call through the custom op returns what the direct call
    returns, bit for bit; a model decode step traced with make_fx holds one node per op call."""
    import collections
    import tempfile
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx
    from glm52_backends import GLM52
    from glm52_backends.conformance.cases import CASES
    from glm52_backends.engine.graph import StaticDecode
    from glm52_backends.registry import get_backend
    from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
    be = get_backend("cuda")
    dev = be.backend.device
    native = set(be.native_ops)
    ran = set()
    for case in CASES:
        if case.op not in native:
            continue
        inp = case.build("quick")
        args = inp.for_backend(torch.float32, dev)
        direct = getattr(be, case.op)(*args, **inp.kwargs)
        with be.through_library():
            routed = getattr(be, case.op)(*args, **inp.kwargs)
        pairs = zip(direct, routed) if isinstance(direct, tuple) else [(direct, routed)]
        for a, b in pairs:
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{case.op}/{case.name}"
        ran.add(case.op)
    assert {"indexer_topk", "sparse_mla", "moe_experts", "moe_route", "mtp_verify"} <= ran, ran
    assert be._library[0] == "cuda" or be._library[0].startswith("cuda_")
    with tempfile.TemporaryDirectory() as d:
        path = make_tiny_checkpoint(d, layers=2, seed=3, index_topk=8)
        m = GLM52(path, backend="cuda", dtype=torch.float32, progress=False)
    cache = m.new_cache(1024)
    m.extend(cache, {0: [5, 6, 7], 1: [8, 9]})
    sd = StaticDecode(m, cache, 2, "trace", strict=True)
    before = {op: c["native"] for op, c in m.ops.calls.items()}
    gm = make_fx(lambda *b: sd._forward(2, *b), tracing_mode="real")(*sd._inputs())
    gm.graph.eliminate_dead_code()
    calls = {op: c["native"] - before[op] for op, c in m.ops.calls.items()}
    ov = m.ops._library[0]
    nodes = collections.Counter(str(n.target) for n in gm.graph.nodes if str(n.target).startswith("glm52."))
    assert dict(nodes) == {f"glm52.{op}.{ov}": c for op, c in calls.items() if c}, (dict(nodes), calls)
    assert nodes[f"glm52.sparse_mla.{ov}"] == 2


def check_e2e_conformance_reduced():
    """e2e conformance on the CUDA backend at a reduced size (the interpreter runs ~2 min per full row):
    two short prompts, 4 new tokens, the speculative k=2 row: logits, greedy and MTP acceptance against
    the float64 reference."""
    from glm52_backends.conformance import e2e
    saved = e2e.PROMPTS, e2e.NEW_TOKENS
    e2e.PROMPTS, e2e.NEW_TOKENS = ("def main(argv):\n    for ", "class A:\n    x = "), 4
    e2e.reference.cache_clear()
    try:
        rep = e2e.run_e2e("cuda", select=[e2e.Row(mode="spec2")])
    finally:
        e2e.PROMPTS, e2e.NEW_TOKENS = saved
        e2e.reference.cache_clear()
    (r,) = rep.results
    assert rep.passed and r.greedy == "equal" and r.acceptance is not None, r.line()


def check_fp8_model_greedy_matches_cpu_ref():
    """A block-FP8 tiny checkpoint (one MoE layer) held as stored: GLM52(backend='cuda') gives the
    same greedy tokens as cpu_ref, with the FP8 linears, shared-expert mlp and experts native."""
    import tempfile
    import torch
    from glm52_backends import GLM52
    from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
    with tempfile.TemporaryDirectory() as d:
        path = make_tiny_checkpoint(d, layers=1, seed=4, index_topk=8, fp8=True, first_k_dense_replace=0)
        m = GLM52(path, backend="cuda", dtype=torch.float32, progress=False)
        r = GLM52(path, backend="cpu_ref", dtype=torch.float32, progress=False)
    lay = m.net.layers[0]
    assert all(w.format == "fp8_block" for w in (lay.wq_b, lay.wo, lay.e_w13, lay.e_w2, lay.s_w13, lay.s_w2))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, m.cfg.vocab_size, (n,), generator=g).tolist() for n in (9, 3)]
    a = m.generate(prompts, max_new_tokens=2, stop_at_eos=False)
    b = r.generate(prompts, max_new_tokens=2, stop_at_eos=False)
    assert a.tokens == b.tokens, (a.tokens, b.tokens)
    assert all(a.stats["ops"][op] == "native" for op in ("linear", "mlp", "moe_experts")), a.stats["ops"]
    assert all(m.ops.calls[op]["fallback"] == 0 for op in ("linear", "mlp", "moe_experts")), m.ops.calls


def check_speculative_greedy_matches_plain():
    """MTP speculation through the cuda backend: k=3, drafts right with probability 0.6 (a seeded
    test draft source, so accepts, rejections and rollbacks all happen), same tokens as plain greedy."""
    import tempfile
    import torch
    from glm52_backends import GLM52
    from glm52_backends.engine.generation import generate
    from glm52_backends.devtools.make_tiny import make_tiny_checkpoint
    with tempfile.TemporaryDirectory() as d:
        path = make_tiny_checkpoint(d, layers=2, seed=5, index_topk=8, mtp=True)
        m = GLM52(path, backend="cuda", dtype=torch.float32, progress=False)
        r = GLM52(path, backend="cpu_ref", dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, m.cfg.vocab_size, (n,), generator=g).tolist() for n in (11, 3)]
    n_new = 12
    plain = r.generate(prompts, max_new_tokens=n_new, stop_at_eos=False).tokens
    seqs = [p + o for p, o in zip(prompts, plain)]
    coins = torch.rand(2, 64, generator=g).tolist()

    def drafts(i, pos, proposed):  # the plain-greedy token with probability 0.6, else a wrong one
        if pos >= len(seqs[i]):
            return proposed
        right = seqs[i][pos]
        return right if coins[i][pos] < 0.6 else (right + 1) % m.cfg.vocab_size

    res, eng = generate(m, prompts, max_new_tokens=n_new, speculative=3, stop_at_eos=False,
                        draft_filter=drafts, return_engine=True)
    assert res.tokens == plain, (res.tokens, plain)
    steps = [a for q in eng.finished_log for a in q.accepted]
    assert 0 in steps and max(steps) >= 2, steps                 # rejections and multi-token accepts
    assert res.stats["ops"]["mtp_verify"] == "native" and res.stats["ops"]["sparse_mla"] == "native"


def gpu_check_graph_capture_and_replay():
    """Decode-size calls of every hot op (bfloat16, the grouped_mm MoE path) captured in one CUDA
    graph, the step passed as the contract's loose tensors (block_table, seq_lens, cu_seqlens_q) in
    static buffers, from which the ops derive each token's request and position inside the graph, as
    a graph-replaying model would. Before each replay fresh values are copied into the static inputs,
    the sequence lengths and the block table included; each replay must equal, bit for bit, eager
    calls on those values: no host synchronisation inside the ops (capture would fail), no value
    baked into the graph at capture time, nothing read from a stale buffer."""
    import torch
    from glm52_backends.registry import get_backend
    be = get_backend("cuda")
    dev, bf = torch.device(DEVICE), torch.bfloat16
    g = torch.Generator().manual_seed(51)
    B, bs, Hi, Di, topk = 3, 64, 8, 64, 128
    H, Dl, Dr = 16, 64, 16
    E, K, Hd, I = 16, 4, 64, 32
    V, k = 3001, 3
    nb = 12

    def fresh_step(lens):
        """(block_table, seq_lens, cu_seqlens_q) of a decode step: one token per request."""
        bt = torch.randperm(B * nb, generator=g).view(B, nb).to(torch.int32).to(dev)
        return (bt, torch.tensor(lens, dtype=torch.int32, device=dev),
                torch.arange(B + 1, dtype=torch.int32, device=dev))

    def fresh():
        return dict(q=torch.randn(B, Hi, Di, generator=g).to(dev, bf), w=torch.randn(B, Hi, generator=g).to(dev),
                    kc=torch.randn(B * nb, bs, Di, generator=g).to(dev, bf),
                    qm=torch.randn(B, H, Dl + Dr, generator=g).to(dev, bf),
                    c=torch.randn(B * nb, bs, Dl, generator=g).to(dev, bf),
                    kpe=torch.randn(B * nb, bs, Dr, generator=g).to(dev, bf),
                    lg=torch.randn(B, E, generator=g).to(dev), bias=(torch.rand(E, generator=g) * 0.1).to(dev),
                    x=torch.randn(B, Hd, generator=g).to(dev, bf),
                    w13=(torch.randn(E, 2 * I, Hd, generator=g) * Hd ** -0.5).to(dev, bf),
                    w2=(torch.randn(E, Hd, I, generator=g) * I ** -0.5).to(dev, bf),
                    vl=(torch.randn(B, k + 1, V, generator=g) * 3).to(dev),
                    draft=torch.randint(0, V, (B, k), generator=g).to(dev))

    static, static_step = fresh(), fresh_step([700, 129, 400])

    def step(s, st):
        bt, lens, cu = st
        idx = be.indexer_topk(s["q"], s["w"], s["kc"], bt, lens, cu, topk)
        o, lse = be.sparse_mla(s["qm"], s["c"], s["kpe"], idx, bt, lens, cu, 0.1, return_lse=True)
        o2 = be.sparse_mla(s["qm"], s["c"], s["kpe"], idx, bt, lens, cu, 0.1)
        ids, wts = be.moe_route(s["lg"], s["bias"], K, 1, 1, True, 2.5)
        y = be.moe_experts(s["x"], s["w13"], s["w2"], ids, wts)
        a, t = be.mtp_verify(s["draft"], s["vl"])
        return idx, o, lse, o2, ids, wts, y, a, t

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(static, static_step)                      # compile and warm up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(static, static_step)
    names = ("idx", "out", "lse", "out (no lse)", "ids", "weights", "y", "accepted", "tokens")
    for trial in range(3):
        new = fresh()
        new["draft"][trial % B] = new["vl"][trial % B, :k].argmax(-1)       # one request accepts all
        lens = torch.randint(topk // 2, nb * bs + 1, (B,), generator=g).tolist()
        new_step = fresh_step(lens)
        for key, v in new.items():
            static[key].copy_(v)
        for buf, v in zip(static_step, new_step):
            buf.copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        want = step(new, new_step)
        for name, got, ref in zip(names, outs, want):
            assert torch.equal(got, ref), f"replay {trial} (lens {lens}): {name} differs from an eager call"
    assert all(be.calls[op]["fallback"] == 0 for op in ("indexer_topk", "sparse_mla", "moe_route",
                                                        "moe_experts", "mtp_verify")), be.calls


def gpu_check_fp8_graph_capture_and_replay():
    """Block-FP8 linear (the backend's choice of GEMM and the Triton one) and FP8 experts captured in
    one CUDA graph (bfloat16, decode size): no host synchronisation inside (capture would fail);
    each replay on fresh x and routing copied into the static inputs equals eager calls bit for bit."""
    import torch
    from glm52_backends.registry import get_backend
    from glm52_backends.weights import quantize_weight
    be = get_backend("cuda")
    linear = importlib.import_module("glm52_backends.backends.cuda.linear").linear
    dev, bf = torch.device(DEVICE), torch.bfloat16
    g = torch.Generator().manual_seed(52)
    E, K, Hd, I, T = 8, 2, 256, 192, 3
    w = quantize_weight(torch.randn(384, Hd, generator=g) * Hd ** -0.5, "fp8_block").to(dev)
    w13 = _stack_q(torch, torch.randn(E, 2 * I, Hd, generator=g) * Hd ** -0.5, "fp8_block", I=I).to(dev)
    w2 = _stack_q(torch, torch.randn(E, Hd, I, generator=g) * I ** -0.5, "fp8_block").to(dev)

    def fresh():
        return dict(x=torch.randn(T, Hd, generator=g).to(dev, bf),
                    ids=torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(dev),
                    wts=torch.rand(T, K, generator=g).to(dev))

    def step(s):
        return (be.linear(s["x"], w), linear(s["x"], w, gemm="triton"),
                be.moe_experts(s["x"], w13, w2, s["ids"], s["wts"]))

    static = fresh()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(static)                                   # compile, verify torch._scaled_mm, warm up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(static)
    for trial in range(3):
        new = fresh()
        for key, v in new.items():
            static[key].copy_(v)
        graph.replay()
        torch.cuda.synchronize()
        for name, got, want in zip(("linear", "linear (triton)", "moe_experts"), outs, step(new)):
            assert torch.equal(got, want), f"replay {trial}: {name} differs from an eager call"
    assert all(be.calls[op]["fallback"] == 0 for op in ("linear", "moe_experts")), be.calls
