"""Fused inference kernels for Qwen3's own parts (RMSNorm, the SwiGLU MLP); the transformers modules are the reference.

On CUDA with flash-linear-attention and gradients off (prefill, decode, evaluation: `kda.fused_inference`),
`FusedRMSNorm` runs fla's one-pass Triton RMSNorm, optionally adding the residual in the same pass, instead of
transformers' six eager kernels with fp32 copies of the whole activation, and `FusedMLP` runs fla's fused SiLU(gate)*up
and, beyond `kda_prefill_chunk` tokens, works in slices so that the [T, intermediate] activations never exist whole
(the prefill's memory peak). Elsewhere, and whenever gradients are on, they are exactly Qwen3RMSNorm and Qwen3MLP.
Parameter names are unchanged, so `fuse_modules` can also swap them into a stock Qwen3 (the kernel profile does, to
show what the kernels alone are worth to the teacher).
"""
from __future__ import annotations

import torch
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm

from gendistill.kda import fla_module_ops, fused_inference

DEFAULT_CHUNK = 16384


class FusedRMSNorm(Qwen3RMSNorm):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not fused_inference(hidden_states):
            return super().forward(hidden_states)
        rms_norm, _ = fla_module_ops()
        return rms_norm(hidden_states, self.weight, None, eps=self.variance_epsilon)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + x, norm(residual + x)); one pass over the activations on the fused path."""
        if not fused_inference(x):
            hidden_states = residual + x
            return hidden_states, super().forward(hidden_states)
        rms_norm, _ = fla_module_ops()
        normed, hidden_states = rms_norm(x, self.weight, None, residual=residual, prenorm=True,
                                         eps=self.variance_epsilon)
        return hidden_states, normed


class FusedMLP(Qwen3MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused_inference(x) or self.config.hidden_act not in ("silu", "swish"):
            return super().forward(x)
        _, swiglu = fla_module_ops()
        chunk = getattr(self.config, "kda_prefill_chunk", None) or DEFAULT_CHUNK
        T = x.shape[-2]
        if T <= chunk:
            return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
        out = x.new_empty(*x.shape[:-1], self.down_proj.out_features)
        for start in range(0, T, chunk):
            part = x[..., start:start + chunk, :]
            out[..., start:start + chunk, :] = self.down_proj(swiglu(self.gate_proj(part), self.up_proj(part)))
        return out


def fuse_modules(module: torch.nn.Module) -> torch.nn.Module:
    """Swap every Qwen3RMSNorm / Qwen3MLP inside `module` (in place) for its fused subclass; returns `module`."""
    for m in module.modules():
        if type(m) is Qwen3RMSNorm:
            m.__class__ = FusedRMSNorm
        elif type(m) is Qwen3MLP:
            m.__class__ = FusedMLP
    return module
