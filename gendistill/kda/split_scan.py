"""The chunk-state scan of a long KDA prefill, split into pieces that run in parallel (inference, batch 1).

fla's chunk_kda computes the state entering each chunk of 64 tokens with one sequential scan, one block per head and
64 values: 32 blocks for 16 heads, so at batch 1 most of an H200's 132 SMs idle through the longest KDA kernel (75 of
the student's 1370 ms at 128K). Per chunk the scan is affine in the state, column by column:

    v_new = u - w S,   S' = diag(exp2(gk_last)) S + k^T v_new   =   A S + k^T u

so a piece of chunks maps its entry state S to  Phi S + L,  with Phi = the product of its A's (K x K) and L its final
state from zero. Split the sequence into P pieces:
1. scan the first P-1 pieces at once from the state [0 | I] on [u | 0]: K extra columns run the same recurrence from
   the identity with no input, so each piece's final state is [L | Phi];
2. chain the summaries: S_0 = the initial state, S_p+1 = Phi_p S_p + L_p (P-1 small matmuls);
3. scan all P pieces at once, each from its S_p: the same states, values and final state as the single scan.
Both scans are fla's own kernel on varlen pieces; each has P times the blocks of the single scan, over 1/P of the
chunks. fla's intra-card backend (FLA_INTRACARD_CP) does the same with a separate pre-scan kernel, which measured
slower than the single scan on this shape (run 13: 4.5 against 2.8 ms for a 32K segment).

- `chunk_states`: the scan as fla's kernel computes it, in PyTorch (the definition, for tests).
- `split_chunk_states`: the split, for any scan with that contract.
- `install`: registers the split as a backend of fla's dispatch for chunk_gated_delta_rule_fwd_h, taken only inside
  `pieces(P)` (kda_gated opens it for long inference prefills), so chunk_kda is called as fla ships it.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math

import torch

_pieces = contextvars.ContextVar("gendistill_split_scan_pieces", default=1)


@contextlib.contextmanager
def pieces(count: int):
    """Inside the block, fla's chunk-state scans of batch-1 inputs run split into `count` pieces (1: not split)."""
    token = _pieces.set(count)
    try:
        yield
    finally:
        _pieces.reset(token)


