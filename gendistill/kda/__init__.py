"""Kimi Delta Attention ops with flash-linear-attention's layout and semantics: the reference the model runs.

- `recurrent_kda` (naive.py): the step-by-step definition, the specification every other path is tested against.
- `chunk_kda` (chunk.py): chunkwise-parallel pure PyTorch, differentiable, for CPU training and as the GPU fallback.
- `kda_gated`: what the KDA layer calls. It takes raw projections (q/k before L2 norm, gate and beta pre-activations)
  so that on CUDA, with fla installed, normalisation, gate and sigmoid run fused inside fla's Triton kernels; elsewhere
  it computes them in fp32 and calls the PyTorch ops. fla is imported lazily (it needs triton even to import).
- `short_conv`, `gated_rms_norm`: the short convolution and the gated output norm (fla's kernels on CUDA).
- `gdn_gated`, `gla_gated`, `ssd_gated`: the other linear mixers' recurrences, called as `kda_gated` is (fla's
  chunk and fused-recurrent kernels on CUDA: gated_delta_rule, gla, simple_gla). Their PyTorch forms are KDA's ops
  (Gated DeltaNet: the delta rule with one gate per head, broadcast over K) and `recurrent_gla` / `chunk_gla` (GLA;
  Mamba2's SSD is GLA with one gate per head and dt-scaled values).

This file, naive.py and chunk.py ship inside every student directory (as kda.py, naive.py, chunk.py, beside
modeling_hybrid_kda.py: `gendistill.hub`), so they import only torch and each other (relative imports), and fla
inside `try` blocks. gendistill's own inference kernels (`gendistill.kernels`) build on these and are
not shipped.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import warnings

import torch
import torch.nn.functional as F

from .chunk import chunk_gla, chunk_kda
from .naive import recurrent_gla, recurrent_kda

__all__ = ["chunk_kda", "recurrent_kda", "kda_gate", "l2norm", "kda_gated", "gated_rms_norm", "rms_norm_reference",
           "short_conv", "causal_conv", "use_backend", "current_backend", "resolve_backend", "fla_available",
           "next_conv_context", "fla_import", "RECURRENT_MAX_STEPS", "EPS", "chunk_gla", "recurrent_gla", "gdn_gate",
           "gdn_gated", "gla_gated", "ssd_gated"]

EPS = 1e-6  # fla's L2 norm: x / sqrt(sum(x^2) + eps)
BACKENDS = ("auto", "fla", "chunk", "recurrent")
RECURRENT_MAX_STEPS = 64  # inference on up to this many steps (decoding) takes fla's fused recurrent kernel
_backend = contextvars.ContextVar("gendistill_kda_backend", default="auto")
# torch.compile cannot read a ContextVar; compiled code reads this plain module global instead, which dynamo guards
# on (a compiled region recompiles when it changes). It holds the backend of the innermost `use_backend` block of any
# thread, so compiled code follows the same choice as eager code except across threads forcing different backends.
_compiled_backend = "auto"


@contextlib.contextmanager
def use_backend(name: str):
    """Force a KDA path inside the block: "recurrent" (the reference), "chunk" (PyTorch), "fla" (CUDA), "auto"."""
    global _compiled_backend
    if name not in BACKENDS:
        raise ValueError(f"unknown KDA backend {name!r}; choose one of {BACKENDS}")
    token, before = _backend.set(name), _compiled_backend
    _compiled_backend = name
    try:
        yield
    finally:
        _backend.reset(token)
        _compiled_backend = before


def current_backend() -> str:
    """The KDA backend forced by the enclosing `use_backend` ("auto" when none): what `resolve_backend` resolves."""
    if torch.compiler.is_compiling():
        return _compiled_backend
    return _backend.get()


@contextlib.contextmanager
def fla_import():
    """Around gendistill's imports of fla: FLA_DISABLE_BACKEND_DISPATCH=1 unless the caller set it, restored after.
    fla reads it when it is first imported; its per-call backend search wraps each of ~10 calls per KDA layer in a
    search and torch.compiler.disable, host time that a short prefill waits for (bench/host_profile.py: ~3 ms of a 4K
    prefill). Scoped so that importing gendistill changes nothing in the process's environment; a process that
    imported fla before gendistill keeps fla's dispatch as that import set it."""
    key = "FLA_DISABLE_BACKEND_DISPATCH"
    unset = key not in os.environ
    if unset:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if unset:
            os.environ.pop(key, None)


