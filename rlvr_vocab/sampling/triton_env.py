"""Triton, where it is installed, for the sampler's kernel modules: one import, and the interpreter question.

``triton`` and ``tl`` are None on installs without Triton (CPU installs and CI), and every kernel module then
leaves its kernels undefined and its caller uses PyTorch ops. ``TRITON_INTERPRET=1``, set before the first import,
builds the kernels for Triton's CPU interpreter (the tests do that without a GPU).
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs and CI
    triton = None
    tl = None


def interpreted(kernel) -> bool:
    """Was ``kernel`` (a module's ``@triton.jit`` function) built for Triton's CPU interpreter?"""
    if triton is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def error_line(err: BaseException) -> str:
    """``Type: first line of the message``: how a kernel's compile / launch / check failure is reported.

    Example:
        >>> error_line(RuntimeError("out of resources\\nthe rest")), error_line(KeyError())
        ('RuntimeError: out of resources', 'KeyError: ')
    """
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def relative_error(got, want) -> float:
    """max |got - want| / max |want| (``want``'s scale floored at 1e-6): what the kernels' checks compare with
    their dtype's tolerance; NaN anywhere gives NaN, which no ``<=`` passes.

    Example:
        >>> import torch
        >>> relative_error(torch.tensor([1.0, 2.5]), torch.tensor([1.0, 2.0])), relative_error(torch.zeros(2), torch.zeros(2))
        (0.25, 0.0)
    """
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-6))
