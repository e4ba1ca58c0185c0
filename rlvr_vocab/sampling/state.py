"""Per-row decode state of one batch: reset per call, the graph-safe token pick, and compaction of live rows.

Every per-row tensor is allocated for the call's batch ``B``; the live batch is its first ``n`` rows, and
``rows[i]`` is the original row of live row ``i``. The outputs (``out``, ``logp``) and the sampling noise stay
in the original row order: ``pick`` writes token ``t`` of live row ``i`` to ``out[rows[i], t]`` and draws it
with the noise row ``rows[i]`` of a [B, V] draw. So which random numbers a sequence gets does not depend on
which other sequences are still live, and a compacted run samples the same tokens as an uncompacted one.
"""

from __future__ import annotations

import torch as th

from rlvr_vocab.sampling import triton_pick
from rlvr_vocab.sampling.plan import BlockAt, BlockBefore, Plan, StepInputs


class DecodeState:
    """The tensors a decode step reads and writes, for a batch of ``batch`` rows and ``cache_len`` slots."""

    def __init__(self, batch: int, cache_len: int, device: th.device):
        long = dict(dtype=th.long, device=device)
        self.batch = batch
        self.n = batch  # live rows (the first n)
        self.device = device
        self.tok = th.zeros(batch, **long)  # last sampled token, fed to the next decode step
        self.pos = th.zeros(batch, **long)  # its position id
        self.rows = th.arange(batch, **long)  # original row of each live row
        self.finished = th.zeros(batch, dtype=th.bool, device=device)
        self.inside = th.zeros(batch, dtype=th.bool, device=device)  # reasoning span state
        # additive attention bias per cache slot: -inf on the prompts' left padding, 0 elsewhere
        self.bias = th.zeros(batch, 1, 1, cache_len, dtype=th.float32, device=device)
        self.first = th.zeros(batch, dtype=th.int32, device=device)  # first slot after the left padding
        self.out = th.zeros(batch, cache_len, **long)  # sampled tokens, original row order
        self.logp = th.zeros(batch, cache_len, dtype=th.float32, device=device)  # their processed log-probs
        self.step = th.zeros(1, **long)  # index of the token being sampled
        self.length = th.zeros(1, **long)  # valid cache slots once this step's token is written
        self.window = cache_len  # slots the eager attention reads this step (the length rounded up)
        self.thresholds: th.Tensor | None = None  # per-step thresholds of this call
        self.columns: list[th.Tensor | None] = []  # per-step constant column masks [V]
        self.eos: th.Tensor | None = None  # EOS ids
        self.eos_columns: th.Tensor | None = None  # bool [V]: EOS columns (the forced-EOS hook)
        self.seen: th.Tensor | None = None  # bool [B, V + 1]: ids seen so far (repetition penalty)
        self.noise: th.Tensor | None = None  # fp32 [B, V]: exponential noise of one step (the PyTorch pick)
        self.seed = th.zeros(1, **long)  # the call's noise seed (the Triton pick draws its noise from it)
        self.force_eos_at: th.Tensor | None = None  # int64 [B]: token index at which EOS is forced (bench)
        self.vocab_size = 0
        self.greedy = True

    # ------------------------------------------------------------------------------------ per call
    def start(
        self,
        plan: Plan,
        input_ids: th.Tensor,
        attention_mask: th.Tensor,
        position_ids: th.Tensor,
        vocab_size: int,
        force_eos_at: th.Tensor | None,
        pick_impl: str = "torch",
    ) -> None:
        """Reset every per-row tensor for a new call (the prefill has written slots ``[0, p)``).

        ``pick_impl``: the call's ``pick`` implementation; ``torch`` needs the [B, V] noise buffer, ``triton`` a
        fresh seed, drawn here from torch's default generator (``torch.manual_seed`` fixes it)."""
        batch, p = input_ids.shape
        device = self.device
        self.n = batch
        self.vocab_size = vocab_size
        self.rows.copy_(th.arange(batch, device=device))
        self.step.zero_()
        # the pick of token 0 (from the prefill's logits) advances these to the first decode step's values:
        # token 0 is fed at the next position and written to slot p
        self.length.fill_(p)
        self.pos.copy_(position_ids[:, -1])
        self.finished.zero_()
        self.out.fill_(plan.pad_id)
        self.logp.zero_()
        self.bias.zero_()
        self.bias[:, 0, 0, :p].masked_fill_(attention_mask == 0, float("-inf"))
        self.first.copy_((attention_mask.cumsum(-1) == 0).sum(-1))  # leading padding: the kernel skips it
        reasoning = plan.reasoning()
        self.inside.copy_(reasoning.vocab.span_state(input_ids)[:, -1] if reasoning else th.zeros_like(self.inside))
        if plan.repetition_skip is not None:
            if self.seen is None:  # one spare column receives the ignored prompt tokens
                self.seen = th.zeros(batch, vocab_size + 1, dtype=th.bool, device=device)
            skip = th.as_tensor(plan.repetition_skip, device=device).reshape(-1, 1)
            counted = th.arange(p, device=device)[None, :] >= skip
            self.seen.zero_()
            self.seen.scatter_(1, input_ids.masked_fill(~counted, vocab_size), True)
        if not self.columns:
            for step in plan.steps:
                cols = None
                if isinstance(step, (BlockBefore, BlockAt)):
                    cols = th.zeros(vocab_size, dtype=th.bool, device=device)
                    cols[[t for t in step.ids if 0 <= t < vocab_size]] = True
                self.columns.append(cols)
        thresholds = th.tensor(plan.thresholds() or [0], dtype=th.long)
        if self.thresholds is None:
            self.thresholds = th.zeros(thresholds.shape, dtype=th.long, device=device)
        self.thresholds.copy_(thresholds)  # in place: captured graphs read this tensor
        if plan.eos_ids and self.eos is None:
            self.eos = th.tensor(plan.eos_ids, dtype=th.long, device=device)
            self.eos_columns = th.zeros(vocab_size, dtype=th.bool, device=device)
            self.eos_columns[[t for t in plan.eos_ids if 0 <= t < vocab_size]] = True
        self.greedy = plan.greedy
        if plan.greedy or pick_impl == "triton":
            self.noise = None
        elif self.noise is None:
            self.noise = th.empty(batch, vocab_size, dtype=th.float32, device=device)
        if pick_impl == "triton" and not plan.greedy:  # in place: captured graphs read this tensor
            self.seed.copy_(th.randint(0, 2**62, (1,), dtype=th.long))
        if force_eos_at is None:
            self.force_eos_at = None
        else:
            if not plan.eos_ids:
                raise ValueError("FastSampler(force_eos_at=...) needs an eos_token_id in the generation config")
            if self.force_eos_at is None:
                self.force_eos_at = th.empty(batch, dtype=th.long, device=device)
            self.force_eos_at.copy_(force_eos_at.reshape(batch))

    def use_torch_pick(self) -> None:
        """Switch this call to the PyTorch pick (after a Triton pick failure): it needs the [B, V] noise."""
        if self.noise is None and not self.greedy:
            self.noise = th.empty(self.batch, self.vocab_size, dtype=th.float32, device=self.device)

    # ------------------------------------------------------------------------------------ per step
    def tensors(self) -> dict:
        """What ``pick`` reads and writes, for the live rows (views; a dict, so compiled code sees tensors only)."""
        n = self.n
        return {
            "step": self.step,
            "thresholds": self.thresholds,
            "columns": self.columns,
            "seen": None if self.seen is None else self.seen[:n],
            "inside": self.inside[:n],
            "finished": self.finished[:n],
            "tok": self.tok[:n],
            "pos": self.pos[:n],
            "rows": self.rows[:n],
            "length": self.length,
            "out": self.out,
            "logp": self.logp,
            "noise": self.noise,
            "seed": self.seed,
            "eos": self.eos,
            "eos_columns": self.eos_columns,
            "force_eos_at": self.force_eos_at,
        }

    def draw_noise(self) -> th.Tensor | None:
        """Exponential noise for every original row (live or not), in place; None when greedy.

        torch's CUDA ``exponential_`` never returns 0, so ``p / E`` is the exponential race exactly.
        """
        return None if self.noise is None else self.noise.exponential_()

    # ------------------------------------------------------------------------------------ compaction
    def live_count(self) -> int:
        """Live rows among the first ``n`` (a host sync)."""
        return self.n - int(self.finished[: self.n].sum())

    def live_first(self, m: int) -> th.Tensor:
        """``m`` row indices: the live rows in order, then finished ones as filler (device, no sync)."""
        order = th.sort(self.finished[: self.n].to(th.uint8), stable=True).indices
        return order[:m]

    @th.no_grad()
    def compact(self, index: th.Tensor) -> None:
        """Rows ``index`` become the live rows ``0..len(index)-1`` (the KV cache is compacted by its owner)."""
        m = index.numel()
        for t in (self.tok, self.pos, self.rows, self.finished, self.inside, self.bias, self.first, self.seen):
            if t is not None:
                t[:m] = t.index_select(0, index)
        self.n = m