@functools.cache
def _fla_ops():
    try:
        with fla_import():
            from fla.ops.kda import chunk_kda as fla_chunk, fused_recurrent_kda as fla_recurrent
    except Exception:  # ImportError, or triton failing to initialise
        return None
    return fla_chunk, fla_recurrent


def _fla_module_function(module: str, name: str):
    """fla's `module.name`, or None without fla; where fla's KDA ops import but this function does not (fla moves
    modules between releases: written against fla 0.6.0), a warning names the PyTorch path taken instead."""
    try:
        with fla_import():
            return getattr(importlib.import_module(module), name)
    except Exception:
        if _fla_ops() is not None:
            warnings.warn(f"gendistill: fla is installed but {module}.{name} did not import (written against fla "
                          f"0.6.0); the PyTorch form runs instead (same results, slower)", RuntimeWarning)
        return None


@functools.cache
def _fla_norm():
    return _fla_module_function("fla.modules.norm.fused_norm_gate", "rms_norm_gated")


@functools.cache
def _fla_conv():
    return _fla_module_function("fla.modules.causal_conv1d", "causal_conv1d")


# Whether fla imports is a constant of the process; torch.compile cannot trace the import, so it takes the answer as
# a constant. fla's own calls run under torch.compiler.disable (fla disables its chunk_kda likewise): a compiled
# layer breaks its graph around them instead of tracing into fla's autotuned Triton wrappers.
@torch.compiler.assume_constant_result
def _fla_ops_ready() -> bool:
    return _fla_ops() is not None


@torch.compiler.assume_constant_result
def _fla_norm_ready() -> bool:
    return _fla_norm() is not None


@torch.compiler.assume_constant_result
def _fla_conv_ready() -> bool:
    return _fla_conv() is not None


@torch.compiler.disable
def _fla_kda(q, k, v, f, b, recurrent: bool, **kw):
    fla_chunk, fla_recurrent = _fla_ops()
    return (fla_recurrent if recurrent else fla_chunk)(q, k, v, f, b, **kw)


@torch.compiler.disable
def _fla_gated_norm(x, gate, weight, eps, activation):
    return _fla_norm()(x=x, g=gate, weight=weight, bias=None, activation=activation, eps=eps)


@torch.compiler.disable
def _fla_short_conv(x, weight, bias, activation, cu_seqlens, initial_state):
    return _fla_conv()(x=x, weight=weight, bias=bias, activation=activation, cu_seqlens=cu_seqlens,
                       initial_state=initial_state)


def fla_available() -> bool:
    return torch.cuda.is_available() and _fla_ops_ready()


def resolve_backend(x: torch.Tensor, seq_len: int) -> str:
    name = current_backend()
    if name == "auto":
        if x.is_cuda and _fla_ops_ready():
            return "fla"
        # PyTorch: the recurrent loop for inference (on CPU it beats the chunked form ~4x at small head dims) and
        # for decoding steps; the chunked form for training (autograd through T recurrent steps costs far more).
        return "chunk" if torch.is_grad_enabled() and seq_len > 4 else "recurrent"
    if name == "fla" and not (x.is_cuda and _fla_ops_ready()):
        raise RuntimeError("KDA backend 'fla' needs CUDA tensors and flash-linear-attention (pip install gendistill[gpu])")
    return name


