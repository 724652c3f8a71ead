"""KDA's per-head inputs from the mixer's one [q | k | v] projection: `kda_heads` (PyTorch) is the definition,
`kda_heads_fused` the one-pass Triton kernel that GPU inference uses, optionally with KDA's short conv folded in
(`kda.short_conv` is that conv's definition).

The student keeps the teacher's Hkv key/value heads and repeats them to the H KDA heads exactly as GQA's repeat_kv
(KDA head h reads kv head h // (H / Hkv)). Handed the strided q and repeated k/v, fla would copy q, then L2-normalise
q and k in passes of their own: five whole-activation passes at a long prefill (~60 ms of the 0.6B shape's 128K
prefill on an H200). The kernel reads [q | k | v] once and writes q and k normalised and all three contiguous; with
the conv folded in it reads the projection before the conv, so the conv's output is never written whole either.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from gendistill.kda import EPS, l2norm
from gendistill.kernels.launch import Launcher

ROWS = 32  # tokens per program
CONV_ROWS = 64  # tokens per program with the conv folded in (each block re-reads the W-1 steps before it)


def kda_heads(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, normalize_qk: bool):
    """Split [B, T, (H + 2 Hkv) D] into q [B, T, H, D] and k, v [B, T, H, D] (kv heads repeated); q and k
    L2-normalised (fp32 math, back to qkv's dtype) when `normalize_qk`."""
    B, T, _ = qkv.shape
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.reshape(B, T, heads, head_dim), k.reshape(B, T, kv_heads, head_dim), v.reshape(B, T, kv_heads, head_dim)
    if normalize_qk:
        q, k = (l2norm(t).to(qkv.dtype) for t in (q, k))
    return q, k.repeat_interleave(heads // kv_heads, dim=2), v.repeat_interleave(heads // kv_heads, dim=2)


class Conv(NamedTuple):
    """KDA's short conv as `kda.short_conv` takes it (its definition): weight [C, 1, W], bias [C] or None, context
    [B, C, W-1] (the previous W-1 inputs) or None for zeros, activation "identity" or "silu"."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    context: torch.Tensor | None
    activation: str


@functools.cache
def _kernel():
    """Built on first use: triton is imported only where the kernel runs (and TRITON_INTERPRET, read when the kernel
    is defined, lets the CPU tests run it)."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["T"])  # one compiled kernel (and launcher cache entry) for every length
    def kda_heads_kernel(x, q, k, v, conv_w, conv_b, ctx, T, eps, H: tl.constexpr,
                         HKV: tl.constexpr, D: tl.constexpr, W: tl.constexpr, CONV: tl.constexpr,
                         HAS_BIAS: tl.constexpr, HAS_CTX: tl.constexpr, SILU: tl.constexpr,
                         NORMALIZE: tl.constexpr, ROWS: tl.constexpr):
        # program (block of ROWS steps, input head, row of the batch): input heads 0..H-1 are q, then HKV of k, then
        # HKV of v
        i_r, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        t = i_r * ROWS + tl.arange(0, ROWS)
        valid = t < T
        C: tl.constexpr = (H + 2 * HKV) * D  # x is contiguous: [B, T, C]
        chans = i_h * D + tl.arange(0, D)  # channels of the [q | k | v] projection
        x += i_b.to(tl.int64) * T * C
        if CONV:  # depthwise causal conv: y[t] = sum_w weight[w] * x[t - (W - 1) + w], steps before 0 from ctx
            acc = tl.zeros([ROWS, D], dtype=tl.float32)
            for w in tl.static_range(W):
                src = t - (W - 1) + w
                tap = tl.load(x + src[:, None].to(tl.int64) * C + chans[None, :],
                              mask=(valid & (src >= 0))[:, None], other=0.0).to(tl.float32)
                acc += tap * tl.load(conv_w + chans * W + w).to(tl.float32)[None, :]
            if HAS_CTX:
                if i_r * ROWS < W - 1:  # only the first W-1 steps reach back into the previous inputs
                    at = ctx + i_b.to(tl.int64) * (C * (W - 1)) + chans[None, :] * (W - 1)
                    for w in tl.static_range(W - 1):
                        src = t - (W - 1) + w
                        tap = tl.load(at + (W - 1 + src)[:, None], mask=(valid & (src < 0))[:, None],
                                      other=0.0).to(tl.float32)
                        acc += tap * tl.load(conv_w + chans * W + w).to(tl.float32)[None, :]
            if HAS_BIAS:
                acc += tl.load(conv_b + chans).to(tl.float32)[None, :]
            if SILU:
                acc = acc * tl.sigmoid(acc)
            y = acc.to(x.dtype.element_ty).to(tl.float32)  # rounded where the separate conv writes its output
        else:
            y = tl.load(x + t[:, None].to(tl.int64) * C + chans[None, :], mask=valid[:, None],
                        other=0.0).to(tl.float32)
        if NORMALIZE:
            if i_h < H + HKV:
                y = y * (1.0 / tl.sqrt(tl.sum(y * y, axis=1) + eps))[:, None]
        y = y.to(q.dtype.element_ty)
        out_rows = (i_b * T + t)[:, None].to(tl.int64) * (H * D) + tl.arange(0, D)[None, :]
        if i_h < H:
            tl.store(q + out_rows + i_h * D, y, mask=valid[:, None])
        elif i_h < H + HKV:  # k head j goes to KDA heads j * rep .. j * rep + rep - 1
            for r in tl.static_range(H // HKV):
                tl.store(k + out_rows + ((i_h - H) * (H // HKV) + r) * D, y, mask=valid[:, None])
        else:
            for r in tl.static_range(H // HKV):
                tl.store(v + out_rows + ((i_h - H - HKV) * (H // HKV) + r) * D, y, mask=valid[:, None])

    return Launcher(kda_heads_kernel)


def kda_heads_fused(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, normalize_qk: bool,
                    conv: Conv | None = None):
    """`kda_heads` in one Triton pass (inference only: no autograd). With `conv`, `qkv` is the projection before the
    short conv, and the pass applies the conv too (one sequence per row, nothing packed): `short_conv` then
    `kda_heads` in one read of the activations (the caller keeps the new conv context, `kda.next_conv_context`).
    head_dim must be a power of two."""
    B, T, C = qkv.shape
    if C != (heads + 2 * kv_heads) * head_dim or heads % kv_heads or head_dim & (head_dim - 1):
        raise ValueError(f"kda_heads_fused: qkv width {C} must be (H + 2 Hkv) * D with H a multiple of Hkv and D a "
                         f"power of two (H={heads}, Hkv={kv_heads}, D={head_dim})")
    qkv = qkv.contiguous()  # a no-op for the projection's output
    q, k, v = (qkv.new_empty(B, T, heads, head_dim) for _ in range(3))
    weight = bias = context = None
    if conv is not None:
        weight = conv.weight.reshape(C, -1).contiguous()
        bias = conv.bias
        context = None if conv.context is None else conv.context.to(qkv.dtype).contiguous()
    rows = CONV_ROWS if conv is not None else ROWS
    grid = (-(-T // rows), heads + 2 * kv_heads, B)
    _kernel()(grid, x=qkv, q=q, k=k, v=v, conv_w=weight, conv_b=bias, ctx=context, T=T, eps=EPS, H=heads,
              HKV=kv_heads, D=head_dim, W=1 if weight is None else weight.shape[1], CONV=conv is not None,
              HAS_BIAS=bias is not None, HAS_CTX=context is not None,
              SILU=conv is not None and conv.activation == "silu", NORMALIZE=normalize_qk, ROWS=rows, num_warps=4)
    return q, k, v
