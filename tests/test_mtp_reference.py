"""An independent float64 reference of GLM-5.2, the MTP (nextn) layer included, against the model.

HF transformers has no MTP layer, and the speculative tests use the model's own MTP layer as their
reference: a bug there would only lower the acceptance rate, silently (greedy and rejection
sampling are exact whatever the drafts). Here the network is re-derived in plain float64 torch from
the checkpoint's tensors (HF names, read with safetensors) and the config.json values, following
spec/glm52-model.md §3-§8 directly, without calling the model's code:

  * attention in the naive (HF) form: per-head keys W_UK c || k_pe and values W_UV c, softmax over
    the indexer's selection (the model runs the absorbed form over paged caches);
  * the indexer as the spec writes it (ReLU per head, the head weights scaled by Hi^-0.5, the dot
    products by Di^-0.5), IndexShare by presence of the indexer tensors, causal top-k per position;
  * MoE by the spec: float32 router GEMM, sigmoid, bias for selection only, renormalised, x 2.5;
  * MTP, vLLM's convention (§8): at position i the layer takes [enorm(embed(token i+1)) ;
    hnorm(h_i)] through eh_proj (embedding first, embedding zeroed at position 0), h_i the
    target's final-normed hidden; the layer is a full decoder layer with its own indexer; its
    logits come from lm_head(shared_head.norm(z)); further draft steps feed z back as h.

The whole sequence is recomputed at every step (no cache), so a cache, rollback or position bug in
the model cannot be mirrored here. Three conventions are the contract's and are followed: RoPE angles
in float32 (ops/rope.py, like HF), the router GEMM's float32 input and output (spec §7) and the
routing weights' float32 (ops/moe_route.py); all are deterministic roundings, so float64 agreement
stays far below REL_TOL.

The model runs on cpu_ref in float64. Its hidden states (the target's final-normed hidden, the MTP
layer's output) must agree to REL_TOL = 1e-9 of their largest magnitude, its logits (float32 by
contract) to LOGIT_TOL = 2^-23 (their float32 rounding): tight enough that the small constants
(latent norm eps 1e-6 vs 1e-5, the indexer's LayerNorm eps) that move logits by less than the HF
comparison's 1e-4 are caught (checked below by changing each).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from glm52_backends import GLM52
from glm52_backends.backends.cpu_ref import CpuRefBackend
from glm52_backends.engine.scheduler import Engine, SamplingParams
from glm52_backends.ops import REFERENCES
from glm52_backends.devtools.make_tiny import make_tiny_checkpoint

REL_TOL = 1e-9
LOGIT_TOL = 2.0 ** -23
LATENT_EPS = 1e-6   # q_a_layernorm / kv_a_layernorm: HF's class default (spec §4.1)
INDEXER_EPS = 1e-6  # indexer k_norm LayerNorm (spec §2, §5)
ALPHA = 1e-3        # significance level of the distribution test


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ---- the reference --------------------------------------------------------------------------------

class Reference:
    """GLM-5.x in float64 from a checkpoint folder's tensors and config.json (spec §3-§8)."""

    def __init__(self, path: str, *, latent_eps: float = LATENT_EPS, indexer_eps: float = INDEXER_EPS):
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            self.c = json.load(f)
        self.W = {k: v.double() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
        self.W32 = {k: v.float() for k, v in load_file(os.path.join(path, "model.safetensors")).items()}
        self.latent_eps, self.indexer_eps = latent_eps, indexer_eps
        self.eps = self.c["rms_norm_eps"]
        self.theta = self.c["rope_parameters"]["rope_theta"]
        self.N = self.c["num_hidden_layers"]

    # -- pieces
    def rms(self, x, w, eps):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)

    def rope(self, x, pos):
        """Interleaved pairs (2i, 2i+1); angles pos * theta^(-2i/dr) in float32 (the contract's choice)."""
        dr = x.shape[-1]
        inv = 1.0 / (self.theta ** (torch.arange(0, dr, 2, dtype=torch.float32) / dr))
        ang = pos.float()[:, None] * inv[None, :]
        cos, sin = ang.cos().double(), ang.sin().double()
        while cos.dim() < x[..., 0::2].dim():
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        y = torch.empty_like(x)
        y[..., 0::2] = x[..., 0::2] * cos - x[..., 1::2] * sin
        y[..., 1::2] = x[..., 1::2] * cos + x[..., 0::2] * sin
        return y

    def expert(self, p, x):
        W = self.W
        return (F.silu(x @ W[p + "gate_proj.weight"].T) * (x @ W[p + "up_proj.weight"].T)) @ W[p + "down_proj.weight"].T

    def ffn(self, p, x):
        W, c = self.W, self.c
        if p + "mlp.gate.weight" not in W:
            return self.expert(p + "mlp.", x)
        logits = (x.float().double() @ self.W32[p + "mlp.gate.weight"].double().T).float().double()  # f32 router
        s = torch.sigmoid(logits)
        choice = s + W[p + "mlp.gate.e_score_correction_bias"]
        assert c["n_group"] == 1, "the tiny checkpoints here have one expert group"
        y = torch.zeros_like(x)
        for t in range(x.shape[0]):
            ids = choice[t].topk(c["num_experts_per_tok"]).indices
            w = s[t, ids]
            if c["norm_topk_prob"]:
                w = w / (w.sum() + 1e-20)
            w = (w * c["routed_scaling_factor"]).float().double()                    # f32 routing weights
            for e, we in zip(ids.tolist(), w):
                y[t] += we * self.expert(f"{p}mlp.experts.{e}.", x[t:t + 1])[0]
        return y + self.expert(p + "mlp.shared_experts.", x)

    def selection(self, p, x, qr, pos):
        """The layer's own indexer: per position t the top-min(topk, t+1) positions s <= t."""
        W, c = self.W, self.c
        Hi, Di, dr, L = c["index_n_heads"], c["index_head_dim"], c["qk_rope_head_dim"], x.shape[0]
        iq = (qr @ W[p + "self_attn.indexer.wq_b.weight"].T).view(L, Hi, Di)
        iq = torch.cat([self.rope(iq[..., :dr], pos), iq[..., dr:]], -1)                # rope on the FIRST dr
        ik = F.layer_norm(x @ W[p + "self_attn.indexer.wk.weight"].T, (Di,), W[p + "self_attn.indexer.k_norm.weight"],
                          W[p + "self_attn.indexer.k_norm.bias"], self.indexer_eps)
        ik = torch.cat([self.rope(ik[:, :dr], pos), ik[:, dr:]], -1)
        wI = (x @ W[p + "self_attn.indexer.weights_proj.weight"].T) * Hi ** -0.5
        sel = []
        for t in range(L):
            score = (wI[t, :, None] * torch.relu(iq[t] @ ik[:t + 1].T * Di ** -0.5)).sum(0)   # [t+1]
            sel.append(sorted(score.topk(min(c["index_topk"], t + 1)).indices.tolist()))
        return sel

    def layer(self, l, X, pos, prev_sel=None, override=None):
        """Decoder layer `l` over the inputs X [L, Hd] at positions pos = 0..L-1 (causal). `prev_sel`:
        the selection of the nearest full layer (IndexShare); `override`: {row: positions} used instead
        of the indexer's choice for those rows. Returns (output [L, Hd], selection per row)."""
        W, c = self.W, self.c
        p = f"model.layers.{l}."
        H, dn, dr, dv, C = (c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"],
                            c["kv_lora_rank"])
        L = X.shape[0]
        x = self.rms(X, W[p + "input_layernorm.weight"], self.eps)
        qr = self.rms(x @ W[p + "self_attn.q_a_proj.weight"].T, W[p + "self_attn.q_a_layernorm.weight"], self.latent_eps)
        q = (qr @ W[p + "self_attn.q_b_proj.weight"].T).view(L, H, dn + dr)
        q_nope, q_pe = q[..., :dn], self.rope(q[..., dn:], pos)
        kva = x @ W[p + "self_attn.kv_a_proj_with_mqa.weight"].T
        lat = self.rms(kva[:, :C], W[p + "self_attn.kv_a_layernorm.weight"], self.latent_eps)
        k_pe = self.rope(kva[:, C:], pos)
        if p + "self_attn.indexer.wk.weight" in W:
            sel = self.selection(p, x, qr, pos)
        else:
            assert prev_sel is not None, f"layer {l} shares an index but no full layer precedes it"
            sel = prev_sel
        sel = [list((override or {}).get(t, s)) for t, s in enumerate(sel)]
        kvb = W[p + "self_attn.kv_b_proj.weight"].view(H, dn + dv, C)
        k_nope = torch.einsum("hdc,sc->shd", kvb[:, :dn], lat)                          # [L, H, dn]
        v = torch.einsum("hvc,sc->shv", kvb[:, dn:], lat)                               # [L, H, dv]
        o = torch.zeros(L, H, dv, dtype=torch.float64)
        for t in range(L):
            S = torch.tensor(sel[t], dtype=torch.long)
            assert len(S) and int(S.max()) <= t, (l, t, sel[t])
            score = (torch.einsum("hd,shd->hs", q_nope[t], k_nope[S]) + q_pe[t] @ k_pe[S].T) * (dn + dr) ** -0.5
            o[t] = torch.einsum("hs,shv->hv", torch.softmax(score, -1), v[S])
        h = X + o.reshape(L, H * dv) @ W[p + "self_attn.o_proj.weight"].T
        h = h + self.ffn(p, self.rms(h, W[p + "post_attention_layernorm.weight"], self.eps))
        return h, sel

    # -- the model
    def hidden(self, ids: list[int], final_norm: bool = True) -> torch.Tensor:
        """The target's final-normed hidden states [L, Hd] of one sequence (the lm_head input)."""
        h = self.W["model.embed_tokens.weight"][torch.tensor(ids)]
        pos = torch.arange(len(ids))
        sel = None
        for l in range(self.N):
            h, sel = self.layer(l, h, pos, sel)
        return self.rms(h, self.W["model.norm.weight"], self.eps) if final_norm else h

    def logits(self, h):
        return h @ self.W["lm_head.weight"].T

    def mtp(self, hid: torch.Tensor, tokens: list[int], override=None):
        """The MTP layer over positions 0..L-1: row i takes hidden `hid[i]` and token `tokens[i]` (the
        token at position i+1). Returns (output hidden z [L, Hd], logits [L, V], selection per row)."""
        W, p = self.W, f"model.layers.{self.N}."
        pos = torch.arange(len(tokens))
        e = W["model.embed_tokens.weight"][torch.tensor(tokens)].clone()
        e[0] = 0.0                                                                       # vLLM: position 0
        u = torch.cat([self.rms(e, W[p + "enorm.weight"], self.eps), self.rms(hid, W[p + "hnorm.weight"], self.eps)],
                      -1) @ W[p + "eh_proj.weight"].T                                  # embedding first
        z, sel = self.layer(self.N, u, pos, override=override)
        return z, self.logits(self.rms(z, W[p + "shared_head.norm.weight"], self.eps)), sel


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ---- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # 32 indexer heads: exact ReLU-zero ties at the top-k boundary are practically absent
    return make_tiny_checkpoint(tmp_path_factory.mktemp("mtp_ref"), mtp=True, layers=4, seed=21, index_topk=6,
                                index_n_heads=32)


