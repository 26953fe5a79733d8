"""`glm52 bench`: the plan (no GPU needed), the roofline arithmetic, and the no-GPU error."""

import json

import pytest
import torch

from glm52_backends.bench import E, K, bench_main, expected_experts, floor_s, plan
from glm52_backends.cli import main


def test_plan_covers_every_target_of_the_issue():
    cases = plan()
    shapes = {(c.op, c.shape) for c in cases}
    for op, shape in [("indexer_topk", "decode B=32 L=32768"), ("indexer_topk", "decode B=8 L=131072"),
                      ("indexer_topk", "decode B=1 L=131072"), ("indexer_topk", "prefill S=8192"),
                      ("sparse_mla", "decode B=32 L=32768"), ("sparse_mla", "decode B=128 L=32768"),
                      ("sparse_mla", "decode B=1 L=131072"), ("mtp_verify", "greedy B=64 k=3 V=154880"),
                      ("mtp_verify", "greedy B=1 k=3 V=154880")]:
        assert (op, shape) in shapes
    assert [c.params["T"] for c in cases if c.op == "moe"] == [1, 16, 128, 4096]
    assert sum(c.op == "e2e" for c in cases) == 2
    # decode sizes under CUDA graphs, prefill-size cases not
    assert all(c.graph for c in cases if "decode" in c.shape)
    assert not any(c.graph for c in cases if "prefill" in c.shape or c.shape.startswith("T=4096"))


def test_plan_bytes_and_flops_follow_the_shapes():
    by = {(c.op, c.shape): c for c in plan()}
    c = by[("indexer_topk", "decode B=8 L=131072")]
    assert c.flops == 2 * 8 * 131072 * 32 * 128                     # 32 heads x 128 per cached key
    assert c.bytes >= 8 * 131072 * 128 * 2                          # bf16 keys read once
    m = by[("sparse_mla", "decode B=32 L=32768")]
    assert m.flops == 2 * 32 * 64 * 2048 * (576 + 512)
    assert 32 * 2048 * 576 * 2 <= m.bytes < 1.1 * 32 * 2048 * 576 * 2
    moe1 = next(c for c in plan({"moe"}) if c.params["T"] == 1)
    assert moe1.bytes == pytest.approx(8 * 3 * 6144 * 2048 * 2, rel=0.01)   # 8 experts streamed
    assert [c.op for c in plan({"mtp_verify"})] == ["mtp_verify"] * 2


def test_expected_experts_and_floor():
    assert expected_experts(1) == pytest.approx(K)
    assert expected_experts(10 ** 5) == pytest.approx(E)
    assert expected_experts(16) < 16 * K
    assert floor_s(3e9, 1e12, 3e12, 1e15) == pytest.approx(1e-3)    # both equal: 1 ms
    assert floor_s(6e9, 1e12, 3e12, 1e15) == pytest.approx(2e-3)    # bandwidth-bound
    assert floor_s(1e9, 5e12, 3e12, 1e15) == pytest.approx(5e-3)    # compute-bound
    with pytest.raises(ValueError):
        floor_s(1, 1, 0, 1)


def test_list_prints_and_writes_the_plan(tmp_path, capsys):
    path = tmp_path / "plan.json"
    assert main(["bench", "--list", "--ops", "moe,mtp_verify", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "moe" in out and "T=4096" in out and "mtp_verify" in out and "indexer_topk" not in out
    data = json.loads(path.read_text())
    assert [r["op"] for r in data["plan"]] == ["moe"] * 4 + ["mtp_verify"] * 2


def test_bad_arguments(capsys):
    assert bench_main(["--ops", "attention"]) == 2
    assert "unknown --ops attention" in capsys.readouterr().err
    assert bench_main(["--reps", "0"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_gpu_it_says_so(capsys):
    assert bench_main(["--backend", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--list" in err