def l2norm(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """fla's L2 norm: x / sqrt(sum(x^2) + eps), in fp32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                       gate: torch.Tensor | None = None, activation: str = "sigmoid"):
    """weight * normalise(residual + x) over the last dim, times act(gate) if given; returns (y, residual + x) when
    `residual` is given, else y. Rounded to x's dtype after the add, the normalisation, the weight and the gate (as
    transformers' Qwen3RMSNorm; gendistill.kernels.norm's kernels are tested against it)."""
    h = x if residual is None else residual + x
    hf = h.float()
    y = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if gate is not None:
        act = torch.sigmoid(gate.float()) if activation == "sigmoid" else F.silu(gate.float())
        y = (y.float() * act).to(x.dtype)
    return y if residual is None else (y, h)


def kda_gate(f: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Channel-wise log-decay g = -exp(A_log[h]) * softplus(f + dt_bias), f: [..., HV, K], in fp32."""
    heads, dim = f.shape[-2:]
    return -A_log.float().exp()[:, None] * F.softplus(f.float() + dt_bias.float().view(heads, dim))


def kda_gated(q, k, v, f, b, A_log, dt_bias, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, qk_normalized=False):
    """KDA from raw projections: q, k [B,T,H,K] (not normalised unless `qk_normalized`); v [B,T,HV,V]; f [B,T,HV,K]
    gate pre-activation; b [B,T,HV] beta logits. Positions to skip (padding) carry f = b = -1e4 (no decay, no write) —
    exact on every path. Returns (o [B,T,HV,V], final state fp32 or None)."""
    backend = resolve_backend(q, q.shape[1])
    if backend == "fla":
        kw = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  use_qk_l2norm_in_kernel=not qk_normalized, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                  A_log=A_log, dt_bias=dt_bias, cu_seqlens=cu_seqlens)
        recurrent = q.shape[1] <= RECURRENT_MAX_STEPS and not torch.is_grad_enabled()
        return _fla_kda(q, k, v, f, b, recurrent, **kw)
    op = recurrent_kda if backend == "recurrent" else chunk_kda
    if not qk_normalized:
        q, k = l2norm(q), l2norm(k)
    return op(q, k, v, kda_gate(f, A_log, dt_bias), b.float().sigmoid(), scale=scale,
              initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)


@functools.cache
def _fla_mixer_ops(mixer: str):
    """fla's (chunk, fused recurrent) kernels of a linear mixer other than KDA, or None."""
    try:
        with fla_import():
            if mixer == "gdn":
                from fla.ops.gated_delta_rule import chunk_gated_delta_rule as chunk
                from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as recurrent
            elif mixer == "gla":
                from fla.ops.gla import chunk_gla as chunk, fused_recurrent_gla as recurrent
            else:
                from fla.ops.simple_gla import chunk_simple_gla as chunk, fused_recurrent_simple_gla as recurrent
    except Exception:  # ImportError, or triton failing to initialise
        return None
    return chunk, recurrent


def _fla_mixer(mixer: str, seq_len: int):
    """fla's kernel for `mixer` on a call of `seq_len` steps: fused recurrent for short inference (decoding), else
    chunked (as `kda_gated` picks)."""
    ops = _fla_mixer_ops(mixer)
    if ops is None:
        raise RuntimeError(f"flash-linear-attention's {mixer} kernels failed to import (pip install gendistill[gpu])")
    return ops[1] if seq_len <= RECURRENT_MAX_STEPS and not torch.is_grad_enabled() else ops[0]


@torch.compiler.assume_constant_result  # a constant of the process, as `_fla_ops_ready`
@functools.cache
def fla_gated_backward_refused() -> bool:
    """Whether fla refuses the backward of its scalar-gated chunk kernels here: fla 0.6.0's `chunk_bwd_dqkwg` (the
    backward of GDN's and simple GLA's, i.e. `gdn` and `mamba2` students) raises on Hopper GPUs with Triton >= 3.4.0
    and < 3.7.1, where that kernel gives wrong results (fla issue #640; found by `pytest -m gpu` on an H100 with Triton
    3.6.0). Read from fla's own flags, for the fla version where the check was seen; other versions decide alone."""
    try:
        with fla_import():
            import fla
            from fla import utils
    except Exception:  # not installed, or triton failing to initialise
        return False
    return (fla.__version__ == "0.6.0" and
            bool(utils.IS_NVIDIA_HOPPER and utils.TRITON_ABOVE_3_4_0 and not utils.TRITON_ABOVE_3_7_1))


