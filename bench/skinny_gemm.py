"""A measured dead end, kept to reproduce it: skinny Triton GEMMs for the decode step (``x @ W.T``, M <= 64).

12-03 D on the H200 (BENCHMARKS.md): at M = 32 the best configuration of each map took qkv 5.3, o 4.9, gate_up
with SiLU x up 7.7, down 6.8 us against cuBLAS's 5.2, 5.4, 6.1 (+1.3 for the SiLU kernel), 7.5: 3% off a layer's
GEMMs with a per-map tuned config, and the whole 32 x 512 decode step was 5% slower with one default config (1.97
against 1.88 ms). A GEMM of this size costs ~5 us whatever its grid; the sampler keeps cuBLAS.
``bench.decode_parts --parts gemm`` times them. The design that was tried:

At a few dozen rows a decode-step GEMM reads its weight and does little else, so its time is the weight's bytes
over the bandwidth its grid reaches plus a fixed ramp. cuBLAS picks 64-column tiles for these shapes (the
profile's ``nvjet_sm90_tst_64x32_...``): 64 CTAs for the [4,096, 1,024] Q/K/V weight on 132 SMs. Here the grid
is ``ceil(N / BLOCK_N)`` programs of ``BLOCK_N`` output columns (32 by default: 128 programs for Q/K/V), each
walking K in ``BLOCK_K`` steps through a ``NUM_STAGES``-deep pipeline, and

* ``linear(x, w, bias)``: ``x @ w.T + bias``;
* ``silu_mul(x, w)``: ``w`` is the fused [gate; up] weight [2I, K]; each program computes its columns of both
  halves and writes ``silu(gate) * up`` [M, I]: the MLP's activation without a kernel (or a [M, 2I]
  intermediate) of its own.

fp32 accumulation; the output in ``x``'s dtype (the activation is applied to the rounded GEMM outputs, as the
eager layer rounds them). Importable without Triton.
"""

from __future__ import annotations

import torch as th

from rlvr_vocab.sampling import triton_env
from rlvr_vocab.sampling.triton_env import tl, triton  # None without Triton

MAX_ROWS = 64  # the kernels serve batches up to this many rows (above it cuBLAS's tiles fill the GPU)
BLOCK_N = 32
BLOCK_K = 128
NUM_WARPS = 4
NUM_STAGES = 4


def interpreted() -> bool:
    """Were this module's kernels built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)?"""
    return triton is not None and triton_env.interpreted(_gemm_kernel)


if triton is not None:

    @triton.jit
    def _gemm_kernel(
        X,
        W,
        Bias,
        Out,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        HALF,
        HAS_BIAS: tl.constexpr,
        SILU_MUL: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            x = tl.load(
                X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0
            )
            w = tl.load(
                W + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0
            )
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
            if SILU_MUL:
                u = tl.load(
                    W + (HALF + offs_n)[:, None] * stride_wn + (k0 + offs_k)[None, :],
                    mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                acc_up = tl.dot(x, tl.trans(u), acc_up, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = acc.to(Out.dtype.element_ty)
        if SILU_MUL:
            gate = out.to(tl.float32)
            up = acc_up.to(Out.dtype.element_ty)
            out = ((gate / (1.0 + tl.exp(-gate))).to(Out.dtype.element_ty) * up).to(Out.dtype.element_ty)
        tl.store(Out + offs_m[:, None] * stride_om + offs_n[None, :], out, mask=m_ok[:, None] & n_ok[None, :])


def _launch(x, w, bias, n_out, silu_mul, block_n, block_k, num_warps, num_stages):
    if triton is None:
        raise RuntimeError("Triton is not installed")
    m, k = x.shape
    if m > MAX_ROWS:
        raise ValueError(f"skinny_gemm serves at most {MAX_ROWS} rows, got {m}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("skinny_gemm wants the last dimension of x and w contiguous")
    out = x.new_empty(m, n_out)
    if m == 0:
        return out
    _gemm_kernel[(triton.cdiv(n_out, block_n),)](
        x,
        w,
        bias if bias is not None else w,
        out,
        m,
        n_out,
        k,
        x.stride(0),
        w.stride(0),
        out.stride(0),
        n_out,
        HAS_BIAS=bias is not None,
        SILU_MUL=silu_mul,
        BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRECISION="ieee" if x.dtype == th.float32 else "tf32",  # fp32 exact; tf32 is ignored for 16-bit inputs
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def linear(
    x: th.Tensor,
    w: th.Tensor,
    bias: th.Tensor | None = None,
    block_n: int = BLOCK_N,
    block_k: int = BLOCK_K,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> th.Tensor:
    """``x @ w.T + bias``: x [M, K] (M <= ``MAX_ROWS``), w [N, K], bias [N] or None -> [M, N]."""
    return _launch(x, w, bias, w.shape[0], False, block_n, block_k, num_warps, num_stages)


def silu_mul(
    x: th.Tensor,
    w: th.Tensor,
    block_n: int = BLOCK_N,
    block_k: int = BLOCK_K,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> th.Tensor:
    """``silu(x @ gate.T) * (x @ up.T)`` for ``w = [gate; up]`` [2I, K] (no biases) -> [M, I]."""
    return _launch(x, w, None, w.shape[0] // 2, True, block_n, block_k, num_warps, num_stages)
