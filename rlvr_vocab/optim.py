"""fp32 master weights for a model whose parameters are bfloat16 (``training.master_weights``).

With the weights themselves in bf16 (what ``dtype: auto`` loads on a GPU), AdamW writes every update straight into a
bf16 tensor, and an update smaller than half the spacing of bf16 numbers around a weight rounds away: bf16 keeps 8
significant bits, so a weight of 0.1 moves only by steps of ~0.0005. Measured on SmolLM2-135M-Instruct's weights (the
GGUF de-quantised; median |w| 0.108), an update of the learning rate's size changes 16% of the 2-D weights' elements
at lr 1e-4, 2% at 1e-5 and 0.6% at 3e-6: most of each optimizer step is lost, the more so the smaller the lr
(``python -m bench.bf16_updates``; ``tests/test_optim.py`` shows the loss on a small matrix).

:class:`FP32MasterWeights` keeps an fp32 copy of every low-precision parameter, lets the wrapped optimizer (AdamW or
any other torch optimizer) step those copies with fp32 state, and copies the result back into the bf16 parameters in
place (so the sampler's CUDA graphs, which hold the parameters' addresses, stay valid). Forward, backward and
sampling still run in bf16; the cost is 12 more bytes per parameter (the copy, and Adam's two moments in fp32 rather
than bf16). Checkpoints hold the fp32 copies (``optimizer.pt``), so a resumed run continues from the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch as th
from loguru import logger

LOW_PRECISION = (th.bfloat16, th.float16)
MASTERS_KEY = "fp32_masters"  # in the optimizer's state_dict: the fp32 copies, in the order of the parameters


def low_precision_params(params: Iterable[th.Tensor]) -> list[th.Tensor]:
    """The trainable parameters that are stored in bf16 or fp16."""
    return [p for p in params if p.requires_grad and p.dtype in LOW_PRECISION]


class FP32MasterWeights(th.optim.Optimizer):
    """Wraps a torch optimizer built over a model's parameters (before its first step) so that it steps fp32 copies of
    the bf16/fp16 ones. It is a ``torch.optim.Optimizer`` sharing the inner optimizer's ``param_groups`` and
    ``state``, so learning-rate schedulers, gradient clipping (on the model's gradients) and accelerate's wrapper
    work unchanged.

    Example:
        >>> w = th.nn.Parameter(th.full((4,), 0.1, dtype=th.bfloat16))
        >>> opt = FP32MasterWeights(th.optim.SGD([w], lr=1e-4))
        >>> for _ in range(10):
        ...     w.grad = th.ones_like(w); opt.step(); opt.zero_grad()
        >>> round(float(w[0]), 4)  # plain SGD on the bf16 tensor leaves it at 0.1: each 1e-4 step rounds away
        0.0991
    """

    def __init__(self, optimizer: th.optim.Optimizer):
        if isinstance(optimizer, FP32MasterWeights):
            raise TypeError("optimizer is already wrapped in FP32MasterWeights")
        if any(len(s) for s in optimizer.state.values()):
            raise ValueError("FP32MasterWeights must wrap an optimizer before its first step")
        self.optimizer = optimizer
        self.params: list[th.Tensor] = []  # the model's low-precision parameters ...
        self.masters: list[th.Tensor] = []  # ... and their fp32 copies, which the inner optimizer steps
        for group in optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p.dtype in LOW_PRECISION:
                    master = p.detach().clone().float()
                    group["params"][i] = master
                    self.params.append(p)
                    self.masters.append(master)
        super().__init__([p for g in optimizer.param_groups for p in g["params"]], optimizer.defaults)
        self._share_inner()

    def _share_inner(self) -> None:
        self._shared = True
        self.param_groups = self.optimizer.param_groups  # one list: a scheduler's lr reaches the inner optimizer
        self.state = self.optimizer.state
        self.defaults = self.optimizer.defaults

    @th.no_grad()
    def step(self, closure=None):
        for p, master in zip(self.params, self.masters, strict=True):
            master.grad = None if p.grad is None else p.grad.float()
        loss = self.optimizer.step(closure)
        for p, master in zip(self.params, self.masters, strict=True):
            if master.grad is not None:
                p.copy_(master)  # rounded to bf16, in place
                master.grad = None
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state = self.optimizer.state_dict()
        state[MASTERS_KEY] = [m.detach().clone() for m in self.masters]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop(MASTERS_KEY, None)
        if masters is not None:
            if len(masters) != len(self.masters) or any(
                a.shape != b.shape for a, b in zip(masters, self.masters, strict=True)
            ):
                raise ValueError(
                    f"the checkpoint's optimizer holds {len(masters)} fp32 master weights that do not match this "
                    f"model's {len(self.masters)} low-precision parameters (training.master_weights)"
                )
            for master, saved in zip(self.masters, masters, strict=True):
                master.copy_(saved)
        else:  # a checkpoint written without master weights: start the copies from the bf16 weights
            logger.info(
                "The checkpoint's optimizer holds no fp32 master weights (written with training.master_weights=false "
                "or before the key existed): the copies start from the bf16 weights"
            )
            for master, p in zip(self.masters, self.params, strict=True):
                master.copy_(p.detach())
        self.optimizer.load_state_dict(state_dict)  # state is cast to the masters' dtype: fp32
        self._share_inner()

    def add_param_group(self, param_group: dict) -> None:
        if not getattr(self, "_shared", False):  # Optimizer.__init__ builds its own groups, replaced by the inner's
            return super().add_param_group(param_group)
        raise NotImplementedError("FP32MasterWeights: add parameter groups to the optimizer before wrapping it")
