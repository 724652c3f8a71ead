"""Chunkwise-parallel KDA in pure PyTorch: the same function as `naive.recurrent_kda`, fast enough to train on CPU.

Within a chunk of C tokens (G = within-chunk cumsum of the log-gates, all in fp32 and log space):
    (I + L) Delta = Diag(beta) (V - (exp(G) * K) S0),   L[i,j] = beta_i sum_d k_i k_j exp(G_i - G_j),  j < i
    O  = (exp(G) * Q) S0 + tril_incl(A_qk) Delta,       A_qk[i,j] = sum_d q_i k_j exp(G_i - G_j)
    S_C = exp(G_C) * S0 + (K * exp(G_C - G))^T Delta
Pairwise decays are formed from differences masked to -inf *before* exp, so nothing overflows however strong the
decay. The within-chunk work runs for all chunks at once; only the state hand-off is a loop over chunks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gendistill.kda.naive import _per_sequence, check_shapes, expand_qk_heads


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
              chunk_size: int = 16):
    """Same contract as `recurrent_kda` (and fla's `chunk_kda`); any T, differentiable."""
    check_shapes(q, k, v, g, beta, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        return _per_sequence(lambda *a, **kw: chunk_kda(*a, **kw, chunk_size=chunk_size),
                             q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens)
    dtype = q.dtype
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K**-0.5 if scale is None else scale
    S = q.new_zeros(B, HV, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    if T == 0:
        return v.new_zeros(B, 0, HV, V).to(dtype), (S if output_final_state else None)

    q, k = expand_qk_heads(q, k, HV)
    C = chunk_size
    pad = (-T) % C
    # Right padding with q = k = v = 0, g = 0 (no decay), beta = 0 (no write) leaves the state untouched.
    q, k, v, g = (F.pad(x.float(), (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    beta = F.pad(beta.float(), (0, 0, 0, pad))
    N = (T + pad) // C

    def chunked(x):  # [B, T, HV, D] -> [B, HV, N, C, D]
        return x.reshape(B, N, C, HV, -1).permute(0, 3, 1, 2, 4)

    q, k, v, g = chunked(q) * scale, chunked(k), chunked(v), chunked(g)
    beta = beta.reshape(B, N, C, HV).permute(0, 3, 1, 2)  # [B, HV, N, C]

    G = g.cumsum(-2)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = G[..., :, None, :] - G[..., None, :, :]  # [B, HV, N, C, C, K]: G_i - G_j
    decay = torch.where(causal[:, :, None], diff, float("-inf")).exp()
    A_qk = (q[..., :, None, :] * k[..., None, :, :] * decay).sum(-1)
    A_kk = (k[..., :, None, :] * k[..., None, :, :] * decay).sum(-1)
    del diff, decay

    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    unit_lower = eye + (A_kk * beta[..., :, None]).tril(-1)
    G_exp = G.exp()
    rhs = torch.cat([beta[..., None] * v, beta[..., None] * (k * G_exp)], dim=-1)
    U, W = torch.linalg.solve_triangular(unit_lower, rhs, upper=False, unitriangular=True).split([V, K], dim=-1)

    q_decayed = q * G_exp
    G_last = G[..., -1:, :]
    k_to_end = k * (G_last - G).exp()
    chunk_decay = G_last.squeeze(-2).exp()  # [B, HV, N, K]

    outputs = []
    for n in range(N):
        delta = U[:, :, n] - W[:, :, n] @ S
        outputs.append(q_decayed[:, :, n] @ S + A_qk[:, :, n] @ delta)
        S = chunk_decay[:, :, n, :, None] * S + k_to_end[:, :, n].transpose(-1, -2) @ delta
    o = torch.stack(outputs, dim=2).permute(0, 2, 3, 1, 4).reshape(B, N * C, HV, V)[:, :T]
    return o.to(dtype), (S if output_final_state else None)
