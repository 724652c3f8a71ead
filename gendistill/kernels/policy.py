"""When gendistill's inference kernels run: one switch for all of them.

`enabled(x, weight)` is asked by every fused module before it leaves the reference computation: CUDA, gradients off
(training keeps transformers' and fla's autograd), the kernels not turned off (`use(kernels=False)`, or a PyTorch KDA
path forced with `kda.use_backend`: the reference), triton importable, and `weight` (if given) of x's dtype (the
kernels write x's dtype; the references promote to the weight's). `use(direct_launch=False)` keeps the kernels but
launches them through Triton's own launcher and fla's stage functions (the reference the direct launches are checked
against); `compat.supported` turns direct launches off where the installed Triton or fla is not a verified version.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import torch

from gendistill.kda import current_backend
from gendistill.kernels import compat

_kernels = contextvars.ContextVar("gendistill_kernels", default=True)
_direct = contextvars.ContextVar("gendistill_direct_launch", default=True)


@contextlib.contextmanager
def use(*, kernels: bool | None = None, direct_launch: bool | None = None):
    """Inside the block: `kernels=False` runs every fused module's reference path; `direct_launch=False` launches
    every kernel through Triton's (and fla's) own Python."""
    tokens = [(var, var.set(value)) for var, value in ((_kernels, kernels), (_direct, direct_launch))
              if value is not None]
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (it ships with torch's CUDA builds on Linux)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def enabled(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    return (x.is_cuda and not torch.is_grad_enabled() and _kernels.get() and current_backend() in ("auto", "fla")
            and (weight is None or weight.dtype == x.dtype) and triton_available())


def direct_launch() -> bool:
    return _direct.get() and compat.supported("direct_launch")


def fla_kernels() -> bool:
    return _direct.get() and compat.supported("fla_kernels")
