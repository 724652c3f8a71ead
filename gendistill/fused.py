"""Fused inference kernels for Qwen3's own parts (RMSNorm, MLP, attention's q/k norms and rotary embedding); the
transformers modules are the reference. On CUDA with gradients off (`kernel_inference`), at every length, decoding
included (on short inputs the GPU waits on the host, so one launch through gendistill.launch beats several eager
kernels; on long ones the fewest bytes moved win, and these move the fewest):
- `FusedRMSNorm`: one launch of gendistill.norm's kernel, optionally adding the residual in the same pass, instead of
  transformers' six eager kernels with fp32 copies of the whole activation;
- `FusedMLP`: SiLU(gate) * up in one Triton pass (`swiglu`: fla's version was no faster than the two eager kernels at
  128K on the H200 and once returned NaN in the benchmark's check; torch.compile's saved 2.5 of 28 ms), and beyond
  `kda_prefill_chunk` tokens in slices (each written into the output by its GEMM), so that the [T, intermediate]
  activations never exist whole;
- `FusedQwen3Attention`: q_norm, k_norm and the rotary embedding of q and k in one launch (`norm.qk_norm_rotary`)
  where transformers' form costs ~14 eager kernels and makes five whole-size temporaries of q (the 128K prefill's
  memory peak; ~5 ms per layer there).
Elsewhere, whenever gradients are on, and whenever a projection is not a plain nn.Linear (a PEFT adapter or any
other wrapper: its forward must run), they are exactly Qwen3RMSNorm, Qwen3MLP and Qwen3Attention. Parameter names
are unchanged, so `fuse_modules` can also swap them into a stock Qwen3 (the kernel profile does, to show what the
kernels alone are worth to the teacher); gendistill.modeling swaps them (and its KDA mixer) into the reference model.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3MLP, Qwen3RMSNorm, eager_attention_forward

from gendistill.kda import current_backend, gated_rms_norm
from gendistill import norm
from gendistill.launch import Launcher
from gendistill.norm import available as norm_kernels_available, qk_norm_rotary, rms_norm

DEFAULT_CHUNK = 24576  # HybridKDAConfig.kda_prefill_chunk's default, for a stock Qwen3 with fused modules


def kernel_inference(x: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether inference on `x` runs gendistill's own Triton kernels (gendistill.norm, this module, the KDA head
    split): CUDA, gradients off (training keeps transformers' and fla's autograd), no PyTorch KDA path forced (the
    reference), and `weight` (if given) of x's dtype (the kernels write x's dtype; the references promote to the
    weight's)."""
    return (x.is_cuda and not torch.is_grad_enabled() and current_backend() in ("auto", "fla")
            and (weight is None or weight.dtype == x.dtype) and norm_kernels_available())


def plain_linears(*modules: torch.nn.Module) -> bool:
    """Whether every module is exactly nn.Linear, so that reading its weight is the same as calling it. A PEFT
    adapter (or any wrapper or subclass) replaces the module: then the fast paths, which read weights to fuse or
    merge GEMMs, step aside for the module calls."""
    return all(type(m) is torch.nn.Linear for m in modules)


def gated_output_norm(x, gate, weight, eps: float, activation: str = "sigmoid"):
    """KDA's gated output norm (`kda.gated_rms_norm`); in GPU inference one launch of gendistill.norm's kernel."""
    if kernel_inference(x, weight):
        return norm.rms_norm(x, weight, eps, gate=gate, activation=activation)
    return gated_rms_norm(x, gate, weight, eps, activation)


class FusedRMSNorm(Qwen3RMSNorm):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not kernel_inference(hidden_states, self.weight):
            return super().forward(hidden_states)
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + x, norm(residual + x)); one pass over the activations on the kernel's path."""
        if not kernel_inference(x, self.weight) or residual.dtype != x.dtype:
            hidden_states = residual + x
            return hidden_states, super().forward(hidden_states)
        normed, hidden_states = rms_norm(x, self.weight, self.variance_epsilon, residual=residual)
        return hidden_states, normed