@pytest.fixture(scope="module")
def ref(ckpt):
    return Reference(ckpt)


@pytest.fixture(scope="module")
def model(ckpt):
    return GLM52(ckpt, backend=CpuRefBackend(torch.float64), dtype=torch.float64, progress=False)


def _seq(V: int, n: int, seed: int) -> list[int]:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ---- the target network -------------------------------------------------------------------------------

def _target(model, seq):
    cache = model.new_cache(4 * (len(seq) + 16))
    _, h = model.run(cache, {0: seq})
    return h


def test_target_matches_the_reference_in_float64(model, ref):
    seq = _seq(model.cfg.vocab_size, 17, 1)                         # > 2x index_topk: tokens dropped
    h_ref = ref.hidden(seq)
    h = _target(model, seq)
    assert h.dtype == torch.float64 and _rel(h, h_ref) <= REL_TOL, _rel(h, h_ref)
    got = model([seq])[0]
    assert got.dtype == torch.float32 and _rel(got, ref.logits(h_ref)) <= LOGIT_TOL, _rel(got, ref.logits(h_ref))


@pytest.mark.parametrize("field,value", [("latent_norm_eps", 1e-5), ("rms_norm_eps", 1e-6),
                                         ("routed_scaling_factor", 2.5 * 1.001)])
