"""The memory planner against published deployments and hand computations from the config."""

from __future__ import annotations

import json

import pytest

from glm52_backends.configs import bundled_configs
from glm52_backends.deploy import load_deployment
from glm52_backends.planner import GiB, plan, plan_main

A3 = "ascend-910c"    # one Atlas 800 A3 node: 16 x 64 GB
A2 = "ascend-910b"    # Atlas 800 A2 nodes: 8 x 64 GB each


def _nodes(name: str, nodes: int, *, weights: str, ep: int | None = None, ctx: int = 32768, batch: int = 1):
    """`name` scaled to `nodes` nodes: TP8, DP over the rest, EP over all devices unless `ep` is given."""
    d = load_deployment(name)
    world = d.devices_per_node * nodes
    return d.replace(nodes=nodes, max_context=ctx, max_batch=batch, **{
        "dtypes.weights": weights, "parallel.tp": 8, "parallel.dp": world // 8, "parallel.ep": ep or world})


# ---- published deployments (spec/ascend-and-chips.md §5, recipes.vllm.ai/zai-org/GLM-5.2) ----------
def test_w8a8_fits_one_a3_node_dp2_tp8_ep():
    d = load_deployment(A3)
    assert (d.nodes, d.devices_per_node, d.tp, d.dp, d.ep, d.weights_dtype) == (1, 16, 8, 2, 16, "w8a8")
    p = plan(d)
    assert p.fits and p.need_bytes <= p.usable_bytes
    assert p.max_context_at_batch >= d.max_context


def test_bf16_needs_two_a3_nodes():
    assert plan(_nodes(A3, 2, weights="bf16")).fits
    one = plan(_nodes(A3, 1, weights="bf16"))
    assert not one.fits and one.max_context_at_batch == 0  # not even one token of context fits


def test_bf16_needs_four_a2_nodes():
    assert plan(_nodes(A2, 4, weights="bf16")).fits
    for nodes in (2, 3):  # 3 nodes = 24 devices: 256 experts do not split 24 ways, so EP8 (3 copies)
        p = plan(_nodes(A2, nodes, weights="bf16", ep=8 if nodes == 3 else None))
        assert not p.fits and p.max_context_at_batch == 0, nodes


def test_fp8_on_8xh200_fits_1m_context_for_one_request():
    d = load_deployment("nvidia-h200")
    assert (d.devices, d.weights_dtype, d.max_context, d.max_batch) == (8, "fp8", 1048576, 1)
    p = plan(d)
    assert p.fits and p.max_context_at_batch == 1048576
    # it needs the latent cache striped over the TP group (DCP8): replicated per rank, 1M does not
    # fit, as the vLLM recipe says (full 1M context only on 8 x B200)
    replicated = plan(d.replace(**{"parallel.dcp": 1}))
    assert not replicated.fits and 0 < replicated.max_context_at_batch < 1048576


def test_one_request_context_with_and_without_dcp_and_offload():
    """The largest one-request context, per YAML: with its DCP and with the latent cache replicated, from
    the same arithmetic as the plan; host offload keeps a staging area on the device (sized for the
    worst decode step: every selected position in its own block) and the whole context's latent rows on
    the host, so the context is bounded by both."""
    from glm52_backends.deploy import DeploymentError
    d = load_deployment("nvidia-h200")
    p = plan(d)
    assert p.max_context_one_request == 1048576 and p.max_context_one_request_without_dcp == \
        plan(d.replace(**{"parallel.dcp": 1})).max_context_at_batch < 1048576
    small = load_deployment("ascend-910c").replace(**{"dtypes.kv_cache": "bf16", "cache_block_size": 1})   # token-granular staging
    base = plan(small)
    lat = base.latent_bytes_per_token
    host = plan(small.replace(offload_gb=base.max_context_one_request * 2 * lat / GiB))   # room for 2x the context
    assert host.max_context_one_request > base.max_context_one_request
    assert host.max_context_one_request_without_offload == base.max_context_one_request
    tight = plan(small.replace(offload_gb=1000 * lat / GiB))                             # the host holds 1000 tokens
    assert tight.max_context_one_request == 1000
    with pytest.raises(DeploymentError, match="offload_gb.*>= 0"):
        small.replace(offload_gb=-1)


def test_offload_with_dcp_holds_one_dcp_share_of_the_rows_on_each_devices_host():
    """Host offload with decode context parallelism plans: each dcp rank offloads its own 1/dcp of every
    request's latent rows, so a device's host share (offload_gb, per device) holds context x latent / dcp.
    One byte more than that fits, one byte less does not; the DCP1 column needs the whole context there."""
    small = load_deployment("ascend-910c").replace(**{"dtypes.kv_cache": "bf16", "cache_block_size": 1,
                                                      "parallel.dcp": 4})
    assert small.tp == 8 and small.dcp == 4 and small.max_batch == 1
    base = plan(small)                                   # no offload: the device bounds the context
    c = base.max_context_one_request // 2                # the device holds it with room to spare
    lat = base.latent_bytes_per_token                    # the plan's own bytes per token (79 x 1152 B, bf16)
    assert lat == 79 * 1152 and lat % 4 == 0
    share = c * lat // 4                                 # bytes of latent rows on one device's host share
    above = plan(small.replace(max_context=c, offload_gb=(share + 1) / GiB))
    below = plan(small.replace(max_context=c, offload_gb=(share - 1) / GiB))
    for p in (above, below):
        assert p.need_bytes <= p.usable_bytes            # the device holds it either way: the host decides
        assert p.host_bytes_per_device == share and p.to_dict()["host_bytes_per_device"] == share
    assert above.fits and above.max_context_at_batch == above.max_context_one_request == c
    assert not below.fits and below.max_context_at_batch == below.max_context_one_request == c - 1
    # without DCP (the same host share, the latent rows of the whole context on it): a quarter of c
    assert above.max_context_one_request_without_dcp == (share + 1) // lat == c // 4
    # the staging area on the device is 1/dcp of (1 + draft tokens) x top-k one-token blocks
    cfg = small.model_config()
    staged = (1 + small.mtp_draft_tokens) * cfg.index_topk
    assert {r.component: r.bytes for r in above.rows}["latent cache"] == staged * lat / 4
    # the table says how much of the context sits on each device's host
    row = next(r.how for r in above.rows if r.component == "latent cache")
    assert f"the context's {c * lat / GiB:.1f} GiB on the host, {share / GiB:.1f} GiB (1/DCP4) per device" in row
    assert "DOES NOT FIT" in below.table() and "FITS" in above.table().replace("DOES NOT FIT", "")
    # the bundled DCP8 config takes host offload too (GLM52(offload=..., dcp=8))
    h200 = plan(load_deployment("nvidia-h200").replace(offload_gb=20))
    assert h200.fits and h200.host_bytes_per_device == 1048576 * h200.latent_bytes_per_token / 8 <= 20 * GiB


def test_bf16_on_one_8xh100_node_does_not_fit():
    d = load_deployment("nvidia-h100").replace(nodes=1, **{"dtypes.weights": "bf16", "parallel.dp": 1,
                                                            "parallel.ep": 8})
    p = plan(d)
    assert d.devices == 8 and not p.fits and p.max_context_at_batch == 0
    weights = sum(r.bytes for r in p.rows[:6])
    assert weights > d.memory_per_device_gb * GiB  # the weights alone exceed the card


# ---- hand computations ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ascend-910c", "nvidia-h200", "cpu-tiny"])
def test_kv_cache_bytes_per_token_by_hand(name):
    d = load_deployment(name)
    cfg = d.model_config()
    mtp = 1 if d.mtp_draft_tokens > 0 else 0
    layers = cfg.num_hidden_layers + mtp                                    # the MTP layer has its own caches
    full = sum(t == "full" for t in cfg.indexer_types) + mtp                 # index keys: full layers only
    if d.kv_cache_dtype == "fp8":   # FlashMLA layout: 512 fp8 + one f32 scale per 128 + 64 bf16 rope values
        latent = cfg.kv_lora_rank + 4 * (cfg.kv_lora_rank // 128) + 2 * cfg.qk_rope_head_dim
        index = cfg.index_head_dim + 4 * (cfg.index_head_dim // 128)
    else:
        size = {"bf16": 2, "fp32": 4}[d.kv_cache_dtype]
        latent = size * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        index = size * cfg.index_head_dim
    p = plan(d)
    assert p.latent_bytes_per_token == latent * layers
    assert p.index_bytes_per_token == index * full
    assert p.kv_bytes_per_token_device == (latent * layers + index * full) / d.dcp
    rows = {r.component: r.bytes for r in p.rows}
    assert rows["latent cache"] == d.max_context * d.max_batch * latent * layers / d.dcp
    if name == "ascend-910c":  # GLM-5.2 numbers: 79 x 1152 B and 22 x 256 B
        assert (p.latent_bytes_per_token, p.index_bytes_per_token) == (79 * 1152, 22 * 256)
    if name == "nvidia-h200":
        assert (p.latent_bytes_per_token, p.index_bytes_per_token) == (79 * 656, 22 * 132)


def test_routed_expert_bytes_by_hand():
    """BF16 experts, no MTP: 75 MoE layers x 256 experts x 3 matrices x I x Hd x 2 B, split by EP16."""
    d = load_deployment(A3).replace(mtp_draft_tokens=0, **{"dtypes.weights": "bf16"})
    cfg = d.model_config()
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    expect = moe_layers * cfg.n_routed_experts * 3 * cfg.moe_intermediate_size * cfg.hidden_size * 2 / d.ep
    rows = {r.component: r.bytes for r in plan(d).rows}
    assert rows["routed experts"] == expect
    assert rows["MTP layer"] == 0
    # without EP the same bytes are split by TP instead
    no_ep = plan(d.replace(**{"parallel.ep": 1}))
    assert {r.component: r.bytes for r in no_ep.rows}["routed experts"] == expect * d.ep / d.tp


def test_largest_context_is_the_boundary():
    d = load_deployment("ascend-910b")
    n = plan(d).max_context_at_batch
    assert plan(d.replace(max_context=n)).fits
    assert not plan(d.replace(max_context=n + 1)).fits


def test_parameter_count_is_glm52():
    p = plan(load_deployment("nvidia-h200"))
    assert 740e9 < p.params_without_mtp < 745e9 and 750e9 < p.total_params < 756e9  # 743.4B / 753.3B


# ---- the command ----------------------------------------------------------------------------------
def test_plan_exit_status_and_json(tmp_path, capsys):
    assert plan_main([A3]) == 0
    assert "FITS" in capsys.readouterr().out
    bf16 = ["nvidia-h100", "--set", "dtypes.weights=bf16", "--set", "nodes=1", "--set", "parallel.dp=1",
            "--set", "parallel.ep=8", "--json", str(tmp_path / "p.json")]
    assert plan_main(bf16) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert json.loads((tmp_path / "p.json").read_text())["fits"] is False
    assert plan_main([A2, "--set", "dtypes.weights=fp8"]) == 2
    assert "'dtypes.weights'" in capsys.readouterr().err


def test_plan_all_markdown_has_every_config(tmp_path, capsys):
    out = tmp_path / "plan-all.md"
    assert plan_main(["--all", "--markdown", str(out)]) == 0  # every bundled config fits as shipped
    text = out.read_text()
    for name in bundled_configs():
        assert f"| {name} |" in text and f"### {name}" in text
    assert len(capsys.readouterr().out.splitlines()) == len(bundled_configs()) + 2


def test_dcp_step_buffers_count_the_per_token_block_table_a_step_holds():
    """The planner's DCP block-table bytes are those of a real step's `DcpStep` at the longest request's
    width; the DCP step buffers appear in the activations only with dcp > 1."""
    from glm52_backends.cache import PagedCache
    from glm52_backends.planner import dcp_block_table_bytes, dcp_step_bytes
    from glm52_backends.step import plan_step
    from glm52_backends.tiny import tiny_config
    cfg = tiny_config(layers=2, index_topk=8)[0]
    bs, T = 8, 45
    cache = PagedCache(cfg, 16, bs, dcp_size=2, dcp_rank=1)
    st = plan_step(cache, {0: list(range(T))}, vocab_size=cfg.vocab_size, max_positions=4096, device="cpu")
    held = st.dcp.block_table.numel() * st.dcp.block_table.element_size()
    assert held == dcp_block_table_bytes(T, T, bs) == T * 6 * 4
    d = load_deployment("ascend-910c-1m")
    assert dcp_step_bytes(cfg, d, 8192, 1 << 20, 1) == 0 < dcp_step_bytes(cfg, d, 8192, 1 << 20, d.dcp)
    from glm52_backends.model import DCP_MERGE_BYTES, dcp_merge_tokens, dcp_topk_bytes_per_token
    per = dcp_topk_bytes_per_token(16, 2048)                 # GLM-5.2 at dcp16: 2 MiB of candidates per token
    assert dcp_merge_tokens(per) == DCP_MERGE_BYTES // per == 128 and dcp_merge_tokens(10 ** 12) == 1
    assert "DCP step buffers" in plan(d).table()
