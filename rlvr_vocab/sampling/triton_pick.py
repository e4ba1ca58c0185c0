"""The token pick of a decode step in Triton: one pass over the logits, the noise drawn in the kernel.

The PyTorch pick (``state.pick``) reads the [n, V] scores three times and writes them once: an Exp(1) draw of
[B, V] noise, the noisy argmax, and the log-sum-exp of the log-prob (BENCHMARKS.md's profile: 87 + 13 + 14 µs at
32 rows, 156 + 72 + 95 µs at 256). Here the logits are read once, by ``n x C`` programs (``C`` chunks of
``CHUNK`` columns per row, so a few rows still fill the GPU):

* ``_partial_kernel``, grid ``(n, C)``: processes its chunk as the plan's steps would (repetition penalty, then
  temperature, then the -inf masks: span, blocked columns, forced EOS; they commute), draws the chunk's noise
  with Philox, and writes the chunk's max score, its sum of ``exp(score - max)``, its best noisy score, that
  column and its score;
* ``_combine_kernel``, grid ``(n,)``: the row's log-sum-exp from the chunks' (max, sum) pairs, the first chunk
  with the best noisy score, and the picked token's log-prob.

Noise: column ``v`` of original row ``r`` at token index ``t`` gets the Philox-4x32-10 word of counter
``(t * B + r) * V + v`` (one counter per group of four columns, whose four words go to four columns) under the
call's 64-bit ``seed`` (drawn from torch's generator, so ``torch.manual_seed`` makes a call reproducible). The
word ``w`` gives ``u = (w + 1/2) / 2^32`` in (0, 1) and ``E = -log(1 - u)``, computed as a series below 1/64 so
small ``E`` (the winners) keep full relative precision; the pick is ``argmax(score - log E)``, a draw from
``softmax(score)``. A row's numbers depend on its original row only: compaction changes no token.

Which plans it serves: ``unfusable(plan)``; others use the PyTorch pick. Importable without Triton.
"""

from __future__ import annotations

import torch as th

from rlvr_vocab.sampling import triton_env
from rlvr_vocab.sampling.plan import BlockAt, BlockBefore, Plan, ReasoningSpan, RepetitionPenalty, Warper
from rlvr_vocab.sampling.triton_env import tl, triton  # None without Triton

SUB = 512  # columns per Philox draw group (a chunk is four of them: one counter, four words)
CHUNK = 4 * SUB  # columns per program of the partial kernel
NUM_WARPS = 4
# E = -log(1 - u) as u (1 + u/2 + u^2/3 + ...) below SERIES_BELOW: 1 - u would lose u's low bits (fp32)
SERIES_BELOW = 1.0 / 64


class TritonPickError(RuntimeError):
    """The Triton pick failed to compile or launch (the sampler then uses the PyTorch pick)."""


def unfusable(plan: Plan) -> str | None:
    """Why ``plan``'s processing is not one of the kernel's (None: it is): temperature, penalty, masks only."""
    temperatures = 0
    for step in plan.steps:
        if isinstance(step, Warper):
            if step.name != "TemperatureLogitsWarper":
                return f"logits warper {step.name}"
            temperatures += 1
        elif not isinstance(step, (RepetitionPenalty, BlockBefore, BlockAt, ReasoningSpan)):
            return f"plan step {type(step).__name__}"
    if temperatures > 1:
        return "more than one temperature warper"
    kinds = [type(s) for s in plan.steps]
    if RepetitionPenalty in kinds and Warper in kinds and kinds.index(Warper) < kinds.index(RepetitionPenalty):
        return "temperature before the repetition penalty"
    return None


def temperature_of(plan: Plan) -> float:
    """The plan's sampling temperature (1.0 without a temperature warper)."""
    warper = next((s for s in plan.steps if isinstance(s, Warper)), None)
    return 1.0 if warper is None else float(warper.call.temperature)


def penalty_of(plan: Plan) -> float:
    """The plan's repetition penalty (1.0 without one)."""
    step = next((s for s in plan.steps if isinstance(s, RepetitionPenalty)), None)
    return 1.0 if step is None else step.penalty


def interpreted() -> bool:
    """Were this module's kernels built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)?"""
    return triton is not None and triton_env.interpreted(_partial_kernel)