def test_small_constants_are_seen(model, ref, field, value):
    """Each small constant moves the hidden states and logits by far more than the tolerances here
    (the HF comparison's 1e-4 may not see them: spec §9 measured 9.6e-5 for the latent eps)."""
    seq = _seq(model.cfg.vocab_size, 17, 1)
    h_ref = ref.hidden(seq)
    old = getattr(model.cfg, field)
    setattr(model.cfg, field, value)
    try:
        h = _target(model, seq)
        got = model([seq])[0]
    finally:
        setattr(model.cfg, field, old)
    assert _rel(h, h_ref) > 100 * REL_TOL, f"{field}={value}: {_rel(h, h_ref):.1e}"
    assert _rel(got, ref.logits(h_ref)) > 10 * LOGIT_TOL, f"{field}={value}: {_rel(got, ref.logits(h_ref)):.1e}"


def test_norm_epsilons_reach_the_ops(ckpt):
    """The indexer's LayerNorm eps acts only through the top-k choice (the logits do not move with it
    unless a selection flips), so it is checked where it is used: every layer_norm call is the
    indexer's k_norm with 1e-6, every rms_norm call uses 1e-6 (q_a / kv_a latent norms) or
    rms_norm_eps (all others), each as often as the network has such norms."""
    seen = {"layer_norm": [], "rms_norm": []}

    class Spy(CpuRefBackend):
        def __init__(self):
            super().__init__(torch.float64)
            self.name = "spy"
            for op in seen:
                def fn(*a, _op=op, **kw):
                    seen[_op].append(a[-1])
                    return REFERENCES[_op](*a, **kw, cdt=torch.float64)
                setattr(self, op, fn)

    model = GLM52(ckpt, backend=Spy(), dtype=torch.float64, progress=False)
    cfg = model.cfg
    cache = model.new_cache(64, mtp=True)
    _, h = model.run(cache, {0: [1, 2, 3]})
    n_full = len(cfg.full_layers)
    assert seen["layer_norm"] == [INDEXER_EPS] * n_full
    eps = seen["rms_norm"]
    assert eps.count(LATENT_EPS) == 2 * cfg.num_hidden_layers                     # q_a and kv_a per layer
    assert eps.count(cfg.rms_norm_eps) == 2 * cfg.num_hidden_layers + 1 and len(eps) == 4 * cfg.num_hidden_layers + 1
    seen["rms_norm"].clear(), seen["layer_norm"].clear()
    model.run_mtp(cache, {("mtp", 0): [2, 3, 4]}, h)
    assert seen["layer_norm"] == [INDEXER_EPS]                                   # the MTP layer's indexer
    assert sorted(seen["rms_norm"]) == sorted([cfg.rms_norm_eps] * 5 + [LATENT_EPS] * 2)  # e, h, in, post, head


