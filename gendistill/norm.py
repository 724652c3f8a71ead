"""RMSNorm for GPU inference in one Triton launch: Qwen3's (optionally adding the residual first) and KDA's gated
output norm. `rms_norm_reference` is the definition (transformers' Qwen3RMSNorm and the KDA reference path).

Why our own: on short inputs the GPU waits on the host, and each launch's Python is what counts. transformers'
RMSNorm is six eager kernels; fla's fused norms cost 0.1-0.25 ms of Python per call (measured on an H200:
`bench/host_profile.py`), a whole 4K prefill's worth of them ~8 ms. This is one plain Triton launch, and it rounds
where the reference rounds (the normalised input, the product with the weight, the gated product), so the fused path
keeps transformers' numerics.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from gendistill.launch import Launcher

GATES = {None: 0, "sigmoid": 1, "silu": 2}


@functools.cache
def available() -> bool:
    """Whether triton imports (it ships with torch's CUDA builds on Linux)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                       gate: torch.Tensor | None = None, activation: str = "sigmoid"):
    """weight * normalise(residual + x) over the last dim, times act(gate) if given; returns (y, residual + x) when
    `residual` is given, else y. Rounded to x's dtype after the add, the normalisation, the weight and the gate."""
    h = x if residual is None else residual + x
    hf = h.float()
    y = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if gate is not None:
        act = torch.sigmoid(gate.float()) if activation == "sigmoid" else F.silu(gate.float())
        y = (y.float() * act).to(x.dtype)
    return y if residual is None else (y, h)


@functools.cache
def _kernel():
    """Built on first use (TRITON_INTERPRET, read when the kernel is defined, lets the CPU tests run it)."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["rows"])  # one compiled kernel (and launcher cache entry) for every length
    def rms_norm_kernel(x, residual, gate, weight, out, residual_out, rows, width, eps, HAS_RESIDUAL: tl.constexpr,
                        GATE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        c = tl.arange(0, BLOCK)
        mask = (r < rows)[:, None] & (c < width)[None, :]
        at = r[:, None] * width + c[None, :]
        dtype = out.dtype.element_ty
        h = tl.load(x + at, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            h = (h.to(tl.float32) + tl.load(residual + at, mask=mask, other=0.0).to(tl.float32)).to(dtype)
            tl.store(residual_out + at, h, mask=mask)
        h = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=1) / width + eps)
        y = (h * rstd[:, None]).to(dtype).to(tl.float32)
        y = (y * tl.load(weight + c, mask=c < width, other=0.0).to(tl.float32)[None, :]).to(dtype)
        if GATE > 0:
            g = tl.load(gate + at, mask=mask, other=0.0).to(tl.float32)
            act = tl.sigmoid(g) if GATE == 1 else g * tl.sigmoid(g)
            y = (y.to(tl.float32) * act).to(dtype)
        tl.store(out + at, y, mask=mask)

    return Launcher(rms_norm_kernel)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             gate: torch.Tensor | None = None, activation: str = "sigmoid"):
    """`rms_norm_reference` in one Triton pass (inference only: no autograd)."""
    if activation not in ("sigmoid", "silu"):
        raise ValueError(f"rms_norm: activation must be 'sigmoid' or 'silu', got {activation!r}")
    width = x.shape[-1]
    x2 = x.reshape(-1, width).contiguous()
    out = torch.empty_like(x2)
    residual_out = None if residual is None else torch.empty_like(x2)
    block = 1 << (width - 1).bit_length()  # the row's width rounded up to a power of two
    rows_per_program = max(1, 4096 // block)
    grid = (-(-x2.shape[0] // rows_per_program),)
    _kernel()(grid, x=x2, residual=None if residual is None else residual.reshape(-1, width).contiguous(),
              gate=None if gate is None else gate.reshape(-1, width).contiguous(), weight=weight, out=out,
              residual_out=residual_out, rows=x2.shape[0], width=width, eps=eps, HAS_RESIDUAL=residual is not None,
              GATE=GATES[None if gate is None else activation], ROWS=rows_per_program, BLOCK=block,
              num_warps=4 if block <= 256 else 8)
    out = out.view(x.shape)
    return out if residual is None else (out, residual_out.view(x.shape))

