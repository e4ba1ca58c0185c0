"""A decoder layer's two RMSNorms folded into the projections after them (``FastSampler(fold=...)``).

At a few dozen rows a decode step costs per kernel more than per byte, and each RMSNorm is a kernel of its own
(2 of the 8 per layer there were; ~1.6 us each plus its launch gap on an H200, BENCHMARKS.md's profiles). The norm is a
per-row scale and a per-column weight, and both commute with the projection after it:

    RMSNorm(x) @ W.T = r * (x @ (W * w).T),   r = rsqrt(sum(x^2) / hidden + eps) per row, w the norm's weight

so ``fused.FusedWeights(fold=True)`` holds ``W * w`` for qkv and gate_up (refreshed per call with the rest), the
GEMM reads the raw residual stream, and ``r`` is applied by the kernel that reads the GEMM's output:

* the input norm: the decode attention kernel scales the loaded q / k / v rows (and adds the qkv bias) before
  its q/k norm and RoPE (``triton_decode``, ``fold=``);
* the post-attention norm: ``silu_mul`` computes ``silu(r * gate) * (r * up)`` (the same one kernel as the
  unfolded layer's SiLU x up), or ``triton_linear.gated`` in the gate/up GEMM's epilogue (``scaled_tile``,
  ``row_scales`` and ``silu_times`` are the maths both kernels share).

The sums of squares come from the kernel that wrote the residual stream: ``triton_linear``'s o and down kernels
store them per column block in their epilogue (``sums=True``), so no kernel reads a row twice; the first layer
(whose input is the embedding) and the PyTorch paths sum them in PyTorch. Two kernels per layer fewer.

The roundings differ from transformers' order: ``W * w`` is rounded to the dtype once, and ``x * r`` is not
rounded before the GEMM (transformers rounds ``x * r`` and then ``w * (x * r)``); the folded GEMM's output is
rounded, scaled and rounded again. ``bench.check_sampler`` measures what that does to the log-probs.
"""

from __future__ import annotations

import torch as th
import torch.nn.functional as F

from rlvr_vocab.sampling import triton_env
from rlvr_vocab.sampling.triton_env import tl, triton  # None without Triton

BLOCK = 512  # activation columns per program of the SiLU x up kernel
IMPLEMENTATIONS = ("triton", "torch")


def interpreted() -> bool:
    """Were this module's kernels built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)?"""
    return triton is not None and triton_env.interpreted(_silu_mul_kernel)


if triton is not None:

    @triton.jit
    def scaled_tile(x, r, bias_ptrs, ok, HAS_BIAS: tl.constexpr):
        """The folded GEMM's output ``x`` times the row scale ``r`` (plus the bias), rounded to the dtype."""
        y = x.to(tl.float32) * r
        if HAS_BIAS:
            y += tl.load(bias_ptrs, mask=ok, other=0.0).to(tl.float32)
        return y.to(x.dtype)

    @triton.jit
    def silu_times(gate, up):
        """``silu(gate) * up`` in torch's roundings: the SiLU in fp32 rounded to the dtype, then the product rounded."""
        g = gate.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
        return (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)

    @triton.jit
    def row_scales(SS, rows, rows_ok, stride_sm, ss_blocks, hidden, eps, BLOCK_S: tl.constexpr):
        """``rsqrt(sum(ss[row]) / hidden + eps)`` for the rows ``rows`` ([R]): the folded norm's scale, fp32 [R, 1]."""
        offs_s = tl.arange(0, BLOCK_S)
        ok = rows_ok[:, None] & (offs_s < ss_blocks)[None, :]
        sums = tl.load(SS + rows[:, None] * stride_sm + offs_s[None, :], mask=ok, other=0.0)
        return tl.rsqrt(tl.sum(sums, 1) / hidden + eps)[:, None]

    @triton.jit(do_not_specialize=["ss_blocks"])
    def _silu_mul_kernel(
        GU,
        SS,
        Bias,
        Out,
        inter,
        ss_blocks,
        stride_gm,
        stride_sm,
        stride_om,
        hidden,
        eps,
        BLOCK: tl.constexpr,
        BLOCK_S: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        PDL: tl.constexpr,
    ):
        if PDL:  # launched before the GEMM that wrote gate_up finished: wait for it
            tl.extra.cuda.gdc_wait()
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < inter
        offs_s = tl.arange(0, BLOCK_S)
        sums = tl.load(SS + row * stride_sm + offs_s, mask=offs_s < ss_blocks, other=0.0)
        r = tl.rsqrt(tl.sum(sums, 0) / hidden + eps)
        gate = tl.load(GU + row * stride_gm + offs, mask=ok, other=0.0)
        up = tl.load(GU + row * stride_gm + inter + offs, mask=ok, other=0.0)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        gate = scaled_tile(gate, r, Bias + offs, ok, HAS_BIAS)
        up = scaled_tile(up, r, Bias + inter + offs, ok, HAS_BIAS)
        tl.store(Out + row * stride_om + offs, silu_times(gate, up), mask=ok)


