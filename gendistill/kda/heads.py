"""KDA's per-head inputs from the mixer's one [q | k | v] projection: `kda_heads` (PyTorch) is the definition,
`kda_heads_fused` the one-pass Triton kernel that GPU inference uses.

The student keeps the teacher's Hkv key/value heads and repeats them to the H KDA heads exactly as GQA's repeat_kv
(KDA head h reads kv head h // (H / Hkv)). Handed the strided q and repeated k/v, fla would copy q, then L2-normalise
q and k in passes of their own: five whole-activation passes at a long prefill (~60 ms of the 0.6B shape's 128K
prefill on an H200). The kernel reads [q | k | v] once and writes q and k normalised and all three contiguous.
"""
from __future__ import annotations

import functools

import torch

EPS = 1e-6  # fla's L2 norm: x / sqrt(sum(x^2) + eps)
ROWS = 32  # tokens per program


def kda_heads(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, normalize_qk: bool):
    """Split [B, T, (H + 2 Hkv) D] into q [B, T, H, D] and k, v [B, T, H, D] (kv heads repeated); q and k
    L2-normalised (fp32 math, back to qkv's dtype) when `normalize_qk`."""
    B, T, _ = qkv.shape
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.reshape(B, T, heads, head_dim), k.reshape(B, T, kv_heads, head_dim), v.reshape(B, T, kv_heads, head_dim)
    if normalize_qk:
        q, k = (l2norm(t).to(qkv.dtype) for t in (q, k))
    return q, k.repeat_interleave(heads // kv_heads, dim=2), v.repeat_interleave(heads // kv_heads, dim=2)


def l2norm(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """fla's L2 norm: x / sqrt(sum(x^2) + eps), in fp32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


@functools.cache
def _kernel():
    """Built on first use: triton is imported only where the kernel runs (and TRITON_INTERPRET, read when the kernel
    is defined, lets the CPU tests run it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kda_heads_kernel(qkv, q, k, v, n_rows, row_stride, eps, H: tl.constexpr, HKV: tl.constexpr,
                         D: tl.constexpr, NORMALIZE: tl.constexpr, ROWS: tl.constexpr):
        # program (row block, input head): input heads 0..H-1 are q, then HKV of k, then HKV of v
        i_r, i_h = tl.program_id(0), tl.program_id(1)
        rows = i_r * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, D)
        mask = (rows < n_rows)[:, None]
        x = tl.load(qkv + rows[:, None].to(tl.int64) * row_stride + i_h * D + cols[None, :], mask=mask).to(tl.float32)
        if NORMALIZE:
            if i_h < H + HKV:
                x = x * (1.0 / tl.sqrt(tl.sum(x * x, axis=1) + eps))[:, None]
        x = x.to(q.dtype.element_ty)
        out_rows = rows[:, None].to(tl.int64) * (H * D) + cols[None, :]
        if i_h < H:
            tl.store(q + out_rows + i_h * D, x, mask=mask)
        elif i_h < H + HKV:  # k head j goes to KDA heads j * rep .. j * rep + rep - 1
            for r in tl.static_range(H // HKV):
                tl.store(k + out_rows + ((i_h - H) * (H // HKV) + r) * D, x, mask=mask)
        else:
            for r in tl.static_range(H // HKV):
                tl.store(v + out_rows + ((i_h - H - HKV) * (H // HKV) + r) * D, x, mask=mask)

    return kda_heads_kernel


def kda_heads_fused(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, normalize_qk: bool):
    """`kda_heads` in one Triton pass (no autograd: inference only). head_dim must be a power of two."""
    B, T, C = qkv.shape
    if C != (heads + 2 * kv_heads) * head_dim or heads % kv_heads or head_dim & (head_dim - 1):
        raise ValueError(f"kda_heads_fused: qkv width {C} must be (H + 2 Hkv) * D with H a multiple of Hkv and D a "
                         f"power of two (H={heads}, Hkv={kv_heads}, D={head_dim})")
    rows = qkv.reshape(B * T, C)  # a view whenever the rows are evenly spaced (size-1 dims' strides don't count)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    q, k, v = (qkv.new_empty(B, T, heads, head_dim) for _ in range(3))
    grid = (-(-rows.shape[0] // ROWS), heads + 2 * kv_heads)
    _kernel()[grid](rows, q, k, v, rows.shape[0], rows.stride(0), EPS, H=heads, HKV=kv_heads, D=head_dim,
                    NORMALIZE=normalize_qk, ROWS=ROWS, num_warps=4)
    return q, k, v