@functools.cache
def _warn_gated_backward(mixer: str) -> None:
    warnings.warn(f"gendistill: fla's {mixer} kernels are turned off for training here: fla 0.6.0 refuses their "
                  "backward on Hopper GPUs with Triton < 3.7.1 (wrong results, fla issue #640). Training runs the "
                  "PyTorch chunked form (same results, slower; inference keeps fla's kernels). Triton >= 3.7.1 "
                  "turns them back on.", RuntimeWarning, stacklevel=3)


def _gated_mixer_backend(mixer: str, *inputs: torch.Tensor) -> str:
    """`resolve_backend` for `gdn` and `mamba2`, with fla's chunk kernels stepping aside where a backward will run
    and fla refuses it (`fla_gated_backward_refused`). A forced "fla" backend is left to fla's own error."""
    backend = resolve_backend(inputs[0], inputs[0].shape[1])
    if (backend == "fla" and current_backend() == "auto" and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in inputs) and fla_gated_backward_refused()):
        _warn_gated_backward(mixer)
        return "chunk"
    return backend


def gdn_gate(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Per-head log-decay g = -exp(A_log[h]) * softplus(a + dt_bias[h]), a: [..., HV], in fp32 (fla's GDN gate,
    and Mamba2's dt * A with dt = softplus(a + dt_bias))."""
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())


def gdn_gated(q, k, v, a, b, A_log, dt_bias, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None):
    """Gated DeltaNet from raw projections: KDA's contract with one forget gate per head. q, k [B,T,H,K] (not
    normalised); v [B,T,HV,V]; a [B,T,HV] gate pre-activation; b [B,T,HV] beta logits; A_log, dt_bias [HV]. Skipped
    positions carry a = b = -1e4 (no decay, no write). Returns (o [B,T,HV,V], final state fp32 or None)."""
    backend = _gated_mixer_backend("gdn", q, k, v, a, b, A_log, dt_bias, initial_state)
    if backend == "fla":
        return _fla_mixer("gdn", q.shape[1])(  # g, beta by name: fused_recurrent's fifth argument is gk
            q, k, v, g=a, beta=b, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
            use_beta_sigmoid_in_kernel=True, cu_seqlens=cu_seqlens)
    op = recurrent_kda if backend == "recurrent" else chunk_kda
    g = gdn_gate(a, A_log, dt_bias)
    return op(l2norm(q), l2norm(k), v, g[..., None].expand(*g.shape, q.shape[-1]), b.float().sigmoid(),
              scale=scale, initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def gla_gated(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Gated linear attention: q, k [B,T,H,K]; v [B,T,H,V]; g [B,T,H,K] the log forget gate (<= 0; 0 at skipped
    positions, whose v is 0). Returns (o [B,T,H,V], final state fp32 or None)."""
    backend = resolve_backend(q, q.shape[1])
    if backend == "fla":
        # the gate is the fourth argument of both kernels (chunk_gla's g, fused_recurrent_gla's gk)
        return _fla_mixer("gla", q.shape[1])(q, k, v, g, scale=scale, initial_state=initial_state,
                                             output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    op = recurrent_gla if backend == "recurrent" else chunk_gla
    return op(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens)


def ssd_gated(q, k, v, dt, A_log, dt_bias, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None):
    """Mamba2's SSD from raw projections, q = C, k = B, v = x (heads as Mamba2's, one state [K, V] per head):
        dt_t = softplus(dt + dt_bias);  S <- exp(-exp(A_log) dt_t) S + k_t (dt_t v_t)^T;  o_t = S^T (scale * q_t)
    (Mamba2's D skip is the caller's.) q, k [B,T,H,K]; v [B,T,H,V]; dt [B,T,H] pre-activation, -1e4 at skipped
    positions (no decay, no write). Returns (o [B,T,H,V], final state fp32 or None)."""
    step = F.softplus(dt.float() + dt_bias.float())
    g = -A_log.float().exp() * step
    v = (v.float() * step[..., None]).to(v.dtype)
    backend = _gated_mixer_backend("mamba2", q, k, v, g, initial_state)
    if backend == "fla":
        return _fla_mixer("mamba2", q.shape[1])(q, k, v, g=g, scale=scale, initial_state=initial_state,
                                                output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    op = recurrent_gla if backend == "recurrent" else chunk_gla
    return op(q, k, v, g[..., None].expand(*g.shape, q.shape[-1]), scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float, activation: str = "sigmoid"):
    """KDA's output path: RMSNorm over the last dim (x [..., D], shared weight [D]) times act(gate), in x's dtype.
    On CUDA with fla: fla's fused kernel; elsewhere the PyTorch definition (`rms_norm_reference`)."""
    if resolve_backend(x, x.shape[1] if x.dim() > 1 else 1) == "fla" and _fla_norm_ready():
        return _fla_gated_norm(x, gate, weight, eps, activation)
    return rms_norm_reference(x, weight, eps, gate=gate, activation=activation)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pos_in_doc: torch.Tensor | None):
    """Depthwise causal conv, the reference. x: [B, D, W-1+T] (W-1 steps of left context, then the T new steps),
    weight [D, 1, W]; returns [B, D, T]. `pos_in_doc` [B, T] (index of each step inside its document) hides taps that
    reach into a previous document."""
    if pos_in_doc is None:
        return F.conv1d(x, weight, bias, groups=weight.shape[0])
    W = weight.shape[-1]
    T = x.shape[-1] - (W - 1)
    out = 0
    for shift in range(W):  # tap W-1-shift looks `shift` steps back
        term = weight[:, 0, W - 1 - shift, None] * x[..., W - 1 - shift : W - 1 - shift + T]
        if shift:
            term = term * (pos_in_doc >= shift)[:, None, :]
        out = out + term
    return out if bias is None else out + bias[:, None]


def next_conv_context(context: torch.Tensor | None, x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The short conv's context after x [B, T, D]: the last W-1 inputs [B, D, W-1] (W = kernel_size), reaching into
    `context` (None: zeros) when T < W-1. With T >= W-1, a view of x (a cache copies it into its own buffer)."""
    B, T, D = x.shape
    if T >= kernel_size - 1:
        return x[:, T - (kernel_size - 1):].transpose(1, 2)
    context = x.new_zeros(B, D, kernel_size - 1) if context is None else context.to(x.dtype)
    return torch.cat([context, x.transpose(1, 2)], dim=-1)[..., -(kernel_size - 1):]


def short_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, context: torch.Tensor | None,
               activation: str = "identity", cu_seqlens: torch.Tensor | None = None,
               pos_in_doc: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """KDA's depthwise causal short convolution, time-major. x [B, T, D]; weight [D, 1, W]; `context` [B, D, W-1]: the
    previous W-1 inputs (None: zeros). Packed documents restart the conv: `cu_seqlens` (over B*T flattened) on the
    fla path, `pos_in_doc` [B, T] on the PyTorch path (give both). Returns (y [B, T, D], the new context [B, D, W-1]).
    On the fla path one Triton kernel reads x in place (no transposes, no padded copy); elsewhere F.conv1d."""
    B, T, D = x.shape
    W = weight.shape[-1]
    ctx = x.new_zeros(B, D, W - 1) if context is None else context.to(x.dtype)
    if resolve_backend(x, T) == "fla" and _fla_conv_ready():
        act = "silu" if activation == "silu" else None
        if cu_seqlens is not None:
            y, _ = _fla_short_conv(x.reshape(1, B * T, D), weight[:, 0], bias, act, cu_seqlens, None)
            y = y.reshape(B, T, D)
        else:  # fla's state holds the last W inputs; the kernel reads its last W-1
            y, _ = _fla_short_conv(x, weight[:, 0], bias, act, None,
                                   None if context is None else F.pad(ctx, (1, 0)).contiguous())
        return y, next_conv_context(ctx, x, W)
    conv_in = torch.cat([ctx, x.transpose(1, 2)], dim=-1)
    y = causal_conv(conv_in, weight, bias, pos_in_doc)
    if activation == "silu":
        y = F.silu(y)
    return y.transpose(1, 2), conv_in[..., -(W - 1):]