def sums_of_squares(x: th.Tensor) -> th.Tensor:
    """fp32 [M, 1]: each row's sum of squares, as transformers' RMSNorm sums them (the PyTorch paths' ``ss``)."""
    return x.float().pow(2).sum(-1, keepdim=True)


def row_scale(ss: th.Tensor, hidden: int, eps: float) -> th.Tensor:
    """fp32 [M, 1]: ``rsqrt(mean(x^2) + eps)`` from ``ss`` [M, S], the rows' sums of squares in S parts."""
    return th.rsqrt(ss.sum(-1, keepdim=True) / hidden + eps)


def scaled(y: th.Tensor, r: th.Tensor, bias: th.Tensor | None = None) -> th.Tensor:
    """The folded GEMM's output ``y`` [M, N] times ``r`` [M, 1] (plus ``bias`` [N]), rounded to ``y``'s dtype."""
    out = y.float() * r
    return (out if bias is None else out + bias.float()).to(y.dtype)


def fold_weight(weight: th.Tensor, norm_weight: th.Tensor) -> None:
    """``weight`` [N, K] *= the norm's weight [K], in place (the product rounded to the weight's dtype)."""
    weight.mul_(norm_weight.detach()[None, :].to(weight.dtype))


def silu_mul_reference(
    gate_up: th.Tensor, ss: th.Tensor, hidden: int, eps: float, bias: th.Tensor | None = None
) -> th.Tensor:
    """``silu_mul``'s maths in PyTorch ops: ``silu(gate) * up`` of the scaled halves, in transformers' roundings."""
    gate, up = scaled(gate_up, row_scale(ss, hidden, eps), bias).chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul_triton(
    gate_up: th.Tensor, ss: th.Tensor, hidden: int, eps: float, bias: th.Tensor | None = None, pdl: bool = False
) -> th.Tensor:
    """The kernel: ``gate_up`` [M, 2I] (the folded GEMM's output, last dim contiguous), ``ss`` fp32 [M, S] -> [M, I];
    ``pdl``: launched with programmatic dependent launch (waits for the kernel before, lets the next one launch)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    m, two_i = gate_up.shape
    inter = two_i // 2
    if gate_up.stride(-1) != 1 or ss.stride(-1) != 1 or ss.dtype != th.float32 or ss.shape[0] != m:
        raise ValueError(f"norm_fold.silu_mul: gate_up [{m}, 2I] and ss fp32 [{m}, S] need contiguous last dims")
    if bias is not None and not (bias.is_contiguous() and bias.numel() == two_i):
        raise ValueError(f"norm_fold.silu_mul: bias must be a contiguous [{two_i}]")
    out = gate_up.new_empty(m, inter)
    _silu_mul_kernel[(m, triton.cdiv(inter, BLOCK))](
        gate_up,
        ss,
        bias if bias is not None else ss,
        out,
        inter,
        ss.shape[1],
        gate_up.stride(0),
        ss.stride(0),
        out.stride(0),
        float(hidden),
        float(eps),
        BLOCK=BLOCK,
        BLOCK_S=triton.next_power_of_2(ss.shape[1]),
        HAS_BIAS=bias is not None,
        PDL=pdl,
        num_warps=4,
        **({"launch_pdl": True} if pdl else {}),
    )
    return out


@th.library.custom_op("rlvr_vocab::folded_silu_mul", mutates_args=())
def _silu_mul_op(
    gate_up: th.Tensor, ss: th.Tensor, bias: th.Tensor | None, hidden: int, eps: float, impl: str, pdl: bool = False
) -> th.Tensor:
    """The op behind ``silu_mul`` (opaque to ``torch.compile``: one kernel, as the attention and projection ops)."""
    if impl == "triton":
        return silu_mul_triton(gate_up, ss, hidden, eps, bias, pdl)
    return silu_mul_reference(gate_up, ss, hidden, eps, bias)


@_silu_mul_op.register_fake
def _(gate_up, ss, bias, hidden, eps, impl, pdl=False):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


def silu_mul(
    gate_up: th.Tensor,
    ss: th.Tensor,
    hidden: int,
    eps: float,
    bias: th.Tensor | None = None,
    impl: str = "torch",
    pdl: bool = False,
) -> th.Tensor:
    """The folded post-attention norm and the MLP's activation: ``silu(r * gate) * (r * up)`` [M, I].

    ``gate_up`` [M, 2I]: the folded gate/up GEMM's output; ``ss`` fp32 [M, S]: the input rows' sums of squares in S
    parts; ``hidden``, ``eps``: the norm's size and eps; ``bias`` [2I] (or None); ``impl``: ``triton`` (one
    kernel) or ``torch`` (``silu_mul_reference``: PyTorch ops); ``pdl``: the kernel with programmatic dependent launch.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"norm_fold.silu_mul(impl={impl!r}): choose one of {IMPLEMENTATIONS}")
    if impl == "torch" and th.compiler.is_compiling():
        return silu_mul_reference(gate_up, ss, hidden, eps, bias)  # traced: Inductor fuses it into one kernel
    return _silu_mul_op(gate_up, ss, bias, hidden, float(eps), impl, pdl)


