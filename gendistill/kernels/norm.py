"""RMSNorm for GPU inference in one Triton launch: Qwen3's (optionally adding the residual first), KDA's gated output
norm (`rms_norm`), and Qwen3 attention's q and k norms with the rotary embedding after them (`qk_norm_rotary`).
`rms_norm_reference` is the definition (transformers' Qwen3RMSNorm and the KDA reference path); the q/k form's is
transformers' q_norm, k_norm and apply_rotary_pos_emb.

Why our own: on short inputs the GPU waits on the host, and each launch's Python is what counts. transformers'
RMSNorm is six eager kernels; fla's fused norms cost 0.1-0.25 ms of Python per call (measured on an H200:
`bench/host_profile.py`), a whole 4K prefill's worth of them ~8 ms. This is one plain Triton launch, and it rounds
where the reference rounds (the normalised input, the product with the weight, the gated product), so the fused path
keeps transformers' numerics.
"""
from __future__ import annotations

import functools

import torch

from gendistill.kda import rms_norm_reference  # noqa: F401  (the definition, re-exported beside the kernels)
from gendistill.kernels.launch import Launcher

GATES = {None: 0, "sigmoid": 1, "silu": 2}



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



@functools.cache
def _qk_kernel():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["T"])
    def qk_norm_rotary_kernel(q, k, q_weight, k_weight, cos, sin, q_out, k_out, T, eps, HQ: tl.constexpr,
                              HK: tl.constexpr, D: tl.constexpr, COS_PER_ROW: tl.constexpr, ROWS: tl.constexpr):
        # program (block of ROWS steps, head: HQ of q then HK of k, row of the batch)
        i_r, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        t = i_r * ROWS + tl.arange(0, ROWS)
        valid = (t < T)[:, None]
        half = tl.arange(0, D // 2)[None, :]
        tok = i_b.to(tl.int64) * T + t
        if i_h < HQ:
            at = (tok * HQ + i_h)[:, None] * D + half
            x_in, x_out, weight = q, q_out, q_weight
        else:
            at = (tok * HK + i_h - HQ)[:, None] * D + half
            x_in, x_out, weight = k, k_out, k_weight
        dtype = q_out.dtype.element_ty
        x1 = tl.load(x_in + at, mask=valid, other=0.0).to(tl.float32)
        x2 = tl.load(x_in + at + D // 2, mask=valid, other=0.0).to(tl.float32)
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)[:, None]
        w1 = tl.load(weight + half).to(tl.float32)
        w2 = tl.load(weight + D // 2 + half).to(tl.float32)
        y1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)  # rounded as Qwen3RMSNorm rounds
        y2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
        pos = (tok if COS_PER_ROW else t.to(tl.int64))[:, None] * D + half  # cos/sin: both halves equal
        c = tl.load(cos + pos, mask=valid, other=0.0).to(tl.float32)
        s = tl.load(sin + pos, mask=valid, other=0.0).to(tl.float32)
        tl.store(x_out + at, (y1 * c - y2 * s).to(dtype), mask=valid)
        tl.store(x_out + at + D // 2, (y2 * c + y1 * s).to(dtype), mask=valid)

    return Launcher(qk_norm_rotary_kernel)


def qk_norm_rotary(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps: float,
                   cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3 attention's q_norm(q), k_norm(k) (RMSNorm over each head) rotated by the rotary embedding, in one Triton
    pass (inference only: no autograd). q [B, T, HQ, D], k [B, T, HK, D]; cos, sin [1 or B, T, D] as transformers'
    rotary embedding makes them (the two halves equal). Returns new q and k, [B, T, H, D]. The rotation runs in fp32
    and rounds once (transformers rounds each product and the sum: within an ulp of it)."""
    B, T, HQ, D = q.shape
    HK = k.shape[2]
    if cos.shape[0] not in (1, B) or cos.shape[1:] != (T, D) or D & (D - 1):
        raise ValueError(f"qk_norm_rotary: cos/sin {tuple(cos.shape)} must be [1 or {B}, {T}, {D}], D a power of two")
    q, k, cos, sin = q.contiguous(), k.contiguous(), cos.contiguous(), sin.contiguous()
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    rows = 16
    _qk_kernel()((-(-T // rows), HQ + HK, B), q=q, k=k, q_weight=q_weight, k_weight=k_weight, cos=cos, sin=sin,
                 q_out=q_out, k_out=k_out, T=T, eps=eps, HQ=HQ, HK=HK, D=D, COS_PER_ROW=cos.shape[0] > 1,
                 ROWS=rows, num_warps=4)
    return q_out, k_out
