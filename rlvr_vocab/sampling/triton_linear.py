"""The decode step's projections for a few rows (M <= ``MAX_ROWS``), in Triton: o and down split over K, and the
MLP's gate/up GEMM with SiLU x up in one kernel.

At 32 rows cuBLAS runs the down projection as a split-K GEMM and a reduce kernel after it (5.3 + 1.7 us per layer
in 12-06 B's profile on an H100) and the o projection as a 5.4 us GEMM; their residual adds ride in the next
RMSNorm's kernel. Here one kernel computes ``out = residual + x @ W.T (+ bias)`` with

* split-K in the kernel: ``SPLIT_K`` programs per block of ``BLOCK_N`` output columns each walk a slice of K,
  store their fp32 partials, and the last of them to finish (an atomic counter) sums them in split order (the
  result does not depend on who finished last) and writes the output, so there is no reduce kernel;
* ``residual``: ``residual + out``, rounded as transformers' ``residual + h``.

The sampler runs o and down this way at up to ``MAX_ROWS`` rows (``FastSampler(linear=...)``): 1.70 against
1.73-1.74 ms per 32 x 512 decode step on an H100, twice side by side (12-06 D); o alone gained nothing (1.75
against 1.74). With ``sums=True`` the epilogue also stores each output row's sum of squares per column block, the
input of the folded RMSNorm after it (``norm_fold``).

``gated``: ``silu(x @ gate.T) * (x @ up.T)`` in one kernel (each program reads the same columns of the gate and
the up halves of the fused weight), with the folded post-attention norm's row scale (``norm_fold``) applied to each
half first: one kernel where cuBLAS's gate_up GEMM and ``norm_fold``'s SiLU x up kernel were two. On an H200 (12-06
J) 7.5 us against 8.0 for the two at 32 rows, and 1.41 against 1.43 ms per 32 x 512 decode step: ``linear="auto"``
runs o, down and gated here. The fused qkv GEMM can run here too (``linear="o+down+qkv"`` / ``"o+down+qkv+gated"``,
and gate_up as a plain GEMM in ``"all"``), but is no faster than cuBLAS: on an H100 (12-06 H) qkv took 6.2 us at its
best configuration against cuBLAS's 6.0, and on the H200 (12-06 J) the 32 x 512 step was 1.41 ms with and without
it. A Triton GEMM over every map with the RMSNorms fused in (12-03 P/Q) and SiLU x up as the down kernel's prologue
(12-06 A) were slower (BENCHMARKS.md).

Launched with programmatic dependent launch (the weights prefetched before waiting for the kernel before, and
the attention kernel in the chain) it was slower: 1.80 against 1.75 ms per 32 x 512 step with the o projection
alone (12-06 C/D), so it is launched plainly.

``reference`` is the maths in PyTorch ops, as transformers' layers compute it; ``check`` runs the kernel against
it before the sampler uses it. Importable without Triton; ``TRITON_INTERPRET=1`` (set before the first import)
runs the kernel on CPU tensors.
"""

from __future__ import annotations

import torch as th
import torch.nn.functional as F

from rlvr_vocab.sampling import norm_fold, triton_env
from rlvr_vocab.sampling.triton_env import tl, triton  # None without Triton

MAX_ROWS = 64  # above this many rows cuBLAS's tiles fill the GPU and the layers keep torch's ops
MAX_SPLIT = 8  # the most K splits a launch may use (the workspace is sized for it)
# gated's (BLOCK_N, BLOCK_K, num_warps, num_stages): the fastest of decode_parts' 54 at 32 rows on an H200 (12-06 J):
# 7.5 us against 8.0 for cuBLAS's gate_up GEMM and the SiLU x up kernel (the default before it, 4 warps: 9.0)
GATED_CONFIG = (16, 256, 2, 3)


def interpreted() -> bool:
    """Were this module's kernels built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)?"""
    return triton is not None and triton_env.interpreted(_linear_kernel)