@functools.cache
def _swiglu_kernel():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["rows"])  # one compiled kernel for every length; width keeps loads vectorised
    def swiglu_kernel(gate, up, out, rows, width, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = (r < rows)[:, None] & (c < width)[None, :]
        at = r[:, None] * width + c[None, :]
        g = tl.load(gate + at, mask=mask).to(tl.float32)
        u = tl.load(up + at, mask=mask).to(tl.float32)
        tl.store(out + at, (g * tl.sigmoid(g) * u).to(out.dtype.element_ty), mask=mask)

    return Launcher(swiglu_kernel)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up in one Triton pass, in fp32 and rounded once (Qwen3MLP's eager form rounds SiLU's output too
    and writes it whole before the product)."""
    gate, up = gate.contiguous(), up.contiguous()
    width = gate.shape[-1]
    out = torch.empty_like(gate)
    rows, block = out.numel() // width, min(1024, 1 << (width - 1).bit_length())
    per_program = max(1, 4096 // block)
    _swiglu_kernel()((-(-rows // per_program), -(-width // block)), gate=gate, up=up, out=out, rows=rows,
                     width=width, ROWS=per_program, BLOCK=block, num_warps=8)
    return out


class FusedMLP(Qwen3MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not kernel_inference(x, self.gate_proj.weight) or self.config.hidden_act != "silu"
                or not plain_linears(self.gate_proj, self.up_proj, self.down_proj)):
            return super().forward(x)
        chunk = getattr(self.config, "kda_prefill_chunk", None) or DEFAULT_CHUNK
        T = x.shape[-2]
        if T <= chunk:
            return self._fused_forward(x)
        out = x.new_empty(*x.shape[:-1], self.down_proj.out_features)
        for start in range(0, T, chunk):
            part = (..., slice(start, start + chunk), slice(None))
            self._fused_forward(x[part], out[part])
        return out

    def _fused_forward(self, x, out=None) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_proj.weight), F.linear(x, self.up_proj.weight)  # Qwen3's MLP has no biases
        return linear_into(swiglu(gate, up), self.down_proj.weight, out)


def linear_into(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T, written into `out` when given: the GEMM writes a contiguous slice of a larger output itself (no
    copy); a strided one (batch > 1, sliced along time) takes a copy. Gradients off."""
    shape = (*x.shape[:-1], weight.shape[0])
    into = None if out is None or not out.is_contiguous() else out.view(-1, shape[-1])
    y = torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out=into)
    if out is None:
        return y.view(shape)
    return out if into is not None else out.copy_(y.view(shape))


class FusedQwen3Attention(Qwen3Attention):
    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        cos, sin = position_embeddings  # [1 or B, T, head_dim], the two halves repeated
        if (not kernel_inference(hidden_states, self.q_norm.weight) or self.training
                or cos.shape[0] not in (1, hidden_states.shape[0]) or cos.shape[-1] != self.head_dim
                or self.head_dim & (self.head_dim - 1)):  # the kernel: whole-head rotation, D a power of two
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states, key_states = qk_norm_rotary(
            self.q_proj(hidden_states).view(hidden_shape), self.k_proj(hidden_states).view(hidden_shape),
            self.q_norm.weight, self.k_norm.weight, self.q_norm.variance_epsilon, cos, sin)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        attn_output, attn_weights = attention(self, query_states, key_states, value_states, attention_mask,
                                              dropout=0.0, scaling=self.scaling, sliding_window=self.sliding_window,
                                              **kwargs)
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous()), attn_weights


FUSED_CLASSES = {Qwen3RMSNorm: FusedRMSNorm, Qwen3MLP: FusedMLP, Qwen3Attention: FusedQwen3Attention}


def fuse_modules(module: torch.nn.Module, classes: dict | None = None) -> torch.nn.Module:
    """Swap every module inside `module` (in place) whose exact type is a key of `classes` (default: Qwen3RMSNorm,
    Qwen3MLP, Qwen3Attention) for its fused subclass, the value (same parameters); returns `module`."""
    classes = FUSED_CLASSES if classes is None else classes
    for m in module.modules():
        if type(m) in classes:
            m.__class__ = classes[type(m)]
    return module
