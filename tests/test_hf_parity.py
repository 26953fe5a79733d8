"""GLM52 (cpu_ref) against HF transformers' independent `GlmMoeDsaForCausalLM` (spec §9).

HF saves a tiny random checkpoint with `save_pretrained`; our loader reads it. Logits must agree to
1e-4 of max |logit| in float32 for contexts shorter than, equal to and >= 3x index_topk (so the
indexer really drops tokens), with IndexShare shared layers, in one ragged batch.
"""

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.23")
from transformers import GlmMoeDsaConfig, GlmMoeDsaForCausalLM  # noqa: E402
from transformers.models.glm_moe_dsa import modeling_glm_moe_dsa  # noqa: E402

from glm52_backends import GLM52  # noqa: E402

TOPK = 8
REL_TOL = 1e-4


def _hf_config(**kw):
    base = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                num_experts_per_tok=2, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=24,
                qk_nope_head_dim=16, index_topk=TOPK, index_head_dim=16, index_n_heads=32,  # the real head count: exact-0 ties rare
                first_k_dense_replace=2, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
                index_topk_freq=2, index_skip_topk_offset=2, max_position_embeddings=512,
                eos_token_id=None, pad_token_id=None, bos_token_id=None)
    base.update(kw)
    return GlmMoeDsaConfig(**base)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    assert "apply_rotary_pos_emb_interleave" in inspect.getsource(modeling_glm_moe_dsa.GlmMoeDsaIndexer.forward), \
        "this transformers has the NeoX indexer RoPE bug (spec §9); it is not a valid reference"
    torch.manual_seed(1234)
    cfg = _hf_config()
    assert cfg.indexer_types == ["full", "full", "shared", "full", "shared", "full"]
    hf = GlmMoeDsaForCausalLM(cfg).eval()
    with torch.no_grad():  # O(1) activations, routing exercised by a random correction bias
        for name, p in hf.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in name else p.normal_(0.0, 0.1)
        for m in hf.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.uniform_(0.0, 0.1)
    path = tmp_path_factory.mktemp("hf_tiny")
    hf.save_pretrained(path)
    ours = GLM52(path, backend="cpu_ref", dtype=torch.float32, progress=False)
    return hf, ours


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_full_forward_ragged_batch_matches_hf(hf_pair):
    hf, ours = hf_pair
    g = torch.Generator().manual_seed(7)
    lengths = [5, TOPK, 3 * TOPK + 3, 4 * TOPK]  # shorter than, equal to, >= 3x index_topk
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in lengths]
    got = ours(prompts)
    for ids, lg in zip(prompts, got):
        ref = _hf_logits(hf, ids)
        err = (lg - ref).abs().max().item() / ref.abs().max().item()
        print(f"len {len(ids):3d}: max |dlogit| / max |logit| = {err:.2e}")
        assert err <= REL_TOL, f"length {len(ids)}: relative logits error {err:.2e}"


def test_sparse_selection_matters(hf_pair):
    """Guard that the long case really is sparse: a dense top-k would change the logits."""
    hf, ours = hf_pair
    ids = torch.randint(0, 160, (3 * TOPK + 3,), generator=torch.Generator().manual_seed(3)).tolist()
    sparse = ours([ids])[0]
    old = ours.cfg.index_topk
    try:
        ours.cfg.index_topk = 10_000
        dense = ours([ids])[0]
    finally:
        ours.cfg.index_topk = old
    assert torch.allclose(sparse[:TOPK], dense[:TOPK], atol=1e-5)  # short prefixes: nothing dropped
    assert (sparse[TOPK:] - dense[TOPK:]).abs().max() > 1e-2


def test_tensor_batch_matches_hf(hf_pair):
    hf, ours = hf_pair
    ids = torch.randint(0, 160, (2, 2 * TOPK + 1), generator=torch.Generator().manual_seed(11))
    got = ours(ids)
    assert got.shape == (2, 2 * TOPK + 1, 160)
    with torch.no_grad():
        ref = hf(ids).logits.float()
    assert (got - ref).abs().max() / ref.abs().max() <= REL_TOL


def test_greedy_generation_matches_hf(hf_pair):
    hf, ours = hf_pair
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (3, 2 * TOPK + 1)]
    n_new = 32
    res = ours.generate(prompts, max_new_tokens=n_new, temperature=0.0, stop_at_eos=False)
    for p, got in zip(prompts, res.tokens):
        seq = list(p)
        for _ in range(n_new):  # HF ground truth: a full forward per token
            seq.append(int(_hf_logits(hf, seq)[-1].argmax()))
        assert got == seq[len(p):]
        assert len(seq) > 3 * TOPK  # sparse selection active for most of the generated tokens