# ---- the MTP layer -------------------------------------------------------------------------------------

def _catch_up(model, seq: list[int], P: int):
    """Target prefill of seq[:P] and the MTP layer over positions 0..P-1 (tokens seq[1..P]), as
    speculative decoding's first catch-up does. Returns (cache, target hidden, MTP z, logits, top-k)."""
    cache = model.new_cache(4 * (P + 16), mtp=True)
    _, h = model.run(cache, {0: seq[:P]})
    _, z, lg, idx = model.run_mtp(cache, {("mtp", 0): seq[1:P + 1]}, h)
    return cache, h, z, lg, idx


def test_mtp_logits_match_the_reference_in_float64(model, ref):
    P = 15
    seq = _seq(model.cfg.vocab_size, P + 1, 2)
    _, h, z, lg, idx = _catch_up(model, seq, P)
    h_ref = ref.hidden(seq[:P])
    assert _rel(h, h_ref) <= REL_TOL
    z_ref, lg_ref, sel = ref.mtp(h_ref, seq[1:P + 1])
    assert lg.dtype == torch.float32 and _rel(lg, lg_ref) <= LOGIT_TOL, _rel(lg, lg_ref)
    assert z.dtype == torch.float64 and _rel(z, z_ref) <= REL_TOL, _rel(z, z_ref)
    for t in range(P):                                                   # the MTP layer's own top-k
        assert sorted(i for i in idx[t].tolist() if i >= 0) == sel[t], t
    assert any(len(s) < t + 1 for t, s in enumerate(sel)), "the MTP indexer must really drop positions"


