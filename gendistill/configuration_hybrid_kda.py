"""The Hybrid-KDA configuration: Qwen3's, plus which layers are KDA and the KDA mixer's options.

Shipped inside every student directory (with `modeling_hybrid_kda.py`), so it imports only transformers and its
siblings (relative imports): `gendistill.hub` copies this file unchanged.
"""
from transformers import Qwen3Config

FULL, LINEAR = "full_attention", "linear_attention"


class HybridKDAConfig(Qwen3Config):
    """Qwen3Config plus the KDA mixer options. `layer_types[i]` is "full_attention" or "linear_attention"."""

    model_type = "hybrid_kda"

    kda_conv_size: int = 4
    kda_conv_bias: bool = True
    kda_conv_activation: str = "identity"  # the paper's choice; "silu" is fla/Kimi's
    kda_gate_rank: int | None = None  # low rank of the forget and output gates; None -> head_dim
    kda_output_gate: str = "sigmoid"  # "sigmoid" | "silu"
    kda_prefill_chunk: int = 24576  # long inference prefills run KDA layers (and MLPs) in segments of this many tokens
    number_of_conv_states: int = 1  # read by transformers' LinearAttentionLayer: q, k, v share one conv state

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.kda_conv_activation not in ("identity", "silu"):
            raise ValueError(f"kda_conv_activation must be 'identity' or 'silu', got {self.kda_conv_activation!r}")
        if self.kda_output_gate not in ("sigmoid", "silu"):
            raise ValueError(f"kda_output_gate must be 'sigmoid' or 'silu', got {self.kda_output_gate!r}")
        bad = sorted(set(self.layer_types) - {FULL, LINEAR})
        if bad:
            raise ValueError(f"layer_types may only hold {FULL!r} and {LINEAR!r}, got {bad}")

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL]