def check(dtype: th.dtype, device: th.device) -> str | None:
    """Run the kernel against ``silu_mul_reference`` on random inputs: None if it agrees, else why not.

    5 and 33 rows, an intermediate size off the block, sums in one part and in three, with and without a bias; the
    tolerance is the dtype's (fp32 1e-4, 16-bit 2e-2, relative to the largest output).
    """
    if triton is None:
        return "Triton is not installed"
    gen = th.Generator(device=device).manual_seed(0)
    tolerance = 1e-4 if dtype == th.float32 else 2e-2
    hidden, inter = 64, BLOCK + 40
    for m, parts, with_bias in ((5, 1, False), (33, 3, True)):
        gate_up = (th.randn(m, 2 * inter, generator=gen, device=device) * 4).to(dtype)
        x = th.randn(m, hidden, generator=gen, device=device) * 3
        ss = th.stack([sums_of_squares(p)[:, 0] for p in x.chunk(parts, dim=-1)], -1).contiguous()
        bias = (th.randn(2 * inter, generator=gen, device=device) * 0.3).to(dtype) if with_bias else None
        try:
            got = silu_mul_triton(gate_up, ss, hidden, 1e-6, bias).float()
        except Exception as err:  # noqa: BLE001 - a compile or launch failure is the answer
            return triton_env.error_line(err)
        want = silu_mul_reference(gate_up, ss, hidden, 1e-6, bias).float()
        error = triton_env.relative_error(got, want)
        if not error <= tolerance:  # also catches NaN
            return f"relative error {error:.2e} against the PyTorch maths ({m} rows, sums in {parts} parts)"
    return None