def test_mtp_reference_is_sensitive_to_each_convention(model, ref):
    """The reference can fail: each plausible wrong convention of spec §8 moves the logits far above
    REL_TOL (hidden before the final norm, [h; emb] order, no zeroing at position 0, the token at i
    instead of i+1)."""
    P = 12
    seq = _seq(model.cfg.vocab_size, P + 1, 3)
    _, _, z, lg, _ = _catch_up(model, seq, P)
    W, N = ref.W, ref.N
    p = f"model.layers.{N}."
    hf = ref.hidden(seq[:P])
    assert _rel(z, ref.mtp(hf, seq[1:P + 1])[0]) <= REL_TOL
    far = 1e3 * LOGIT_TOL
    assert _rel(lg, ref.mtp(ref.hidden(seq[:P], final_norm=False), seq[1:P + 1])[1]) > far  # pre-norm hidden
    assert _rel(lg, ref.mtp(hf, seq[:P])[1]) > far                                # token i instead of i+1
    swapped = dict(W)
    eh = W[p + "eh_proj.weight"]
    Hd = eh.shape[0]
    swapped[p + "eh_proj.weight"] = torch.cat([eh[:, Hd:], eh[:, :Hd]], 1)       # [h; emb] order
    r2 = Reference.__new__(Reference)
    r2.__dict__.update(ref.__dict__, W=swapped)
    assert _rel(lg, r2.mtp(hf, seq[1:P + 1])[1]) > far
    assert _rel(lg[:1], _mtp_no_zero(ref, hf, seq[1:P + 1])[1][:1]) > far      # position 0 not zeroed


def _mtp_no_zero(ref, hid, tokens):
    W, p = ref.W, f"model.layers.{ref.N}."
    e = W["model.embed_tokens.weight"][torch.tensor(tokens)]
    u = torch.cat([ref.rms(e, W[p + "enorm.weight"], ref.eps), ref.rms(hid, W[p + "hnorm.weight"], ref.eps)],
                  -1) @ W[p + "eh_proj.weight"].T
    z, _ = ref.layer(ref.N, u, torch.arange(len(tokens)))
    return z, ref.logits(ref.rms(z, W[p + "shared_head.norm.weight"], ref.eps))