def noisy_argmax(scores: th.Tensor, noise: th.Tensor) -> th.Tensor:
    """``argmax(scores - log E)`` per row: a draw from ``softmax(scores)`` given exponential noise ``E``.

    ``log E`` is floored at fp32's lowest finite value, so an ``E`` of exactly 0 (the CPU's exponential can draw
    it) makes its token the certain pick only where that token is allowed: a masked (-inf) score stays -inf
    rather than becoming NaN, which argmax would take.

    >>> noisy_argmax(th.tensor([[float("-inf"), 0.0, 1.0]]), th.tensor([[0.0, 1.0, 1.0]])).tolist()
    [2]
    """
    return (scores - noise.log().clamp_min(th.finfo(th.float32).min)).argmax(-1)


def pick(plan: Plan, logits: th.Tensor, t: dict, impl: str = "torch") -> None:
    """Process the logits in transformers' order, pick each live row's token, update the state. Graph-safe.

    Greedy: argmax. Sampling: ``argmax(scores - log E)``, ``E`` the row's exponential noise: the Gumbel-max form
    of ``argmax(softmax(scores) / E)``, the law of ``torch.multinomial``, without the softmax's two passes over
    [n, V] (with the log-sum-exp of the log-prob, one fused pass). A finished row gets the pad token (log-prob 0).
    Advances the step, the positions and the cache length.

    ``impl``: ``torch`` (the plan's steps as PyTorch ops, ``E`` from ``t["noise"]``) or ``triton``
    (``triton_pick``: one kernel pass over the logits, ``E`` drawn in the kernel from ``t["seed"]``; only for
    plans that ``triton_pick.unfusable`` accepts).
    """
    if impl == "triton":
        nxt, logp = _pick_triton(plan, logits, t)
    else:
        nxt, logp = _pick_torch(plan, logits, t)
    _advance(plan, t, nxt, logp)