if triton is not None:

    @triton.jit
    def _finish(acc, Bias, Res, Out, SS, pid, offs_m, offs_n, m_ok, n_ok, stride_rm, stride_om, stride_ss,
                HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, SS_OUT: tl.constexpr):  # fmt: skip
        """The epilogue: bias, the rounding to the dtype, the residual add, the store; with ``SS_OUT`` each row's
        sum of squares over this column block, ``SS[row, pid]`` (what a folded RMSNorm after it needs)."""
        dtype = Out.dtype.element_ty
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = acc.to(dtype)
        out_ok = m_ok[:, None] & n_ok[None, :]
        if RESIDUAL:
            res = tl.load(Res + offs_m[:, None] * stride_rm + offs_n[None, :], mask=out_ok, other=0.0)
            y = (res.to(tl.float32) + y.to(tl.float32)).to(dtype)
        tl.store(Out + offs_m[:, None] * stride_om + offs_n[None, :], y, mask=out_ok)
        if SS_OUT:
            yf = tl.where(out_ok, y.to(tl.float32), 0.0)
            tl.store(SS + offs_m * stride_ss + pid, tl.sum(yf * yf, 1), mask=m_ok)

    # ``M`` (the live rows) is not specialised on: compaction to one row would compile the kernel again mid-run
    @triton.jit(do_not_specialize=["M"])
    def _linear_kernel(
        X,
        W,
        Bias,
        Res,
        Out,
        SS,
        Counters,
        Work,
        M,
        N,
        K,
        K_SPLIT,
        stride_xm,
        stride_rm,
        stride_om,
        stride_ss,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        RESIDUAL: tl.constexpr,
        SS_OUT: tl.constexpr,
        PRECISION: tl.constexpr,
        PDL: tl.constexpr,
    ):
        if PDL:  # launched before the kernel that wrote x finished: wait for it
            tl.extra.cuda.gdc_wait()
        pid = tl.program_id(0)
        split = tl.program_id(1)
        n0 = pid * BLOCK_N
        k_lo = split * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        x_rows = X + offs_m[:, None] * stride_xm
        w_rows = W + offs_n[:, None] * K
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_ok = (k0 + offs_k) < k_hi
            x_ok = m_ok[:, None] & k_ok[None, :]
            x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=x_ok, other=0.0)
            w = tl.load(w_rows + (k0 + offs_k)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        if PDL:  # the weights are read: the next kernel may launch (it waits for this one to finish)
            tl.extra.cuda.gdc_launch_dependents()
        if SPLIT_K == 1:
            _finish(acc, Bias, Res, Out, SS, pid, offs_m, offs_n, m_ok, n_ok, stride_rm, stride_om, stride_ss,
                    HAS_BIAS, RESIDUAL, SS_OUT)  # fmt: skip
        else:  # split-K in one kernel: partials to the workspace; the column block's last program sums them
            tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
            size: tl.constexpr = BLOCK_M * BLOCK_N
            tl.store(Work + (pid * SPLIT_K + split) * size + tile, acc)
            done = tl.atomic_add(Counters + pid, 1, sem="acq_rel")  # releases the partials, acquires the others'
            if done == SPLIT_K - 1:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for i in tl.static_range(SPLIT_K):  # in split order: the sum does not depend on who finished last
                    acc += tl.load(Work + (pid * SPLIT_K + i) * size + tile, cache_modifier=".cg")
                tl.atomic_xchg(Counters + pid, 0)  # ready for the next launch
                _finish(acc, Bias, Res, Out, SS, pid, offs_m, offs_n, m_ok, n_ok, stride_rm, stride_om, stride_ss,
                    HAS_BIAS, RESIDUAL, SS_OUT)  # fmt: skip

    @triton.jit(do_not_specialize=["M", "ss_blocks"])
    def _gated_kernel(
        X,
        W,
        Bias,
        SS,
        Out,
        M,
        inter,
        K,
        stride_xm,
        stride_om,
        stride_ss,
        ss_blocks,
        hidden,
        eps,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_S: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        FOLD: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Program ``pid``: columns ``[pid * BLOCK_N, +BLOCK_N)`` of ``silu(x @ gate.T) * (x @ up.T)``, reading those
        rows of the gate half of ``W`` and of its up half (``W``: [2 * inter, K], gate rows then up rows)."""
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < inter
        x_rows = X + offs_m[:, None] * stride_xm
        g_rows = W + offs_n[:, None] * K
        u_rows = W + (inter + offs_n)[:, None] * K
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = (k0 + offs_k) < K
            x = tl.load(x_rows + (k0 + offs_k)[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w_ok = n_ok[:, None] & k_ok[None, :]
            w_g = tl.load(g_rows + (k0 + offs_k)[None, :], mask=w_ok, other=0.0)
            w_u = tl.load(u_rows + (k0 + offs_k)[None, :], mask=w_ok, other=0.0)
            acc_g = tl.dot(x, tl.trans(w_g), acc_g, input_precision=PRECISION)
            acc_u = tl.dot(x, tl.trans(w_u), acc_u, input_precision=PRECISION)
        dtype = Out.dtype.element_ty
        if FOLD:  # the GEMM's output rounded, times the row's norm scale (+ the bias), rounded: norm_fold.scaled
            r = norm_fold.row_scales(SS, offs_m, m_ok, stride_ss, ss_blocks, hidden, eps, BLOCK_S)
            gate = norm_fold.scaled_tile(acc_g.to(dtype), r, Bias + offs_n[None, :], n_ok[None, :], HAS_BIAS)
            up = norm_fold.scaled_tile(acc_u.to(dtype), r, Bias + inter + offs_n[None, :], n_ok[None, :], HAS_BIAS)
        else:  # F.linear's output: the bias added in fp32, one rounding
            if HAS_BIAS:
                acc_g += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                acc_u += tl.load(Bias + inter + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            gate, up = acc_g.to(dtype), acc_u.to(dtype)
        out_ok = m_ok[:, None] & n_ok[None, :]
        tl.store(Out + offs_m[:, None] * stride_om + offs_n[None, :], norm_fold.silu_times(gate, up), mask=out_ok)


def block_config(n: int, k: int, sms: int = 132) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K) for an [n, k] weight (n: output columns) at a few rows.

    From ``bench.decode_parts --parts linear`` at 32 rows on the H200 (12-03 Q, BENCHMARKS.md): 16-column blocks
    and 256-wide K steps, with K split so that the programs are about two per SM (o: 5.2 us, down: 6.4 us, against
    cuBLAS's 5.5 and 7.5 with its split-K reduce kernel; 12-06 A on an H100: o 5.1-5.4 us at this choice).

    Example:
        >>> block_config(1024, 2048), block_config(1024, 3072), block_config(8192, 1024)
        ((16, 256, 4, 3, 4), (16, 256, 4, 3, 4), (32, 256, 4, 3, 1))
    """
    block_n = 16 if n <= 2048 else 32
    block_k = 256
    blocks = -(-n // block_n)
    split_k = 1 if 2 * blocks >= sms else max(1, min(4, 2 * sms // blocks, k // block_k))
    return block_n, block_k, 4, 3, split_k


def ss_blocks(n: int, k: int) -> int:
    """The column blocks of ``linear``'s launch for an [n, k] weight: the second dim of its ``ss`` output."""
    return -(-n // block_config(n, k)[0])


def workspace(device: th.device, max_columns: int) -> tuple[th.Tensor, th.Tensor]:
    """(counters, partials) for split-K launches of up to ``max_columns`` output columns, ``MAX_ROWS`` rows and
    ``MAX_SPLIT`` splits: int32 zeros (each launch leaves them zero again) and fp32 partial sums. One pair serves
    every launch of a stream in turn."""
    counters = th.zeros(-(-max_columns // 16), dtype=th.int32, device=device)
    return counters, th.empty((max_columns + 64) * MAX_SPLIT * MAX_ROWS, dtype=th.float32, device=device)


def linear(
    x: th.Tensor,
    weight: th.Tensor,
    bias: th.Tensor | None = None,
    residual: th.Tensor | None = None,
    config: tuple[int, int, int, int, int] | None = None,
    work: tuple[th.Tensor, th.Tensor] | None = None,
    ss: th.Tensor | None = None,
    pdl: bool = False,
) -> th.Tensor:
    """The kernel: ``x`` [M, K] (last dim contiguous), ``weight`` [N, K] contiguous -> [M, N].

    ``residual`` [M, N]: add it last; ``config``: ``block_config``'s tuple (None: that function's choice); ``work``:
    ``workspace``'s pair for split-K (None: made for this call); ``ss``: fp32 [M, column blocks] (``ss_blocks``),
    filled with each output row's sum of squares per block of ``BLOCK_N`` columns (of the rounded output: what
    transformers' RMSNorm of it sums), for ``norm_fold``; ``pdl``: launch with programmatic dependent launch
    (Hopper and newer): wait for the kernel before at the start, let the next launch after the loop over K.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    m = x.shape[0]
    n, k = weight.shape
    if m > MAX_ROWS or x.stride(-1) != 1 or not weight.is_contiguous() or x.shape[1] != k:
        raise ValueError(
            f"triton_linear.linear: x [{m}, {x.shape[1]}] needs <= {MAX_ROWS} rows, a contiguous last dim and "
            f"{k} columns for a contiguous [N, {k}] weight"
        )
    block_n, block_k, warps, stages, split_k = config or block_config(n, k)
    block_m = max(16, triton.next_power_of_2(m))
    blocks = triton.cdiv(n, block_n)
    k_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_split)
    if split_k > 1:
        counters, partials = work if work is not None else workspace(x.device, n)
        if split_k > MAX_SPLIT or counters.numel() < blocks or partials.numel() < blocks * split_k * block_m * block_n:
            raise ValueError("triton_linear.linear: the split-K workspace is too small for this launch")
    else:
        counters = partials = weight  # unused
    out = x.new_empty(m, n)
    if ss is not None and not (ss.dtype == th.float32 and ss.shape == (m, blocks) and ss.is_contiguous()):
        raise ValueError(f"triton_linear.linear: ss must be a contiguous fp32 [{m}, {blocks}]")
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    _linear_kernel[(blocks, split_k)](
        x,
        weight,
        bias if bias is not None else weight,
        residual if residual is not None else out,
        out,
        ss if ss is not None else out,
        counters,
        partials,
        m,
        n,
        k,
        k_split,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        blocks,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        HAS_BIAS=bias is not None,
        RESIDUAL=residual is not None,
        SS_OUT=ss is not None,
        PRECISION="ieee" if x.dtype == th.float32 else "tf32",
        PDL=pdl,
        num_warps=warps,
        num_stages=stages,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out


def gated(
    x: th.Tensor,
    weight: th.Tensor,
    bias: th.Tensor | None = None,
    ss: th.Tensor | None = None,
    hidden: int = 1,
    eps: float = 0.0,
    config: tuple[int, int, int, int] | None = None,
) -> th.Tensor:
    """The MLP's gate/up GEMM and SiLU x up in one kernel: ``x`` [M, K] (last dim contiguous), ``weight`` [2I, K]
    contiguous (gate rows, then up rows) -> ``silu(gate) * up`` [M, I].

    ``bias`` [2I] (or None); ``ss``: None (``x`` is normed: ``F.linear``'s roundings), or fp32 [M, S], the rows' sums
    of squares in S parts, when the RMSNorm before is folded into ``weight`` (``norm_fold``): each half is rounded,
    scaled by ``rsqrt(sum(ss) / hidden + eps)`` (the bias added after it) and rounded, as ``norm_fold.silu_mul``;
    ``config``: (BLOCK_N, BLOCK_K, num_warps, num_stages) (None: ``GATED_CONFIG``).
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    m, k = x.shape
    two_i = weight.shape[0]
    if m > MAX_ROWS or x.stride(-1) != 1 or not weight.is_contiguous() or weight.shape[1] != k or two_i % 2:
        raise ValueError(
            f"triton_linear.gated: x [{m}, {k}] needs <= {MAX_ROWS} rows and a contiguous last dim, the weight a "
            f"contiguous [2I, {k}]"
        )
    if ss is not None and not (ss.dtype == th.float32 and ss.shape[0] == m and ss.stride(-1) == 1):
        raise ValueError(f"triton_linear.gated: ss must be fp32 [{m}, S] with a contiguous last dim")
    if bias is not None and not (bias.is_contiguous() and bias.numel() == two_i):
        raise ValueError(f"triton_linear.gated: bias must be a contiguous [{two_i}]")
    inter = two_i // 2
    block_n, block_k, warps, stages = config or GATED_CONFIG
    out = x.new_empty(m, inter)
    _gated_kernel[(triton.cdiv(inter, block_n),)](
        x,
        weight,
        bias if bias is not None else weight,
        ss if ss is not None else out,
        out,
        m,
        inter,
        k,
        x.stride(0),
        out.stride(0),
        ss.stride(0) if ss is not None else 0,
        ss.shape[1] if ss is not None else 1,
        float(hidden),
        float(eps),
        BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_S=triton.next_power_of_2(ss.shape[1]) if ss is not None else 1,
        HAS_BIAS=bias is not None,
        FOLD=ss is not None,
        PRECISION="ieee" if x.dtype == th.float32 else "tf32",
        num_warps=warps,
        num_stages=stages,
    )
    return out


def gated_reference(
    x: th.Tensor,
    weight: th.Tensor,
    bias: th.Tensor | None = None,
    ss: th.Tensor | None = None,
    hidden: int = 1,
    eps: float = 0.0,
) -> th.Tensor:
    """``gated``'s maths in PyTorch ops: transformers' ``act_fn(gate_proj(x)) * up_proj(x)``, or with ``ss`` the
    folded form (``norm_fold.silu_mul_reference`` of the folded GEMM's output)."""
    if ss is not None:
        return norm_fold.silu_mul_reference(F.linear(x, weight), ss, hidden, eps, bias)
    gate, up = F.linear(x, weight, bias).chunk(2, dim=-1)
    return F.silu(gate) * up


def reference(
    x: th.Tensor,
    weight: th.Tensor,
    bias: th.Tensor | None = None,
    residual: th.Tensor | None = None,
) -> th.Tensor:
    """``linear``'s maths in PyTorch ops, as transformers' ``nn.Linear`` and residual add compute it."""
    y = F.linear(x, weight, bias)
    return y if residual is None else residual + y


@th.library.custom_op("rlvr_vocab::small_linear", mutates_args=("counters", "partials"))
def _small_linear_op(
    x: th.Tensor,
    weight: th.Tensor,
    bias: th.Tensor | None,
    residual: th.Tensor | None,
    counters: th.Tensor,
    partials: th.Tensor,
    sums: bool,
    pdl: bool = False,
) -> tuple[th.Tensor, th.Tensor]:
    """The op behind ``small_linear`` (opaque to ``torch.compile``, like the decode attention op): (out, ss), ss
    [M, 0] unless ``sums``."""
    n, k = weight.shape
    ss = x.new_empty((x.shape[0], ss_blocks(n, k) if sums else 0), dtype=th.float32)
    out = linear(x, weight, bias, residual=residual, work=(counters, partials), ss=ss if sums else None, pdl=pdl)
    return out, ss


@_small_linear_op.register_fake
def _(x, weight, bias, residual, counters, partials, sums, pdl=False):
    n, k = weight.shape
    return x.new_empty(x.shape[0], n), x.new_empty((x.shape[0], ss_blocks(n, k) if sums else 0), dtype=th.float32)


def small_linear(
    x: th.Tensor,
    weight: th.Tensor,
    bias: th.Tensor | None = None,
    residual: th.Tensor | None = None,
    work: tuple[th.Tensor, th.Tensor] | None = None,
    sums: bool = False,
    pdl: bool = False,
):
    """``linear`` as a custom op, for the compiled decode step (arguments as ``linear``; ``work`` required).

    Returns the output, or with ``sums`` (output, ss): ss fp32 [M, ``ss_blocks``], the output rows' sums of squares
    per column block (``norm_fold``'s input); ``pdl``: as ``linear``'s."""
    counters, partials = work
    out, ss = _small_linear_op(x, weight, bias, residual, counters, partials, sums, pdl)
    return (out, ss) if sums else out


@th.library.custom_op("rlvr_vocab::small_gated", mutates_args=())
def _small_gated_op(
    x: th.Tensor, weight: th.Tensor, bias: th.Tensor | None, ss: th.Tensor | None, hidden: int, eps: float
) -> th.Tensor:
    """The op behind ``small_gated`` (opaque to ``torch.compile``: one kernel)."""
    return gated(x, weight, bias, ss, hidden, eps)


@_small_gated_op.register_fake
def _(x, weight, bias, ss, hidden, eps):
    return x.new_empty(x.shape[0], weight.shape[0] // 2)


def small_gated(
    x: th.Tensor,
    weight: th.Tensor,
    bias: th.Tensor | None = None,
    ss: th.Tensor | None = None,
    hidden: int = 1,
    eps: float = 0.0,
) -> th.Tensor:
    """``gated`` as a custom op, for the compiled decode step (arguments as ``gated``)."""
    return _small_gated_op(x, weight, bias, ss, hidden, float(eps))


def check(dtype: th.dtype, device: th.device) -> str | None:
    """Run the kernel against ``reference`` on random inputs: None if it agrees, else why not.

    The form the fused layers use (the residual, with and without a bias, and the sums of squares of the output per
    column block), 5 and 33 rows, a K that is not a multiple of the block, one program per column block and K split
    in three; the tolerance is the dtype's (fp32 1e-4, 16-bit 2e-2, relative to the largest output).
    """
    if triton is None:
        return "Triton is not installed"
    gen = th.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (th.randn(*shape, generator=gen, device=device, dtype=th.float32) * scale).to(dtype)

    k, n = 200, 96
    tolerance = 1e-4 if dtype == th.float32 else 2e-2
    for m in (5, 33):
        x, w = rand(m, k), rand(n, k, scale=k**-0.5)
        bias, res = rand(n), rand(m, n)
        cases = {
            "residual": ((x, w), {"residual": res}),
            "bias and residual": ((x, w, bias), {"residual": res}),
        }
        config = None if m == 5 else (16, 64, 4, 3, 3)  # 33 rows: K split in three (the last program sums)
        for what, (args, kwargs) in cases.items():
            ss = th.full((m, ss_blocks(n, k)), float("nan"), device=device)  # 16-column blocks, as config's
            try:
                got = linear(*args, **kwargs, config=config, ss=ss).float()
            except Exception as err:  # noqa: BLE001 - a compile or launch failure is the answer
                return triton_env.error_line(err)
            want = reference(*args, **kwargs).float()
            error = triton_env.relative_error(got, want)
            if not error <= tolerance:  # also catches NaN
                return f"relative error {error:.2e} against the PyTorch maths ({what}, {m} rows)"
            sums = got.reshape(m, -1, 16).pow(2).sum(-1)
            if not triton_env.relative_error(ss, sums) <= 1e-4:
                return f"the sums of squares of the output are wrong ({what}, {m} rows)"
        # gated: the MLP's gate/up GEMM with SiLU x up, plain and with the norm folded (sums in three parts)
        w2, bias2 = rand(2 * n, k, scale=k**-0.5), rand(2 * n)
        ss = th.stack([p.float().pow(2).sum(-1) for p in x.float().chunk(3, dim=-1)], -1).contiguous()
        for what, kwargs in {"gated": {"bias": bias2}, "gated, folded": {"ss": ss, "hidden": k, "eps": 1e-6}}.items():
            try:
                got = gated(x, w2, **kwargs).float()
            except Exception as err:  # noqa: BLE001 - a compile or launch failure is the answer
                return triton_env.error_line(err)
            error = triton_env.relative_error(got, gated_reference(x, w2, **kwargs).float())
            if not error <= tolerance:
                return f"relative error {error:.2e} against the PyTorch maths ({what}, {m} rows)"
    return None