@pytest.mark.parametrize("share", [False, True], ids=["own-indexer", "index-share"])
def test_mtp_draft_steps_match_the_reference(model, ref, share):
    """Drafting further (spec §8): the layer re-applied at positions P, P+1 to its own output hidden
    and the previous draft token; with index_share_for_mtp_iteration the later steps attend to the
    first step's top-k row instead of running the MTP indexer."""
    P = 14
    seq = _seq(model.cfg.vocab_size, P + 1, 4)
    cache, h, z, lg, idx = _catch_up(model, seq, P)
    d1 = int(lg[-1].argmax())
    shared = idx[-1:] if share else None
    _, z2, lg2, idx2 = model.run_mtp(cache, {("mtp", 0): [d1]}, z[-1:], shared)
    d2 = int(lg2[-1].argmax())
    _, z3, lg3, _ = model.run_mtp(cache, {("mtp", 0): [d2]}, z2, shared)

    h_ref = ref.hidden(seq[:P])
    z_ref, lg_ref, sel = ref.mtp(h_ref, seq[1:P + 1])
    assert int(lg_ref[-1].argmax()) == d1
    override = {}
    if share:
        override = {P: sel[P - 1], P + 1: sel[P - 1]}
    hid = torch.cat([h_ref, z_ref[-1:]])
    z_b, lg_b, sel_b = ref.mtp(hid, seq[1:P + 1] + [d1], override)
    assert _rel(z2[-1], z_b[-1]) <= REL_TOL and _rel(lg2[-1], lg_b[-1]) <= LOGIT_TOL, _rel(z2[-1], z_b[-1])
    assert int(lg_b[-1].argmax()) == d2
    hid = torch.cat([h_ref, z_ref[-1:], z_b[-1:]])
    z_c, lg_c, sel_c = ref.mtp(hid, seq[1:P + 1] + [d1, d2], override)
    assert _rel(z3[-1], z_c[-1]) <= REL_TOL and _rel(lg3[-1], lg_c[-1]) <= LOGIT_TOL, _rel(z3[-1], z_c[-1])
    if share:
        assert idx2[0].tolist() == idx[-1].tolist()
        assert sel_c[P + 1] == sel[P - 1] and P not in sel_c[P + 1]      # the shared row: no new position
    else:
        assert sorted(i for i in idx2[0].tolist() if i >= 0) == sel_b[P]  # the MTP indexer's own row


# ---- the drafts the speculative decoder proposes -------------------------------------------------------------

class _Recorder(CpuRefBackend):
    """cpu_ref whose mtp_verify records the drafts and the draft distributions it is handed."""

    def __init__(self, dtype):
        super().__init__(dtype)
        self.name = "cpu_ref-recording"
        self.seen = []
        ref_verify = self.mtp_verify

        def mtp_verify(draft, target_logits, draft_probs=None, temperature=0.0, top_p=1.0, uniforms=None):
            self.seen.append((draft.clone(), None if draft_probs is None else draft_probs.clone()))
            return ref_verify(draft, target_logits, draft_probs, temperature, top_p, uniforms)
        self.mtp_verify = mtp_verify


def test_greedy_drafts_are_the_reference_mtp_argmax_chain(ckpt, ref):
    """The k drafts of a greedy round are the argmax chain of the reference MTP layer (catch-up over
    the prompt, then k-1 draft steps on its own hidden), for a batch of requests of different lengths."""
    rec = _Recorder(torch.float64)
    model = GLM52(ckpt, backend=rec, dtype=torch.float64, progress=False)
    k, V = 3, model.cfg.vocab_size
    prompts = [_seq(V, n, 10 + n) for n in (4, 9, 13)]
    eng = Engine(model, speculative=k, cache_tokens=600)
    reqs = [eng.requests[eng.add_request(p, SamplingParams(max_tokens=20, ignore_eos=True), request_id=b)]
            for b, p in enumerate(prompts)]
    eng.step()                                                     # the prefill: each request's first token
    first = [q.ids[len(q.prompt)] for q in reqs]
    eng.step()                                                     # one round: k drafts each, one verify
    draft = rec.seen[-1][0]
    share = model.cfg.index_share_for_mtp_iteration
    for b, (prompt, t0) in enumerate(zip(prompts, first)):
        P = len(prompt)
        seq = prompt + [t0]
        h_ref = ref.hidden(prompt)
        assert int(ref.logits(h_ref)[-1].argmax()) == t0
        z, lg, sel = ref.mtp(h_ref, seq[1:])
        hid, toks, want = h_ref, seq[1:], []
        for j in range(k):
            d = int(lg[-1].argmax())
            want.append(d)
            hid, toks = torch.cat([hid, z[-1:]]), toks + [d]
            override = {P + i: sel[P - 1] for i in range(j + 1)} if share else None
            z, lg, _ = ref.mtp(hid, toks, override)
        assert draft[b].tolist() == want, b


