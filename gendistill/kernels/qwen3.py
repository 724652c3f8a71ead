"""Fused inference kernels for Qwen3's own parts, on any model that has them (a stock Qwen3 teacher too): the
transformers modules are the reference, and each fused class overrides only `forward` (same parameters).
On CUDA with gradients off (`policy.enabled`), at every length, decoding included (on short inputs the GPU waits on
the host, so one launch through kernels.launch beats several eager kernels; on long ones the fewest bytes moved win):
- `FusedRMSNorm`: one launch of kernels.norm's kernel, optionally adding the residual in the same pass
  (`add_and_norm`), instead of transformers' six eager kernels with fp32 copies of the whole activation;
- `FusedMLP`: SiLU(gate) * up in one Triton pass (`swiglu`: fla's version was no faster than the two eager kernels at
  128K and once returned NaN in the benchmark's check; torch.compile's saved a tenth of its time), and beyond
  `kda_prefill_chunk` tokens in slices (each written into the output by its GEMM), so that the [T, intermediate]
  activations never exist whole.
Elsewhere, whenever gradients are on, and whenever a projection is not a plain nn.Linear (a PEFT adapter or any other
wrapper: its forward must run), they are exactly Qwen3RMSNorm and Qwen3MLP.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm

from gendistill.kernels import policy
from gendistill.kernels.launch import Launcher
from gendistill.kernels.norm import rms_norm

DEFAULT_CHUNK = 24576  # HybridKDAConfig.kda_prefill_chunk's default, for a stock Qwen3 with fused modules


def plain_linears(*modules: torch.nn.Module) -> bool:
    """Whether every module is exactly nn.Linear, so that reading its weight is the same as calling it. A PEFT
    adapter (or any wrapper or subclass) replaces the module: then the fast paths, which read weights to fuse or
    merge GEMMs, step aside for the module calls."""
    return all(type(m) is torch.nn.Linear for m in modules)


class FusedRMSNorm(Qwen3RMSNorm):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not policy.enabled(hidden_states, self.weight):
            return super().forward(hidden_states)
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + x, norm(residual + x)); one pass over the activations on the kernel's path."""
        if not policy.enabled(x, self.weight) or residual.dtype != x.dtype:
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
        if (not policy.enabled(x, self.gate_proj.weight) or self.config.hidden_act != "silu"
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
