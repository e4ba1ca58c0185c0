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