def _top_p(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of most likely tokens with mass >= top_p, renormalised (written out here)."""
    out = torch.zeros_like(p)
    order = sorted(range(len(p)), key=lambda i: -float(p[i]))
    mass = 0.0
    for i in order:
        out[i] = p[i]
        mass += float(p[i])
        if mass >= top_p:
            break
    return out / out.sum()


def _chi2_sf(x: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64)))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_drafts_follow_the_reference_mtp_distribution(tmp_path_factory, temperature, top_p):
    """Sampling: the draft distributions handed to mtp_verify equal the reference MTP layer's
    (softmax(logits / T), top-p) at each draft step, and the first draft tokens are drawn from them
    (Pearson chi-square per first-token group, vocabulary 4, 600 identical prompts)."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("v4"), mtp=True, layers=1, seed=8, index_topk=4,
                                vocab_size=4, index_n_heads=32)
    ref = Reference(path)
    rec = _Recorder(torch.float32)
    model = GLM52(path, backend=rec, dtype=torch.float32, progress=False)
    N, k, prompt = 600, 2, [1, 3, 0, 2, 2, 1]
    eng = Engine(model, speculative=k, cache_tokens=N * 64, max_num_seqs=N, max_num_batched_tokens=N * (k + 7),
                 seed=3, prefix_caching=False)
    params = SamplingParams(max_tokens=20, temperature=temperature, top_p=top_p, ignore_eos=True)
    reqs = [eng.requests[eng.add_request(prompt, params, request_id=b)] for b in range(N)]
    eng.step()
    first = [q.ids[len(q.prompt)] for q in reqs]
    eng.step()
    draft, q = rec.seen[-1]
    h_ref = ref.hidden(prompt)
    share = model.cfg.index_share_for_mtp_iteration
    stat, df = 0.0, 0
    for t0 in sorted(set(first)):
        rows = [b for b, t in enumerate(first) if t == t0]
        z, lg, sel = ref.mtp(h_ref, prompt[1:] + [t0])
        q1 = _top_p(torch.softmax(lg[-1] / temperature, -1), top_p)
        assert torch.allclose(q[rows, 0].double(), q1.expand(len(rows), -1), atol=1e-5), t0
        # the second step: conditioned on each first draft
        for d1 in sorted(set(draft[rows, 0].tolist())):
            sub = [b for b in rows if int(draft[b, 0]) == d1]
            override = {len(prompt): sel[len(prompt) - 1]} if share else None
            _, lg2, _ = ref.mtp(torch.cat([h_ref, z[-1:]]), prompt[1:] + [t0, d1], override)
            q2 = _top_p(torch.softmax(lg2[-1] / temperature, -1), top_p)
            assert torch.allclose(q[sub, 1].double(), q2.expand(len(sub), -1), atol=1e-5), (t0, d1)
            assert all(q2[int(draft[b, 1])] > 0 for b in sub)
        counts = torch.bincount(draft[rows, 0], minlength=4).double()
        expect = len(rows) * q1
        assert (counts[q1 == 0] == 0).all(), "a draft the distribution gives no mass"
        keep = expect >= 5
        cells = [(counts[keep], expect[keep])]
        if expect[~keep].sum() > 0:
            cells.append((counts[~keep].sum()[None], expect[~keep].sum()[None]))     # pooled small cells
        o, e = torch.cat([c[0] for c in cells]), torch.cat([c[1] for c in cells])
        stat += float(((o - e) ** 2 / e).sum())
        df += len(o) - 1
    assert df >= 2, "too few draft cells to test"
    p = _chi2_sf(stat, df)
    assert p > ALPHA, f"chi2 = {stat:.1f} on {df} df, p = {p:.2e}"