def chunk_states(k, w, u, g=None, gk=None, initial_state=None, output_final_state=False, chunk_size=64,
                 save_new_value=True, cu_seqlens=None, **_):
    """fla's chunk_gated_delta_rule_fwd_h (K-first state layout, per-channel log2 gate `gk` cumulated within each
    chunk, k already decayed to the chunk's end) step by step in fp32: the state entering each chunk h [1, NT, H, K, V],
    v_new = u - w S [1, T, H, V], final states [N, H, K, V]. Sequences: the rows, or the pieces of `cu_seqlens`."""
    assert g is None and gk is not None, "the KDA scan: per-channel gate only"
    B, T, H, K = k.shape
    V = u.shape[-1]
    rows = [(b, 0, T) for b in range(B)] if cu_seqlens is None else \
        [(0, int(s), int(e)) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    h, v_new, final = [], torch.empty(B, T, H, V), []
    for n, (b, start, end) in enumerate(rows):
        S = torch.zeros(H, K, V) if initial_state is None else initial_state[n].float().clone()
        for c in range(start, end, chunk_size):
            last = min(c + chunk_size, end)
            h.append(S.clone())
            new = u[b, c:last].float() - torch.einsum("thk,hkv->thv", w[b, c:last].float(), S)
            v_new[b, c:last] = new
            S = gk[b, last - 1].float().exp2()[..., None] * S + torch.einsum("thk,thv->hkv", k[b, c:last].float(), new)
        final.append(S)
    h = torch.stack(h).reshape(B, -1, H, K, V).to(k.dtype)
    return h, (v_new.to(u.dtype) if save_new_value else None), (torch.stack(final) if output_final_state else None)


def piece_bounds(tokens: int, count: int, chunk_size: int = 64) -> list[int]:
    """Token bounds of (at most) `count` pieces of whole chunks covering `tokens`; only the last may end mid-chunk."""
    chunks = math.ceil(tokens / chunk_size)
    per = math.ceil(chunks / count)
    return [min(i * per * chunk_size, tokens) for i in range(math.ceil(chunks / per) + 1)]


def split_chunk_states(scan, k, w, u, gk, initial_state=None, output_final_state=False, count=4, chunk_size=64,
                       varlen=None):
    """`scan`'s result (see `chunk_states`) for one sequence k/w/u/gk [1, T, ...], computed in `count` pieces (see the
    module docstring). `varlen(bounds)` gives the extra keyword arguments `scan` takes for pieces at those bounds
    (default: cu_seqlens)."""
    bounds = piece_bounds(k.shape[1], count, chunk_size)
    varlen = varlen or (lambda b: {"cu_seqlens": torch.tensor(b)})
    P, H, K, V = len(bounds) - 1, k.shape[2], k.shape[3], u.shape[3]
    state = k.new_zeros(H, K, V, dtype=torch.float32) if initial_state is None else initial_state[0].float()
    entries = [state]
    if P > 1:
        head = bounds[P - 1]
        eye = torch.eye(K, device=k.device).expand(P - 1, H, K, K)
        start = torch.cat([eye.new_zeros(P - 1, H, K, V), eye], dim=-1)
        u_aug = torch.cat([u[:, :head], u.new_zeros(1, head, H, K)], dim=-1)
        _, _, summary = scan(k[:, :head], w[:, :head], u_aug, gk=gk[:, :head], initial_state=start,
                             output_final_state=True, chunk_size=chunk_size, save_new_value=False,
                             **varlen(bounds[:P]))
        for p in range(P - 1):
            state = torch.baddbmm(summary[p, ..., :V], summary[p, ..., V:], state)
            entries.append(state)
    h, v_new, final = scan(k, w, u, gk=gk, initial_state=torch.stack(entries), output_final_state=output_final_state,
                           chunk_size=chunk_size, **varlen(bounds))
    return h, v_new, None if final is None else final[-1:]


@functools.cache
def install() -> None:
    """Register the split with fla's dispatch (once; needs fla)."""
    import inspect

    from fla.backends import BaseBackend, register
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
    from fla.ops.utils.index import prepare_chunk_indices, prepare_chunk_offsets

    raw_scan = inspect.unwrap(chunk_gated_delta_rule_fwd_h)  # fla's own kernel call, past its dispatch

    @functools.lru_cache(maxsize=16)
    def varlen(bounds: tuple[int, ...], device: torch.device, chunk_size: int) -> dict:
        """Device copies of the pieces' bounds and chunk indices, made once per shape: the same tensors each call,
        no host-device sync after the first."""
        cu_seqlens = torch.tensor(bounds, dtype=torch.long)
        return {"cu_seqlens": cu_seqlens.to(device), "cu_seqlens_cpu": cu_seqlens,
                "chunk_indices": prepare_chunk_indices(cu_seqlens, chunk_size).to(device),
                "chunk_offsets": prepare_chunk_offsets(cu_seqlens, chunk_size).to(device)}

    @register("common")
    class SplitScanBackend(BaseBackend):
        backend_type = "gendistill_split_scan"
        priority = 4  # ahead of fla's intra-card backend, which takes other calls (varlen, inference mode)

        def chunk_gated_delta_rule_fwd_h_verifier(self, k, w, u, g=None, gk=None, initial_state=None,
                                                  output_final_state=False, chunk_size=64, save_new_value=True,
                                                  state_v_first=False, cu_seqlens=None, **_):
            if _pieces.get() < 2:
                return False, "not inside gendistill.kda.split_scan.pieces"
            if cu_seqlens is not None or k.shape[0] != 1 or g is not None or gk is None or state_v_first:
                return False, "splits one unpacked KDA sequence in the K-first state layout"
            return True, None

        def chunk_gated_delta_rule_fwd_h(self, k, w, u, g=None, gk=None, initial_state=None,
                                         output_final_state=False, chunk_size=64, save_new_value=True, **_):
            return split_chunk_states(raw_scan, k, w, u, gk, initial_state, output_final_state, _pieces.get(),
                                      chunk_size, lambda b: varlen(tuple(b), k.device, chunk_size))