if triton is not None:

    @triton.jit
    def _exp1_log(word):
        """log E for E ~ Exp(1) from one uint32 Philox word (see the module docstring)."""
        u = (word.to(tl.float32) + 0.5) * 2.3283064365386963e-10  # (w + 1/2) / 2^32: in (0, 1]
        small = u * (1.0 + u * (0.5 + u * (1.0 / 3.0 + u * (0.25 + u * 0.2))))  # -log(1 - u), u < 1/64
        big = -tl.log(1.0 - u)  # u = 1 after rounding: inf, log E = inf, that column never wins
        return tl.log(tl.where(u < 0.015625, small, big))  # SERIES_BELOW (a plain global is not allowed in a kernel)

    @triton.jit
    def _scores(
        Logits,
        Seen,
        Blocked,
        EosCols,
        i,
        cols,
        stride_lb,
        stride_sb,
        V,
        inside,
        forced,
        temperature,
        penalty,
        standard_size,
        HAS_SEEN: tl.constexpr,
        HAS_BLOCKED: tl.constexpr,
        HAS_FORCE: tl.constexpr,
        HAS_SPAN: tl.constexpr,
        HAS_TEMPERATURE: tl.constexpr,
    ):
        """The processed fp32 scores of columns ``cols`` of live row ``i`` (-inf past V)."""
        ok = cols < V
        x = tl.load(Logits + i * stride_lb + cols, mask=ok, other=float("-inf")).to(tl.float32)
        if HAS_SEEN:
            seen = tl.load(Seen + i * stride_sb + cols, mask=ok, other=0) != 0
            x = tl.where(seen, tl.where(x < 0, x * penalty, x / penalty), x)
        if HAS_TEMPERATURE:
            x = x / temperature
        if HAS_SPAN:
            x = tl.where((cols >= standard_size) & (inside == 0), float("-inf"), x)
        if HAS_BLOCKED:
            x = tl.where(tl.load(Blocked + cols, mask=ok, other=0) != 0, float("-inf"), x)
        if HAS_FORCE:
            eos = tl.load(EosCols + cols, mask=ok, other=0) != 0
            x = tl.where(forced, tl.where(eos, 0.0, float("-inf")), x)
        return tl.where(ok, x, float("-inf"))

    @triton.jit
    def _partial_kernel(
        Logits,
        Rows,
        Inside,
        Seen,
        Blocked,
        ForceAt,
        EosCols,
        Step,
        Seed,
        PartMax,
        PartSum,
        PartBest,
        PartIdx,
        PartScore,
        stride_lb,
        stride_sb,
        V,
        batch,
        chunks,
        temperature,
        penalty,
        standard_size,
        HAS_SEEN: tl.constexpr,
        HAS_BLOCKED: tl.constexpr,
        HAS_FORCE: tl.constexpr,
        HAS_SPAN: tl.constexpr,
        HAS_TEMPERATURE: tl.constexpr,
        NOISE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        i = tl.program_id(0)
        c = tl.program_id(1)
        row = tl.load(Rows + i)  # original row: the noise's and the forced EOS's index
        step = tl.load(Step)
        inside = 1
        if HAS_SPAN:
            inside = tl.load(Inside + i).to(tl.int32)
        forced = False
        if HAS_FORCE:
            forced = tl.load(ForceAt + row) == step
        offs = tl.arange(0, BLOCK)
        base = c * 4 * BLOCK
        if NOISE:
            seed = tl.load(Seed)
            counter = (step * batch + row) * V + base + offs  # int64
            w0, w1, w2, w3 = tl.randint4x(seed, counter)
        m = tl.full([1], float("-inf"), tl.float32)
        s = tl.zeros([1], tl.float32)
        best = tl.full([1], float("-inf"), tl.float32)
        idx = tl.zeros([1], tl.int64) + base
        score = tl.full([1], float("-inf"), tl.float32)
        for k in tl.static_range(4):
            cols = base + k * BLOCK + offs
            x = _scores(
                Logits,
                Seen,
                Blocked,
                EosCols,
                i,
                cols,
                stride_lb,
                stride_sb,
                V,
                inside,
                forced,
                temperature,
                penalty,
                standard_size,
                HAS_SEEN,
                HAS_BLOCKED,
                HAS_FORCE,
                HAS_SPAN,
                HAS_TEMPERATURE,
            )
            noisy = x
            if NOISE:
                if k == 0:
                    noisy = x - _exp1_log(w0)
                elif k == 1:
                    noisy = x - _exp1_log(w1)
                elif k == 2:
                    noisy = x - _exp1_log(w2)
                else:
                    noisy = x - _exp1_log(w3)
            m_new = tl.maximum(m, tl.max(x, 0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), 0)
            m = m_new
            k_best = tl.max(noisy, 0)
            k_arg = tl.argmax(noisy, 0)
            k_score = tl.sum(tl.where(offs == k_arg, x, 0.0), 0)
            better = k_best > best  # strict: the first of equal maxima wins, as torch.argmax
            idx = tl.where(better, base + k * BLOCK + k_arg, idx)
            score = tl.where(better, k_score, score)
            best = tl.where(better, k_best, best)
        at = i * chunks + c + tl.arange(0, 1)
        tl.store(PartMax + at, m)
        tl.store(PartSum + at, s)
        tl.store(PartBest + at, best)
        tl.store(PartIdx + at, idx)
        tl.store(PartScore + at, score)

    @triton.jit
    def _combine_kernel(PartMax, PartSum, PartBest, PartIdx, PartScore, Next, Logp, chunks, BLOCK_C: tl.constexpr):
        i = tl.program_id(0)
        offs = tl.arange(0, BLOCK_C)
        ok = offs < chunks
        at = i * chunks + offs
        m = tl.load(PartMax + at, mask=ok, other=float("-inf"))
        s = tl.load(PartSum + at, mask=ok, other=0.0)
        best = tl.load(PartBest + at, mask=ok, other=float("-inf"))
        top = tl.max(m, 0)
        top_ref = tl.where(top == float("-inf"), 0.0, top)
        lse = top_ref + tl.log(tl.sum(s * tl.exp(m - top_ref), 0))
        c = tl.argmax(best, 0)  # the first chunk with the best noisy score
        nxt = tl.load(PartIdx + i * chunks + c)
        tl.store(Next + i, nxt)
        tl.store(Logp + i, tl.load(PartScore + i * chunks + c) - lse)


def pick_tokens(
    logits: th.Tensor,
    rows: th.Tensor,
    inside: th.Tensor | None,
    seen: th.Tensor | None,
    blocked: th.Tensor | None,
    force_at: th.Tensor | None,
    eos_columns: th.Tensor | None,
    step: th.Tensor,
    seed: th.Tensor | None,
    batch: int,
    temperature: float = 1.0,
    penalty: float = 1.0,
    standard_size: int = 0,
    sub: int | None = None,
) -> tuple[th.Tensor, th.Tensor]:
    """(token int64 [n], its processed log-prob fp32 [n]) of each live row; see the module docstring.

    ``logits``: [n, V] (last dim contiguous); ``rows``: int64 [n] original rows; ``inside``: bool [n] (None: no
    span mask); ``seen``: bool [n, >= V] (None: no penalty); ``blocked``: bool [V] columns at -inf this step;
    ``force_at``/``eos_columns``: the bench-only forced EOS (int64 [B], bool [V]); ``step``: int64 [1], the token
    index; ``seed``: int64 [1] (None: greedy); ``batch``: the call's rows B (the noise counter's row stride);
    ``sub``: columns per draw group, a power of two (None: ``SUB``; a program covers four).
    """
    if triton is None:
        raise RuntimeError("Triton is not installed")
    n, vocab = logits.shape
    sub = sub or SUB
    chunks = triton.cdiv(vocab, 4 * sub)
    f32 = dict(dtype=th.float32, device=logits.device)
    part_max, part_sum, part_best, part_score = (th.empty(n, chunks, **f32) for _ in range(4))
    part_idx = th.empty(n, chunks, dtype=th.int64, device=logits.device)
    nxt = th.empty(n, dtype=th.int64, device=logits.device)
    logp = th.empty(n, **f32)
    if n == 0:
        return nxt, logp
    dummy = step  # any tensor: the pointer of an absent input is never read
    try:
        _partial_kernel[(n, chunks)](
            logits,
            rows,
            inside if inside is not None else dummy,
            seen if seen is not None else dummy,
            blocked if blocked is not None else dummy,
            force_at if force_at is not None else dummy,
            eos_columns if eos_columns is not None else dummy,
            step,
            seed if seed is not None else dummy,
            part_max,
            part_sum,
            part_best,
            part_idx,
            part_score,
            logits.stride(0),
            seen.stride(0) if seen is not None else 0,
            vocab,
            batch,
            chunks,
            float(temperature),
            float(penalty),
            int(standard_size),
            HAS_SEEN=seen is not None,
            HAS_BLOCKED=blocked is not None,
            HAS_FORCE=force_at is not None,
            HAS_SPAN=inside is not None,
            HAS_TEMPERATURE=temperature != 1.0,
            NOISE=seed is not None,
            BLOCK=sub,
            num_warps=NUM_WARPS,
        )
        _combine_kernel[(n,)](
            part_max,
            part_sum,
            part_best,
            part_idx,
            part_score,
            nxt,
            logp,
            chunks,
            BLOCK_C=triton.next_power_of_2(chunks),
        )
    except Exception as err:  # noqa: BLE001 - any compile or launch failure: the caller falls back
        raise TritonPickError(triton_env.error_line(err)) from err
    return nxt, logp


@th.library.custom_op("rlvr_vocab::pick_tokens", mutates_args=())
def pick_op(
    logits: th.Tensor,
    rows: th.Tensor,
    inside: th.Tensor | None,
    seen: th.Tensor | None,
    blocked: th.Tensor | None,
    force_at: th.Tensor | None,
    eos_columns: th.Tensor | None,
    step: th.Tensor,
    seed: th.Tensor | None,
    batch: int,
    temperature: float,
    penalty: float,
    standard_size: int,
) -> tuple[th.Tensor, th.Tensor]:
    """``pick_tokens`` as the custom op ``rlvr_vocab::pick_tokens``: opaque to ``torch.compile``, captured as is."""
    return pick_tokens(
        logits,
        rows,
        inside,
        seen,
        blocked,
        force_at,
        eos_columns,
        step,
        seed,
        batch,
        temperature,
        penalty,
        standard_size,
    )


@pick_op.register_fake
def _(
    logits, rows, inside, seen, blocked, force_at, eos_columns, step, seed, batch, temperature, penalty, standard_size
):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=th.int64), logits.new_empty(n, dtype=th.float32)


