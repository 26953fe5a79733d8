"""What the per-op benchmarks share: the model dimensions, the planned `Case`, the run's `Env`, the
compulsory-traffic arithmetic and the input builders (paged caches, decode steps, block-FP8 weights).

Each op's benchmark is `benchmarks/ops/<op>.py`: its planned cases (`plan_*`: shapes, bytes, flops,
targets) and its calls (`inputs_*`: the backend's, the baseline's and the reference's);
`benchmarks/ops_bench.py` (`glm52 bench`) times them against floors measured in the run.
"""

from __future__ import annotations

from dataclasses import dataclass

from glm52_backends.config import GLM52_CONFIG

F32 = 4


@dataclass(frozen=True)
class Dims:
    """Model dimensions the cases use: GLM-5.2's (spec/glm52-model.md section 1) or scaled down."""
    HI: int      # indexer heads
    DI: int      # indexer head dim
    TOPK: int    # indexer top-k
    H: int       # attention heads
    DL: int      # latent (kv_lora_rank)
    DR: int      # rope dims
    DN: int      # qk nope head dim
    DV: int      # v head dim
    QL: int      # q_lora_rank
    E: int       # routed experts
    K: int       # experts per token
    HD: int      # hidden
    I: int       # expert width  # noqa: E741
    V: int       # vocabulary
    BS: int      # paged-cache block (tokens)


    @classmethod
    def of(cls, cfg, block_size: int) -> "Dims":
        """The dimensions of a `ModelConfig`, with a paged-cache block of `block_size` tokens."""
        return cls(HI=cfg.index_n_heads, DI=cfg.index_head_dim, TOPK=cfg.index_topk, H=cfg.num_attention_heads,
                   DL=cfg.kv_lora_rank, DR=cfg.qk_rope_head_dim, DN=cfg.qk_nope_head_dim, DV=cfg.v_head_dim,
                   QL=cfg.q_lora_rank, E=cfg.n_routed_experts, K=cfg.num_experts_per_tok, HD=cfg.hidden_size,
                   I=cfg.moe_intermediate_size, V=cfg.vocab_size, BS=block_size)


FULL = Dims.of(GLM52_CONFIG, block_size=64)
# odd where the kernels must not care (vocabulary, lengths below): a run in seconds on a CPU
SMALL = Dims(HI=4, DI=32, TOPK=64, H=8, DL=64, DR=16, DN=24, DV=32, QL=64, E=16, K=4, HD=128, I=64, V=1001,
             BS=16)

# the GLM-5.2 dimensions by their old names (tests and readers use them)
HI, DI, TOPK, H, DL, DR = FULL.HI, FULL.DI, FULL.TOPK, FULL.H, FULL.DL, FULL.DR
E, K, HD, I, V, BLOCK_SIZE = FULL.E, FULL.K, FULL.HD, FULL.I, FULL.V, FULL.BS  # noqa: E741


@dataclass
class Case:
    op: str            # the benchmark's name: an op name (indexer_topk, sparse_mla, moe_experts, mtp_verify),
    shape: str         # linear_fp8 / moe_experts_fp8 (the op on block-FP8 weights), or e2e
    params: dict
    bytes: float
    flops: float
    graph: bool        # decode size: timed under a CUDA graph (on CUDA)
    target: str        # from the issue; "" if none (always "" with --small)


def expected_experts(T: int, e: int = E, k: int = K) -> float:
    """Distinct experts touched by T tokens routed uniformly: e * (1 - (1 - k/e)^T)."""
    return e * (1.0 - (1.0 - k / e) ** T)


def fp8_weight_bytes(N: int, K: int, block: tuple[int, int] = (128, 128)) -> int:
    """Bytes of one block-FP8 weight [N, K]: the e4m3 codes and the f32 scale of each block."""
    return N * K + 4 * (-(-N // block[0])) * (-(-K // block[1]))


@dataclass
class Env:
    """What the cases build their inputs with."""
    torch: object
    device: object
    dtype: object
    d: Dims


def paged(env: Env, B: int, L: int, widths: tuple[int, ...]):
    """One block table [B, nb] over a shuffled pool, and a paged cache [NB, BS, w] per width."""
    torch = env.torch
    nb = B * (-(-L // env.d.BS))
    bt = torch.randperm(nb, device=env.device).view(B, -1).to(torch.int32)
    caches = [torch.randn(nb, env.d.BS, w, dtype=env.dtype, device=env.device) for w in widths]
    return bt, caches


def decode_step(env: Env, B: int, L: int, q_len: int = 1):
    """cu_seqlens_q and seq_lens of B requests of length L with q_len new tokens each, on the device."""
    torch = env.torch
    cu = torch.arange(B + 1, dtype=torch.int32, device=env.device) * q_len
    lens = torch.full((B,), L, dtype=torch.int32, device=env.device)
    return cu, lens


def fp8_weight(env: Env, *shape: int):
    """A random block-FP8 `Weight` [*lead, N, K] on the device (codes ~ N(0, 1) in e4m3, scales
    around K^-0.5 per 128x128 block: values of a K^-0.5-scaled weight), without a host round trip."""
    from glm52_backends.weights import Weight
    torch = env.torch
    *lead, N, K = shape
    codes = torch.randn(*shape, device=env.device).to(torch.float8_e4m3fn)
    scales = (torch.rand(*lead, -(-N // 128), -(-K // 128), device=env.device) + 0.5) * K ** -0.5
    return Weight(codes, scales, "fp8_block")


def dequantized(env: Env, w):
    """An FP8 `Weight` as a dense tensor in the benchmark dtype (experts one at a time: no
    float32 copy of all of them)."""
    from glm52_backends.weights import select
    if w.data.dim() == 2:
        return w.dense(env.dtype)
    out = env.torch.empty(w.data.shape, dtype=env.dtype, device=env.device)
    for e in range(w.data.shape[0]):
        out[e] = select(w, e).dense(env.dtype)
    return out


def scaled_mm_alone(env: Env, x, w):
    """torch._scaled_mm on x quantized beforehand (1x128 scales, outer-dim-major) and the weight's
    128x128 scales; None where it cannot run here."""
    torch = env.torch
    if env.device.type != "cuda" or not hasattr(torch, "_scaled_mm") or env.dtype != torch.bfloat16:
        return None
    from glm52_backends.quant import quantize_fp8_groups
    q, s = quantize_fp8_groups(x, 128)
    s = s.t().contiguous().t()

    def run():
        return torch._scaled_mm(q, w.data.t(), s, w.scales.t(), out_dtype=torch.bfloat16)
    try:
        run()
    except Exception:  # noqa: BLE001 - torch < 2.10, not sm_90, CUDA < 12.9: the dense GEMM instead
        return None
    return run



def routed_moe(be, ref, logits, bias, K, x, w13, w2):
    """(ours, reference): routing (GLM-5.2's: one group, renormalised, scale 2.5) + the routed experts."""
    def run(ops):
        def call():
            i, w_ = ops.moe_route(logits, bias, K, 1, 1, True, 2.5)
            return ops.moe_experts(x, w13, w2, i, w_)
        return call
    return run(be), run(ref)
