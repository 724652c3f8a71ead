"""Chunkwise-parallel KDA in pure PyTorch: the same function as `naive.recurrent_kda`, fast enough to train on CPU.

Within a chunk of C tokens (G = within-chunk cumsum of the log-gates, all in fp32 and log space):
    (I + L) Delta = Diag(beta) (V - (exp(G) * K) S0),   L[i,j] = beta_i sum_d k_i k_j exp(G_i - G_j),  j < i
    O  = (exp(G) * Q) S0 + tril_incl(A_qk) Delta,       A_qk[i,j] = sum_d q_i k_j exp(G_i - G_j)
    S_C = exp(G_C) * S0 + (K * exp(G_C - G))^T Delta
Pairwise decays are formed from differences masked to -inf *before* exp, so nothing overflows however strong the
decay; A_qk and L are built from sub-blocks (`_intra_chunk_scores`), pairwise only on the diagonal ones. The
within-chunk work runs for all chunks at once; only the state hand-off is a loop over chunks. Packed sequences run
as a few batched calls (`_packed`). Measured on 2 cores: a KD step of 16 x 256 unpacked tokens 2.5-2.7 s with
sub-blocks against 4.7-6.2 s all-pairwise; the CPU demo's four distillation stages (packed biographies) 1.5 min
against 4.3 min with one call per sequence.

`chunk_gla` is the same without the delta rule (no solve: Delta = V), the chunked form of `naive.recurrent_gla`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import check_shapes, expand_qk_heads


def chunk_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
              chunk_size: int = 16, sub_chunk: int = 4):
    """Same contract as `recurrent_kda` (and fla's `chunk_kda`); any T, differentiable. `sub_chunk` must divide
    `chunk_size` (see `_intra_chunk_scores`)."""
    if chunk_size % min(sub_chunk, chunk_size):
        raise ValueError(f"sub_chunk ({sub_chunk}) must divide chunk_size ({chunk_size})")
    check_shapes(q, k, v, g, beta, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        return _packed(chunk_kda, (q, k, v, g, beta), scale, initial_state, output_final_state, cu_seqlens,
                       chunk_size=chunk_size, sub_chunk=sub_chunk)
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
    A_qk, A_kk = _intra_chunk_scores(q, k, G, min(sub_chunk, C))

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


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None,
              chunk_size: int = 16, sub_chunk: int = 4):
    """Same contract as `naive.recurrent_gla` (and fla's `chunk_gla`, with GVA); any T, differentiable. Within a
    chunk (G the within-chunk cumsum of the log-gates):
        O = (exp(G) * Q) S0 + tril_incl(A_qk) V,   S_C = exp(G_C) * S0 + (K * exp(G_C - G))^T V
    with A_qk as in chunk_kda (`_intra_chunk_scores`, nothing formed that could overflow)."""
    if chunk_size % min(sub_chunk, chunk_size):
        raise ValueError(f"sub_chunk ({sub_chunk}) must divide chunk_size ({chunk_size})")
    check_shapes(q, k, v, g, None, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        return _packed(chunk_gla, (q, k, v, g), scale, initial_state, output_final_state, cu_seqlens,
                       chunk_size=chunk_size, sub_chunk=sub_chunk)
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
    # Right padding with k = v = 0 and g = 0 (no decay) leaves the state untouched.
    q, k, v, g = (F.pad(x.float(), (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    N = (T + pad) // C

    def chunked(x):  # [B, T, HV, D] -> [B, HV, N, C, D]
        return x.reshape(B, N, C, HV, -1).permute(0, 3, 1, 2, 4)

    q, k, v, g = chunked(q) * scale, chunked(k), chunked(v), chunked(g)
    G = g.cumsum(-2)
    A_qk, _ = _intra_chunk_scores(q, k, G, min(sub_chunk, C), with_kk=False)
    intra = A_qk @ v  # every chunk's own contribution at once
    q_decayed = q * G.exp()
    G_last = G[..., -1:, :]
    k_to_end = k * (G_last - G).exp()
    chunk_decay = G_last.squeeze(-2).exp()  # [B, HV, N, K]

    outputs = []
    for n in range(N):
        outputs.append(q_decayed[:, :, n] @ S + intra[:, :, n])
        S = chunk_decay[:, :, n, :, None] * S + k_to_end[:, :, n].transpose(-1, -2) @ v[:, :, n]
    o = torch.stack(outputs, dim=2).permute(0, 2, 3, 1, 4).reshape(B, N * C, HV, V)[:, :T]
    return o.to(dtype), (S if output_final_state else None)


# Opaque to torch.compile, as fla's kernels are: the grouping reads the document lengths, so a traced version would
# specialise (and recompile) on every batch's lengths.
@torch.compiler.disable
def _packed(fn, inputs, scale, initial_state, output_final_state, cu_seqlens, chunk_size, sub_chunk):
    """Packed sequences (`inputs` [1, total, ...] with boundaries `cu_seqlens`) as a few batched calls of `fn` instead
    of one call per sequence: sequences are grouped by their length rounded up to a power of two (at least one chunk)
    and each group runs as one batch, right-padded with zeros (q = k = v = g = beta = 0), which leaves the state
    untouched (exact)."""
    lengths, starts = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist(), cu_seqlens[:-1].tolist()
    total, device = inputs[0].shape[1], inputs[0].device
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(max(chunk_size, 1 << max(n - 1, 0).bit_length()), []).append(i)
    padded = [torch.cat([x[0], x.new_zeros(1, *x.shape[2:])]) for x in inputs]  # row `total` is zero
    outputs, sources, states, order = [], [], [], []
    for width, seqs in groups.items():
        steps = torch.arange(width)
        valid = steps < torch.tensor([lengths[i] for i in seqs])[:, None]
        rows = torch.where(valid, torch.tensor([starts[i] for i in seqs])[:, None] + steps, total).to(device)
        h0 = None if initial_state is None else initial_state[seqs]
        o, state = fn(*(x[rows] for x in padded), scale=scale, initial_state=h0,
                      output_final_state=output_final_state, chunk_size=chunk_size, sub_chunk=sub_chunk)
        valid = valid.to(device)
        outputs.append(o[valid])
        sources.append(rows[valid])  # where each output row sits in the packed sequence
        states.append(state)
        order += seqs
    o = torch.cat(outputs)[torch.argsort(torch.cat(sources))][None]
    if not output_final_state:
        return o, None
    return o, torch.cat(states)[torch.argsort(torch.tensor(order)).to(device)]


def _intra_chunk_scores(q, k, G, c: int, with_kk: bool = True):
    """A_qk[i, j] = sum_d q_id k_jd exp(G_id - G_jd) and the same with k_i for A_kk (None unless `with_kk`), for
    j <= i inside each chunk (0 above the diagonal); q, k, G: [..., C, K] -> two [..., C, C].

    Sub-blocks of c steps. On the diagonal blocks the decays are formed pairwise, masked before exp (as in the module
    docstring). Below them, with R_a the log-decay at the last step of block a, exp(G_i - G_j) =
    exp(G_i - R_a) * exp(R_a - G_j) for i after block a and j in it: both exponents <= 0 (G only falls), so the
    product is safe, and each block of columns is one matmul instead of a [C, C, K] elementwise product."""
    *lead, C, K = q.shape
    n = C // c
    steps = torch.arange(C, device=q.device)
    qb, kb, Gb = (x.reshape(*lead, n, c, K) for x in (q, k, G))
    causal = steps[:c, None] >= steps[None, :c]
    decay = torch.where(causal[:, :, None], Gb[..., :, None, :] - Gb[..., None, :, :], float("-inf")).exp()
    eye = torch.eye(n, dtype=q.dtype, device=q.device)

    def diagonal(rows):  # [..., n, c, c] on the block diagonal of [..., C, C]
        blocks = (rows[..., :, None, :] * kb[..., None, :, :] * decay).sum(-1)
        return torch.einsum("...aij,ab->...aibj", blocks, eye).reshape(*lead, C, C)

    R = Gb[..., -1, :]  # [..., n, K]
    after = (steps // c)[None, :, None] > torch.arange(n, device=q.device)[:, None, None]  # [n, C, 1]: i after a
    row_decay = torch.where(after, G[..., None, :, :] - R[..., :, None, :], float("-inf")).exp()  # [..., n, C, K]
    cols = (kb * (R[..., :, None, :] - Gb).exp()).transpose(-1, -2)  # [..., n, K, c]

    def below(rows):  # [..., n, C, c] -> [..., C, C]: column block a holds the rows after block a
        return ((rows[..., None, :, :] * row_decay) @ cols).transpose(-3, -2).reshape(*lead, C, C)

    return diagonal(qb) + below(q), (diagonal(kb) + below(k) if with_kk else None)
