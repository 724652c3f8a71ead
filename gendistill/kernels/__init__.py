"""gendistill's inference kernels, fenced off from the models: the model files (`modeling_hybrid_kda`,
transformers' Qwen3) are the reference, and `fuse(model)` is the one call that swaps the fused subclasses in.

    kernels.fuse(model)                          # in place; same parameters, same state dict
    with kernels.use(kernels=False): ...         # every fused module runs its reference path
    with kernels.use(direct_launch=False): ...   # kernels through Triton's / fla's own launchers

Where each concern lives (each fast path beside, or tested against, its reference):
- policy.py: when the kernels run (CUDA, no gradients, not turned off); compat.py: the exact Triton and fla versions
  whose internals the direct launches drive, with a warning when a path is turned off;
- qwen3.py: Qwen3's RMSNorm and MLP (reference: transformers' modules), for any Qwen3-shaped model;
- hybrid.py: the Hybrid-KDA attention's q/k norm + rotary, the KDA mixer, the decoder layer's residual + norm
  (reference: modeling_hybrid_kda);
- norm.py, heads.py: gendistill's Triton kernels (one-launch RMSNorms; KDA's q/k/v head split with the short conv),
  each with its PyTorch definition beside it; segments.py: long prefills in segments over fla's KDA stages;
- launch.py: Triton launches without Triton's per-call Python.
`gendistill.modeling.HybridKDAForCausalLM` calls `fuse` when it is built; `fuse` also applies to a stock Qwen3.
"""
from __future__ import annotations

from torch import nn

from gendistill.kernels.policy import use

__all__ = ["fuse", "use"]


def _fused_classes() -> dict:
    """reference class -> fused subclass; imported on use, so that importing gendistill.kernels loads no model code."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm

    from gendistill import modeling_hybrid_kda as reference
    from gendistill.kernels.hybrid import FusedAttention, FusedDecoderLayer, FusedKDAMixer
    from gendistill.kernels.qwen3 import FusedMLP, FusedRMSNorm

    return {Qwen3RMSNorm: FusedRMSNorm, Qwen3MLP: FusedMLP, reference.HybridKDAAttention: FusedAttention,
            reference.KDAMixer: FusedKDAMixer, reference.HybridKDADecoderLayer: FusedDecoderLayer}


def fuse(model: nn.Module) -> nn.Module:
    """Swap the fused subclass in for every module of `model` whose exact class has one (in place: the class changes,
    the parameters and buffers stay, as torch's parametrizations do); returns `model`. Modules of other classes (a
    PEFT wrapper, a subclass of a user's own) are left as they are and run their own forward."""
    classes = _fused_classes()
    for module in model.modules():
        fused = classes.get(type(module))
        if fused is not None:
            module.__class__ = fused
    return model
