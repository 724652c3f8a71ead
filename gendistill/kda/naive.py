"""The specification of Kimi Delta Attention: the step-by-step recurrence, in fp32.

Per value head and step t, with state S of shape [K, V]:
    S <- Diag(exp(g_t)) S                      # channel-wise forget gate (g_t <= 0, log space)
    S <- S + beta_t * k_t (v_t - S^T k_t)^T    # delta rule: correct what the memory predicts for k_t
    o_t = S^T (scale * q_t)
Layout follows flash-linear-attention: q, k [B,T,H,K]; v [B,T,HV,V]; g [B,T,HV,K]; beta [B,T,HV]; state [B,HV,K,V].
HV must be a multiple of H; value head hv reads q/k head hv // (HV // H) (fla's "GVA").

`recurrent_gla` is the same without the delta rule (gated linear attention: S <- Diag(exp(g_t)) S + k_t v_t^T), the
specification of the GLA and Mamba2 (SSD: a gate equal across K) mixers; Gated DeltaNet is KDA with a gate equal
across K.
"""
from __future__ import annotations

import torch


def expand_qk_heads(q: torch.Tensor, k: torch.Tensor, num_v_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat q/k heads whole-head-wise so that value head hv reads q/k head hv // (HV // H)."""
    heads = q.shape[2]
    if num_v_heads % heads:
        raise ValueError(f"value heads ({num_v_heads}) must be a multiple of q/k heads ({heads})")
    if num_v_heads == heads:
        return q, k
    group = num_v_heads // heads
    return q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)


def check_shapes(q, k, v, g, beta, initial_state=None, cu_seqlens=None) -> None:
    """The layout above; `beta` None for the recurrences without a delta rule."""
    B, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:2] != (B, T) or v.shape[2] % H:
        raise ValueError(f"v must be [B,T,HV,V] with HV a multiple of H={H}, got {tuple(v.shape)}")
    HV = v.shape[2]
    if g.shape != (B, T, HV, K):
        raise ValueError(f"g must be [B,T,HV,K]={(B, T, HV, K)}, got {tuple(g.shape)}")
    if beta is not None and beta.shape != (B, T, HV):
        raise ValueError(f"beta must be [B,T,HV]={(B, T, HV)}, got {tuple(beta.shape)}")
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs the sequences flattened into batch 1, got batch {B}")
    if initial_state is not None:
        n = B if cu_seqlens is None else len(cu_seqlens) - 1
        if initial_state.shape != (n, HV, K, v.shape[-1]):
            raise ValueError(f"initial_state must be {(n, HV, K, v.shape[-1])}, got {tuple(initial_state.shape)}")


def recurrent_kda(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """KDA one token at a time. Returns (o [B,T,HV,V] in q's dtype, final state [N,HV,K,V] fp32 or None)."""
    check_shapes(q, k, v, g, beta, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        return _per_sequence(recurrent_kda, (q, k, v, g, beta), scale, initial_state, output_final_state, cu_seqlens)
    dtype = q.dtype
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K**-0.5 if scale is None else scale
    q, k = expand_qk_heads(q, k, HV)
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    q = q * scale
    S = q.new_zeros(B, HV, K, V) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None]
        predicted = torch.einsum("bhkv,bhk->bhv", S, k[:, t])
        delta = beta[:, t, :, None] * (v[:, t] - predicted)
        S = S + k[:, t, :, :, None] * delta[:, :, None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, HV, V)
    return o.to(dtype), (S if output_final_state else None)


def recurrent_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Gated linear attention one token at a time, per value head and step:
        S <- Diag(exp(g_t)) S + k_t v_t^T;   o_t = S^T (scale * q_t)
    Same layout and returns as `recurrent_kda` (no beta)."""
    check_shapes(q, k, v, g, None, initial_state, cu_seqlens)
    if cu_seqlens is not None:
        return _per_sequence(recurrent_gla, (q, k, v, g), scale, initial_state, output_final_state, cu_seqlens)
    dtype = q.dtype
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    scale = K**-0.5 if scale is None else scale
    q, k = expand_qk_heads(q, k, HV)
    q, k, v, g = (x.float() for x in (q, k, v, g))
    q = q * scale
    S = q.new_zeros(B, HV, K, V) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
        outputs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, HV, V)
    return o.to(dtype), (S if output_final_state else None)


def _per_sequence(fn, inputs, scale, initial_state, output_final_state, cu_seqlens):
    """Run `fn` on each packed sequence separately (`inputs`: its per-step tensors, [1, total, ...]): the state
    restarts at every boundary of cu_seqlens."""
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = None if initial_state is None else initial_state[i : i + 1]
        o, s = fn(*(x[:, start:end] for x in inputs), scale=scale, initial_state=h0,
                  output_final_state=output_final_state)
        outs.append(o)
        states.append(s)
    o = torch.cat(outs, dim=1)
    return o, (torch.cat(states, dim=0) if output_final_state else None)
