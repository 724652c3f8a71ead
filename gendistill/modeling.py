"""gendistill's Hybrid-KDA model: the reference model (`modeling_hybrid_kda`, which every student directory ships) with
gendistill's inference kernels swapped in when it is built (`gendistill.kernels.fuse`; same parameters, same outputs,
the tests hold them to the reference's), registered with transformers' Auto classes; and what the distillation
stages need to know about any Qwen3-shaped model: its parameter groups and its cache size.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from gendistill import kernels
from gendistill import modeling_hybrid_kda as reference
from gendistill.configuration_hybrid_kda import FULL, LINEAR, HybridKDAConfig
from gendistill.modeling_hybrid_kda import HybridKDAModel, HybridKDAPreTrainedModel

__all__ = ["HybridKDAConfig", "HybridKDAForCausalLM", "HybridKDAModel", "HybridKDAPreTrainedModel", "FULL", "LINEAR",
           "parameter_group", "no_weight_decay", "cache_bytes"]


def cache_bytes(config, context: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the decoding cache after a prefill of `context` tokens, for a Qwen3 config (all layers attention) or
    a HybridKDAConfig. Attention layer: K and V, 2 * Hkv * head_dim per token in `dtype`. KDA layer, independent of
    the context: the fp32 recurrent state H * head_dim^2 and the short conv's last conv_size - 1 inputs of the
    q, k, v channels ((H + 2 * Hkv) * head_dim: q at H heads, k/v at Hkv) in `dtype`. The bench checks these
    against the bytes transformers' cache objects hold."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    types = list(getattr(config, "layer_types", None) or [FULL] * config.num_hidden_layers)
    unknown = sorted(set(types) - {FULL, LINEAR})
    if unknown:
        raise ValueError(f"cache_bytes knows {FULL!r} and {LINEAR!r} layers only, the config has {unknown}")
    total = types.count(FULL) * 2 * kv_heads * head_dim * context * dtype.itemsize
    if LINEAR in types:
        conv = (heads + 2 * kv_heads) * head_dim * (config.kda_conv_size - 1) * dtype.itemsize
        total += types.count(LINEAR) * (heads * head_dim * head_dim * 4 + conv)
    return batch * total



class HybridKDAForCausalLM(reference.HybridKDAForCausalLM):
    """The reference causal LM built with gendistill's inference kernels (`kernels.fuse`)."""

    def __init__(self, config: HybridKDAConfig):
        super().__init__(config)
        kernels.fuse(self)


AutoConfig.register(HybridKDAConfig.model_type, HybridKDAConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridKDAConfig, HybridKDAForCausalLM, exist_ok=True)


# ---- parameter groups (used by the distillation stages to freeze/train parts of any Qwen3-like model) ----
PARAMETER_GROUPS = ("kda", "attention", "mlp", "norms", "embeddings")
_NO_DECAY_SUFFIXES = ("A_log", "dt_bias", "bias", ".D")  # .D: Mamba2's skip (linear_mixers.py)


def parameter_group(model: nn.Module, name: str) -> str:
    """Which trainable group a parameter belongs to: kda | attention | mlp | norms | embeddings. `kda` holds every
    linear mixer's parameters, whichever the mixer (KDA, GDN, GLA, Mamba2: configuration_hybrid_kda.MIXERS)."""
    parts = name.split(".")
    if "embed_tokens" in parts or parts[0] == "lm_head":
        return "embeddings"
    if "layers" in parts:
        layer_idx = int(parts[parts.index("layers") + 1])
        layer_types = getattr(model.config, "layer_types", None) or [FULL] * model.config.num_hidden_layers
        if "self_attn" in parts:
            return "kda" if layer_types[layer_idx] == LINEAR else "attention"
        if "mlp" in parts:
            return "mlp"
    if any(p.endswith("norm") or p.endswith("layernorm") for p in parts):
        return "norms"
    raise ValueError(f"parameter {name!r} belongs to no known group {PARAMETER_GROUPS}")


ATTENTION_BLOCK = "attention_block"  # overlaps the groups above: see block_groups


def block_groups(model: nn.Module, name: str) -> tuple[str, ...]:
    """The overlapping groups a parameter is also in: ("attention_block",) for a softmax-attention layer's self_attn
    and its input_layernorm (that norm feeds only the attention; post_attention_layernorm feeds the MLP), else ().
    Freezing `attention` leaves the input_layernorm training (it is in `norms`); freezing `attention_block` does not."""
    parts = name.split(".")
    if "layers" not in parts or not ({"self_attn", "input_layernorm"} & set(parts)):
        return ()
    layer_types = getattr(model.config, "layer_types", None) or [FULL] * model.config.num_hidden_layers
    return (ATTENTION_BLOCK,) if layer_types[int(parts[parts.index("layers") + 1])] == FULL else ()


def no_weight_decay(name: str) -> bool:
    """A_log, dt_bias, Mamba2's D, every norm weight and every bias are excluded from weight decay."""
    parts = name.split(".")
    return name.endswith(_NO_DECAY_SUFFIXES) or any(p.endswith("norm") or p.endswith("layernorm") for p in parts[:-1])

