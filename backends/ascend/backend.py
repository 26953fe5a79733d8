"""The Ascend backend: the hot ops of the contract on torch_npu's fused ops.

Every op talks to the device through `self.npu`, which is either the `torch_npu` module or the
CPU emulator of the same functions (`emulator.NpuEmulator`), so the layouts, lengths, block tables
and routing bookkeeping below are the code that runs on an NPU and the code CI checks.

  indexer_topk -> npu_lightning_indexer        TND query, PA_BSND key cache, sparse_mode=3
  sparse_mla   -> npu_sparse_flash_attention   attention_mode=2 (latent 512 = key = value, rope 64)
  moe_route    -> npu_moe_gating_top_k         sigmoid, correction bias, renorm, routed scaling
  moe_experts  -> npu_moe_init_routing_v2 + npu_grouped_matmul + npu_swiglu + npu_grouped_matmul
                  + npu_moe_token_unpermute
  rms_norm     -> npu_rms_norm;  rope -> npu_rotary_mul (interleave);  mlp -> npu_swiglu
  mtp_verify, linear, layer_norm: plain torch ops (they run on the NPU; torch_npu has no verify op)

Each op first checks the documented limits of its torch_npu op (Atlas A2/A3 columns of the docs);
inputs outside them raise `OpUnsupported`, and the registry runs the reference with one warning.
Shapes and semantics of the ops: `glm52_backends/ops.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glm52_backends.ops import OpUnsupported
from glm52_backends.sampling import probs_from_logits, sample_from

HALF = (torch.float16, torch.bfloat16)

# Documented limits (torch_npu op docs, Atlas A2/A3; see emulator.py for the section names)
LI_HEAD_DIM = 128                       # npu_lightning_indexer: D of query and key
LI_MAX_HEADS = 64                       # N1 <= 64
LI_SPARSE_COUNTS = set(range(1, 2049)) | {3072, 4096, 5120, 6144, 7168, 8192}
SFA_LATENT, SFA_ROPE = 512, 64          # npu_sparse_flash_attention, attention_mode=2
SFA_HEADS = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_BLOCK_SIZE = 1024                   # PA_BSND block_size: a multiple of 16, at most 1024
GATING_MAX_EXPERTS = 2048               # npu_moe_gating_top_k
GMM_MAX_GROUPS = 1024                   # npu_grouped_matmul, one 3-D weight, group_type=0
GMM_INNER_LIMIT = 65536                 # last dim of x and weight must stay below this
UNPERMUTE_MAX_TOPK = 512                # npu_moe_token_unpermute on A2/A3
ROPE_MAX_DIM = 896                      # npu_rotary_mul: D even and < 896; B * N < 1000


def _decline(cond: bool, why: str) -> None:
    if not cond:
        raise OpUnsupported(why)


def _paged_block_size(bs: int, what: str) -> None:
    _decline(bs % 16 == 0 and 0 < bs <= MAX_BLOCK_SIZE,
             f"{what}: PA_BSND needs a cache block size that is a multiple of 16 up to {MAX_BLOCK_SIZE}, got {bs}")


def token_positions(seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(request of each query token [T] int64, its position [T] int64), computed on the device."""
    cu = cu_seqlens_q.long()
    q_lens = cu[1:] - cu[:-1]                                                      # [B]
    req = torch.repeat_interleave(torch.arange(len(q_lens), device=cu.device), q_lens, output_size=T)
    pos = torch.arange(T, device=cu.device) - cu[req] + (seq_lens.long() - q_lens)[req]
    return req, pos


def valid_first(idx: torch.Tensor) -> torch.Tensor:
    """Move each row's -1 entries behind its positions (stable), the order npu_sparse_flash_attention
    requires ("valid values first, invalid after"); the contract allows -1 anywhere."""
    order = (idx < 0).to(torch.int8).argsort(dim=-1, stable=True)
    return idx.gather(-1, order)