def _pick_torch(plan: Plan, logits: th.Tensor, t: dict) -> tuple[th.Tensor, th.Tensor]:
    inputs: StepInputs = {k: t[k] for k in ("step", "thresholds", "columns", "seen", "inside")}
    scores = plan.process(logits.float(), inputs)
    rows, step = t["rows"], t["step"]
    if t["force_eos_at"] is not None:  # bench-only: this row's token number force_eos_at is EOS
        forced = (t["force_eos_at"].index_select(0, rows) == step)[:, None]
        eos_only = th.where(t["eos_columns"], 0.0, float("-inf"))
        scores = th.where(forced, eos_only, scores)
    if t["noise"] is None:
        nxt = scores.argmax(-1)
    else:
        nxt = noisy_argmax(scores, t["noise"].index_select(0, rows))
    logp = scores.gather(1, nxt[:, None]).squeeze(1) - scores.logsumexp(-1)
    return nxt, logp


def _pick_triton(plan: Plan, logits: th.Tensor, t: dict) -> tuple[th.Tensor, th.Tensor]:
    step = t["step"]
    blocked = None  # this step's blocked columns: the BlockBefore / BlockAt masks whose gate is open
    for index, s in enumerate(plan.steps):
        if isinstance(s, (BlockBefore, BlockAt)):
            cols = s.blocked(t, index)
            blocked = cols if blocked is None else blocked | cols
    reasoning = plan.reasoning()
    forced = t["force_eos_at"] is not None
    return triton_pick.pick_op(
        logits,
        t["rows"],
        t["inside"] if reasoning is not None else None,
        t["seen"],
        blocked,
        t["force_eos_at"] if forced else None,
        t["eos_columns"] if forced else None,
        step,
        None if plan.greedy else t["seed"],
        t["out"].shape[0],
        triton_pick.temperature_of(plan),
        triton_pick.penalty_of(plan),
        reasoning.vocab.standard_size if reasoning is not None else 0,
    )


def _advance(plan: Plan, t: dict, nxt: th.Tensor, logp: th.Tensor) -> None:
    """Record the picked tokens (pad and 0 for finished rows) and advance every per-row state by one token."""
    rows, step, finished = t["rows"], t["step"], t["finished"]
    nxt = th.where(finished, plan.pad_id, nxt)
    logp = th.where(finished, 0.0, logp)
    cols = step.expand(rows.shape[0])
    t["out"].index_put_((rows, cols), nxt)
    t["logp"].index_put_((rows, cols), logp)
    if t["eos"] is not None:
        finished |= (nxt[:, None] == t["eos"]).any(-1)
    reasoning = plan.reasoning()
    if reasoning is not None:
        t["inside"].copy_(reasoning.vocab.step_state(t["inside"], nxt))
    if t["seen"] is not None:
        t["seen"].scatter_(1, nxt[:, None], True)
    t["tok"].copy_(nxt)
    t["pos"].add_(1)
    t["length"].add_(1)
    step.add_(1)
