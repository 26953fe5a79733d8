"""The op contract: what every backend computes.

Each op is defined by its reference implementation in `backends/cpu_ref` (the semantics, the
fallback and the test oracle); this module states names, shapes, dtypes and layouts. A backend is
a plain object with a method per op it implements; ops it lacks fall back to the reference on the
same device (see `registry.BoundBackend`).

Batches are token-major ("TND"): one step processes `T` query tokens of `B` requests.
  cu_seqlens_q [B+1] int32   request b owns query tokens cu[b]:cu[b+1]
  seq_lens     [B]   int32   each request's total length *including* this step's tokens
  position of query token i of request b = seq_lens[b] - q_len[b] + i   (right-down causal)
Caches are paged: `[num_blocks, block_size, D]`; `block_table [B, max_blocks] int32` maps a
request's position p to slot `block_table[b, p // bs] * bs + p % bs`. Positions (never cache
slots) cross op boundaries.

Letters: T tokens, B requests, H heads (64), Hi indexer heads (32), Di indexer head dim (128),
Dl latent (512), Dr rope (64), E experts (256), K experts per token (8), Hd hidden (6144),
I expert width (2048), V vocabulary, k draft tokens.
"""

from __future__ import annotations

HOT_OPS = ("indexer_topk", "sparse_mla", "moe_experts", "mtp_verify")
SUPPORTING_OPS = ("moe_route", "rms_norm", "layer_norm", "rope", "linear", "mlp")
OP_NAMES = HOT_OPS + SUPPORTING_OPS


class OpUnsupported(Exception):
    """Raised by a backend op that declines these inputs; the caller falls back to the reference."""


OP_DOCS = {
    "indexer_topk": """indexer_topk(q, w, k_cache, block_table, seq_lens, cu_seqlens_q, topk) -> idx
    q        [T, Hi, Di]   indexer queries, RoPE applied (interleaved, first Dr dims)
    w        [T, Hi] f32   head weights with n_heads^-0.5 * Di^-0.5 folded in
    k_cache  [NB, BS, Di]  paged index keys (LayerNorm + RoPE applied), same dtype as q
    returns  [T, topk] int32 positions: score[t,s] = sum_h w[t,h] * relu(q[t,h] . k[s]) over
             s <= pos(t); the min(topk, pos+1) best positions first (any order, ties any way),
             -1 after.""",
    "sparse_mla": """sparse_mla(q, kv_cache, idx, block_table, seq_lens, cu_seqlens_q, scale, v_dim=512)
                  -> (out, lse)
    q        [T, H, Dl+Dr]  absorbed query: q_lat (W_UK^T q_nope) || q_pe (RoPE applied)
    kv_cache [NB, BS, Dl+Dr] paged latent cache: c (post-norm) || k_pe (post-RoPE)
    idx      [T, topk] int32 positions to attend (-1 = none); positions > pos(t) are a contract
             violation of the caller, entries equal to -1 are skipped
    v_dim    Dl, the latent width (kv_lora_rank): values are the first Dl columns of the cache
    returns  out [T, H, Dl] (q.dtype) = sum_s softmax_s(scale * q.kv[s]) * kv[s, :Dl],
             lse [T, H] f32 (natural log-sum-exp of the scaled scores); a row with no valid
             index gives out = 0, lse = -inf.""",
    "moe_experts": """moe_experts(x, w13, w2, topk_ids, topk_weights) -> y
    x [T, Hd]; w13 [E, 2I, Hd] (gate rows then up rows); w2 [E, Hd, I];
    topk_ids [T, K] int (-1 = slot unused); topk_weights [T, K] f32
    y [T, Hd] (x.dtype) = sum_k w[t,k] * W2[e] (silu(W1[e] x) * W3[e] x),  e = topk_ids[t,k]""",
    "mtp_verify": """mtp_verify(draft, target_logits, draft_probs=None, temperature=0.0, top_p=1.0,
                   uniforms=None) -> (accepted, tokens)
    draft [B, k] int; target_logits [B, k+1, V]; draft_probs [B, k, V] or None (None = the draft
    is deterministic: q = one-hot); uniforms [B, k+1] f32 in [0,1): column i < k decides draft
    token i, column k draws the correction / bonus token by inverse CDF.
    temperature == 0: accept while draft[i] == argmax target_logits[i]; emit the argmax at the
    first miss, or the bonus argmax target_logits[k] when all k are accepted.
    temperature > 0: p = top_p-filtered softmax(logits / temperature); accept draft i while
    u_i < p(d_i) / q(d_i); at the first rejection sample from norm(max(p - q, 0)); bonus from p.
    returns accepted [B] int32 (drafts accepted, 0..k) and tokens [B, k+1] int64: the accepted
    drafts, then the emitted token, then -1.""",
    "moe_route": """moe_route(router_logits, correction_bias, top_k, n_group, topk_group,
                  norm_topk_prob, routed_scaling_factor) -> (topk_ids [T,K] int64, topk_weights [T,K] f32)
    router_logits [T, E] f32; s = sigmoid(logits); selection on s + bias, group-limited (keep the
    topk_group groups with the largest sum of top-2 scores); weights s[ids], renormalised (+1e-20)
    when norm_topk_prob, times routed_scaling_factor.""",
    "rms_norm": "rms_norm(x, weight, eps) -> weight * x / sqrt(mean(x^2) + eps), statistics in f32",
    "layer_norm": "layer_norm(x, weight, bias, eps) -> LayerNorm over the last dim, statistics in f32",
    "rope": """rope(x, positions, theta) -> x rotated, interleaved (GPT-J) pairs (2i, 2i+1)
    x [T, ..., Dr]; positions [T] int; angle = pos * theta^(-2i/Dr)""",
    "linear": "linear(x, weight) -> x @ weight.T;  weight [out, in]",
    "mlp": "mlp(x, w13, w2) -> w2 @ (silu(w13[:I] x) * w13[I:] x); dense MLP and shared expert",
}