class AscendBackend:
    """The hot ops on `npu` (torch_npu or the emulator). `device`: where tensors live."""

    def __init__(self, npu, *, name: str, device: torch.device, priority: int, default_dtype: torch.dtype):
        self.npu = npu
        self.name = name
        self.device = device
        self.priority = priority
        self.emulated = bool(getattr(npu, "emulated", False))
        # the two attention ops take bfloat16/float16; the emulator may also accept float32
        self.attention_dtypes = tuple(getattr(npu, "attention_dtypes", HALF))
        self.capabilities = {
            "dtypes": [torch.bfloat16, torch.float16, torch.float32], "default_dtype": default_dtype,
            "devices": [device.type], "fp8": False, "max_topk": 8192,
            "block_sizes": "multiples of 16 up to 1024 (PA_BSND)",
            "attention_dtypes": list(self.attention_dtypes), "emulated": self.emulated,
            "limits": "Atlas A2/A3 columns of the torch_npu op docs",
        }

    def __repr__(self) -> str:
        return f"AscendBackend({self.name!r}, device={self.device}, npu={self.npu!r})"

    # ---- hot op 1 -------------------------------------------------------------------------------
    def indexer_topk(self, q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk):
        T, Hi, Di = q.shape
        _decline(Di == LI_HEAD_DIM, f"npu_lightning_indexer needs index head dim {LI_HEAD_DIM}, got {Di}")
        _decline(Hi <= LI_MAX_HEADS, f"npu_lightning_indexer takes at most {LI_MAX_HEADS} index heads, got {Hi}")
        _decline(topk in LI_SPARSE_COUNTS, f"npu_lightning_indexer sparse_count must be in [1, 2048] or "
                                           f"3072..8192 in steps of 1024, got {topk}")
        _decline(q.dtype in self.attention_dtypes,
                 f"npu_lightning_indexer takes bfloat16/float16 queries, got {q.dtype}")
        _decline(k_cache.dtype == q.dtype, f"index-key cache dtype {k_cache.dtype} != query dtype {q.dtype}")
        _decline(w.dtype in (torch.float32, q.dtype), f"weights must be float32 or the query dtype, got {w.dtype}")
        _paged_block_size(k_cache.shape[1], "npu_lightning_indexer")
        if T == 0:
            return torch.full((0, topk), -1, dtype=torch.int32, device=q.device)
        idx, _ = self.npu.npu_lightning_indexer(
            q.contiguous(),                                    # TND  [T, N1, 128]
            k_cache.unsqueeze(2).contiguous(),                 # PA_BSND [NB, BS, N2=1, 128] (a view)
            w.contiguous(),                                    # [T, N1]
            actual_seq_lengths_query=cu_seqlens_q[1:].to(torch.int32).contiguous(),   # TND: prefix sums
            actual_seq_lengths_key=seq_lens.to(torch.int32).contiguous(),            # per request
            block_table=block_table.to(torch.int32).contiguous(),
            layout_query="TND", layout_key="PA_BSND", sparse_count=topk, sparse_mode=3)
        idx = idx[:, 0, :]                                                             # [T, topk]
        # the op leaves the slots past min(topk, pos+1) unspecified: the contract wants -1 there
        _, pos = token_positions(seq_lens, cu_seqlens_q, T)
        keep = torch.arange(topk, device=q.device)[None, :] < (pos + 1).clamp(max=topk)[:, None]
        return torch.where(keep, idx, -1).to(torch.int32)

    # ---- hot op 2 -------------------------------------------------------------------------------
    def sparse_mla(self, q, kv_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, v_dim=512):
        T, H, D = q.shape
        NB, BS, Dc = kv_cache.shape
        _decline(v_dim == SFA_LATENT and D == Dc == SFA_LATENT + SFA_ROPE,
                 f"npu_sparse_flash_attention (attention_mode=2) needs latent {SFA_LATENT} + rope {SFA_ROPE}, "
                 f"got query {D}, cache {Dc}, v_dim {v_dim}")
        _decline(H in SFA_HEADS, f"npu_sparse_flash_attention takes {SFA_HEADS} query heads, got {H}")
        _decline(q.dtype in self.attention_dtypes, f"npu_sparse_flash_attention takes bfloat16/float16, got {q.dtype}")
        _decline(kv_cache.dtype == q.dtype, f"latent cache dtype {kv_cache.dtype} != query dtype {q.dtype}")
        _decline(idx.shape[0] == T and idx.shape[1] > 0, f"idx must be [T={T}, topk > 0], got {tuple(idx.shape)}")
        _paged_block_size(BS, "npu_sparse_flash_attention")
        if T == 0:
            return (torch.zeros(0, H, v_dim, dtype=q.dtype, device=q.device),
                    torch.zeros(0, H, dtype=torch.float32, device=q.device))
        B, MB = block_table.shape
        # The op wants the latent and its rope part as two contiguous PA_BSND caches (vllm-ascend keeps
        # them apart); ours stores c || k_pe per slot. Copy the blocks this step's requests own into a
        # compact pair and address it with the identity block table: request b's position p sits in
        # row b * MB * BS + p of the copy.
        own = kv_cache[block_table.reshape(-1).long()]                                # [B*MB, BS, 576]
        key = own[..., :SFA_LATENT].unsqueeze(2).contiguous()                         # [B*MB, BS, 1, 512]
        key_rope = own[..., SFA_LATENT:].unsqueeze(2).contiguous()                    # [B*MB, BS, 1, 64]
        table = torch.arange(B * MB, dtype=torch.int32, device=q.device).view(B, MB)
        sel = valid_first(idx.to(torch.int32))                                        # [T, topk]
        out, _, _ = self.npu.npu_sparse_flash_attention(
            q[..., :SFA_LATENT].contiguous(), key, key,        # key and value share the latent (mode 2)
            sel.unsqueeze(1).contiguous(), scale,              # [T, KV_N=1, topk]
            block_table=table,
            actual_seq_lengths_query=cu_seqlens_q[1:].to(torch.int32).contiguous(),
            actual_seq_lengths_kv=seq_lens.to(torch.int32).contiguous(),
            query_rope=q[..., SFA_LATENT:].contiguous(), key_rope=key_rope,
            sparse_block_size=1, layout_query="TND", layout_kv="PA_BSND", sparse_mode=3, attention_mode=2)
        # lse: the op returns softmax_max/sum only in training and not with PA_BSND, so it is
        # computed here from the selected rows (one extra QK pass in plain torch ops).
        req, _ = token_positions(seq_lens, cu_seqlens_q, T)
        rows = req[:, None] * (MB * BS) + sel.long().clamp(min=0)                     # [T, topk]
        k_sel = own.view(-1, Dc)[rows]                                                # [T, topk, 576]
        s = torch.einsum("thd,tkd->thk", q.float(), k_sel.float()) * scale           # [T, H, topk]
        lse = s.masked_fill((sel < 0)[:, None, :], float("-inf")).logsumexp(-1)      # [T, H] f32
        # a row with no valid index: the contract says 0 (the op's value there is unspecified)
        out = torch.where((sel[:, :1] >= 0)[:, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out, lse

    # ---- hot op 3 -------------------------------------------------------------------------------
    def moe_route(self, router_logits, correction_bias, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
                  routed_scaling_factor=1.0):
        E = router_logits.shape[1]
        _decline(norm_topk_prob, "npu_moe_gating_top_k with sigmoid always renormalises (norm_topk_prob=False)")
        _decline(E <= GATING_MAX_EXPERTS, f"npu_moe_gating_top_k takes at most {GATING_MAX_EXPERTS} experts, got {E}")
        _decline(n_group > 0 and E % n_group == 0 and E // n_group > 2,
                 f"npu_moe_gating_top_k needs groups of more than 2 experts ({E} experts, {n_group} groups)")
        _decline(-(-(E // n_group) // 32) * 32 * n_group <= GATING_MAX_EXPERTS,
                 "npu_moe_gating_top_k: group size aligned to 32 times group count must be <= 2048")
        _decline(1 <= topk_group <= n_group and 1 <= top_k <= E // n_group * topk_group,
                 f"npu_moe_gating_top_k needs 1 <= k_group <= group_count and 1 <= k <= E/group_count*k_group "
                 f"(k={top_k}, k_group={topk_group}, group_count={n_group})")
        _decline(correction_bias is not None, "npu_moe_gating_top_k path expects the correction bias")
        x = router_logits
        bias = correction_bias.to(device=x.device, dtype=x.dtype)   # the op wants bias in x's dtype
        y, ids, _ = self.npu.npu_moe_gating_top_k(
            x, top_k, bias=bias, k_group=topk_group, group_count=n_group,
            group_select_mode=1,              # group score = sum of its top-2 (DeepSeek/GLM noaux_tc)
            renorm=0, norm_type=1,            # sigmoid, then y /= sum(y) + eps
            out_flag=False, routed_scaling_factor=float(routed_scaling_factor), eps=1e-20)
        return ids.long(), y.float()

    def moe_experts(self, x, w13, w2, topk_ids, topk_weights):
        T, Hd = x.shape
        E, I2, _ = w13.shape
        K = topk_ids.shape[1]
        _decline(w13.dtype == x.dtype and w2.dtype == x.dtype,
                 f"npu_grouped_matmul needs x and weights of one dtype (x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype})")
        _decline(x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {x.dtype}")
        _decline(2 <= E <= GMM_MAX_GROUPS, f"npu_grouped_matmul (one 3-D weight) takes 2..{GMM_MAX_GROUPS} "
                                           f"groups (group_list of length 1 is rejected), got {E}")
        _decline(max(Hd, I2 // 2) < GMM_INNER_LIMIT, f"npu_grouped_matmul inner dims must be < {GMM_INNER_LIMIT}")
        _decline(K <= UNPERMUTE_MAX_TOPK, f"npu_moe_token_unpermute takes topK <= {UNPERMUTE_MAX_TOPK}, got {K}")
        if T == 0:
            return torch.zeros_like(x)
        # contract: id -1 = slot unused. Route it to expert 0 with weight 0 (finite x -> adds 0).
        unused = topk_ids < 0
        ids = topk_ids.masked_fill(unused, 0).to(torch.int32).contiguous()                # [T, K]
        probs = topk_weights.float().masked_fill(unused, 0.0).contiguous()                # [T, K]
        # 1. sort the T*K (token, slot) rows by expert; counts per expert for the grouped GEMMs
        xs, row_of, counts, _ = self.npu.npu_moe_init_routing_v2(
            x.contiguous(), ids, active_num=T * K, expert_num=E, expert_tokens_num_type=1,
            expert_tokens_num_flag=True, quant_mode=-1, row_idx_type=0)                  # xs [T*K, Hd]
        # 2. grouped GEMMs over the sorted rows; weights as transposed views [E, Hd, 2I] / [E, I, Hd]
        h = self.npu.npu_grouped_matmul([xs], [w13.transpose(1, 2)], group_list=counts, split_item=2,
                                        group_type=0, group_list_type=1)[0]              # [T*K, 2I]
        a = self.npu.npu_swiglu(h, dim=-1)                                               # silu(gate) * up
        y = self.npu.npu_grouped_matmul([a], [w2.transpose(1, 2)], group_list=counts, split_item=2,
                                        group_type=0, group_list_type=1)[0]              # [T*K, Hd]
        # 3. back to token order, weighted sum over the K slots (row_of[t*K + k] = row of that slot)
        return self.npu.npu_moe_token_unpermute(y, row_of, probs=probs)                  # [T, Hd]

    # ---- hot op 4 -------------------------------------------------------------------------------
    def mtp_verify(self, draft, target_logits, draft_probs=None, temperature=0.0, top_p=1.0, uniforms=None):
        """Batched, no host synchronisation: torch_npu has no verify op, these torch ops run on the NPU."""
        B, k = draft.shape
        V = target_logits.shape[-1]
        dev = target_logits.device
        col = torch.arange(k + 1, device=dev)[None, :]                                  # [1, k+1]
        if temperature == 0.0:
            best = target_logits.argmax(-1)                                              # [B, k+1]
            ok = draft.long() == best[:, :k]
            n = ok.long().cumprod(-1).sum(-1)                                            # [B] accepted
            emit = best.gather(1, n[:, None])                                            # [B, 1]
        else:
            if uniforms is None:
                raise ValueError("mtp_verify: sampling (temperature > 0) needs the supplied uniforms [B, k+1]")
            p = probs_from_logits(target_logits, temperature, top_p, torch.float32)     # [B, k+1, V]
            q = (F.one_hot(draft.long(), V).float() if draft_probs is None
                 else draft_probs.to(device=dev, dtype=torch.float32))                  # [B, k, V]
            d = draft.long()[..., None]
            ratio = p[:, :k].gather(-1, d).squeeze(-1) / q.gather(-1, d).squeeze(-1)   # [B, k]
            ok = uniforms[:, :k].to(dev, torch.float32) < ratio
            n = ok.long().cumprod(-1).sum(-1)                                            # [B]
            p_n = p.gather(1, n[:, None, None].expand(B, 1, V)).squeeze(1)               # [B, V]
            q_pad = torch.cat([q, torch.zeros(B, 1, V, device=dev)], 1)                 # no q for the bonus
            q_n = q_pad.gather(1, n[:, None, None].expand(B, 1, V)).squeeze(1)
            r = (p_n - q_n).clamp(min=0)                                                 # residual (bonus: p)
            r = torch.where(r.sum(-1, keepdim=True) > 0, r, p_n)
            emit = sample_from(r, uniforms[:, k].to(dev))[:, None]                      # [B, 1]
        tokens = torch.where(col < n[:, None], F.pad(draft.long(), (0, 1)), -1)
        tokens = torch.where(col == n[:, None], emit, tokens)
        return n.to(torch.int32), tokens

    # ---- supporting ops ---------------------------------------------------------------------------
    def rms_norm(self, x, weight, eps):
        _decline(weight.dtype == x.dtype, f"npu_rms_norm needs gamma in x's dtype ({weight.dtype} != {x.dtype})")
        _decline(x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"npu_rms_norm: dtype {x.dtype}")
        _decline(weight.dim() == 1 and weight.shape[0] == x.shape[-1], "npu_rms_norm: gamma must be [D]")
        if x.dim() == 1:
            return self.npu.npu_rms_norm(x[None], weight, epsilon=float(eps))[0][0]
        return self.npu.npu_rms_norm(x, weight, epsilon=float(eps))[0]

    def rope(self, x, positions, theta):
        """Interleaved (GPT-J) RoPE through npu_rotary_mul, x viewed as SBND [T, 1, N, Dr]."""
        Dr = x.shape[-1]
        T = x.shape[0]
        N = x[0].numel() // Dr if T else 1
        _decline(x.dtype in (torch.float16, torch.bfloat16, torch.float32), f"npu_rotary_mul: dtype {x.dtype}")
        _decline(Dr % 2 == 0 and Dr < ROPE_MAX_DIM, f"npu_rotary_mul needs D even and < {ROPE_MAX_DIM}, got {Dr}")
        _decline(N < 1000, f"npu_rotary_mul interleave mode needs B * N < 1000, got {N}")
        if T == 0:
            return x.clone()
        inv_freq = 1.0 / (theta ** (torch.arange(0, Dr, 2, dtype=torch.float32, device=x.device) / Dr))
        ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]                   # [T, Dr/2]
        cos = ang.cos().repeat_interleave(2, -1).to(x.dtype).view(T, 1, 1, Dr)          # S11D
        sin = ang.sin().repeat_interleave(2, -1).to(x.dtype).view(T, 1, 1, Dr)
        y = self.npu.npu_rotary_mul(x.reshape(T, 1, N, Dr), cos, sin, rotary_mode="interleave")
        return y.view(x.shape)

    def linear(self, x, weight):
        _decline(x.dtype == weight.dtype, f"linear: x {x.dtype} and weight {weight.dtype} differ")
        return F.linear(x, weight)

    def layer_norm(self, x, weight, bias, eps):
        xf = x.float()
        return F.layer_norm(xf, (x.shape[-1],), weight.float(), bias.float(), eps).to(x.dtype)

    def mlp(self, x, w13, w2):
        _decline(x.dtype == w13.dtype == w2.dtype, "mlp: x and weights must share one dtype")
        return F.linear(self.npu.npu_swiglu(F.linear(x, w13), dim=-1), w2)