def check(device: th.device) -> str | None:
    """Run the kernels once against PyTorch on random logits: None if they agree, else why not.

    Greedy: the same tokens as ``argmax`` and log-probs within 1e-4 of ``log_softmax``; sampled, with a
    penalty, a temperature, blocked columns and the span mask: no blocked token, log-probs of the tokens drawn as
    ``log_softmax`` of the processed scores gives them.
    """
    gen = th.Generator(device=device).manual_seed(0)
    n, vocab, standard = 5, 3 * CHUNK + 77, 3 * CHUNK
    logits = th.randn(n, vocab, generator=gen, device=device) * 3
    rows = th.arange(n, device=device)
    inside = th.tensor([True, False, True, False, True], device=device)
    seen = th.rand(n, vocab + 1, generator=gen, device=device) < 0.3
    blocked = th.zeros(vocab, dtype=th.bool, device=device)
    blocked[::7] = True
    step = th.zeros(1, dtype=th.long, device=device)
    seed = th.tensor([12345], device=device)
    try:
        got, got_lp = pick_tokens(logits, rows, None, None, None, None, None, step, None, n)
        want_lp = logits.log_softmax(-1)
        if not th.equal(got, logits.argmax(-1)):
            return "greedy tokens differ from argmax"
        if not th.allclose(got_lp, want_lp.gather(1, got[:, None])[:, 0], atol=1e-4):
            return "greedy log-probs differ from log_softmax"
        tok, lp = pick_tokens(logits, rows, inside, seen, blocked, None, None, step, seed, n, 0.7, 1.3, standard)
    except TritonPickError as err:
        return str(err)
    x = th.where(seen[:, :-1], th.where(logits < 0, logits * 1.3, logits / 1.3), logits) / 0.7
    x = x.masked_fill(blocked, float("-inf"))
    x = x.masked_fill(~inside[:, None] & (th.arange(vocab, device=device) >= standard), float("-inf"))
    if bool(blocked[tok].any()) or bool(((tok >= standard) & ~inside).any()):
        return "a blocked token was drawn"
    if not th.allclose(lp, x.log_softmax(-1).gather(1, tok[:, None])[:, 0], atol=1e-4):
        return "sampled log-probs differ from log_softmax of the processed scores"
    return None
