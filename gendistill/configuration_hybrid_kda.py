"""The Hybrid-KDA configuration: Qwen3's, plus which layers are linear, which linear mixer each one runs (KDA by
default; Gated DeltaNet, GLA or Mamba2's SSD) and the mixers' options.

Shipped inside every student directory (with `modeling_hybrid_kda.py`), so it imports only transformers and its
siblings (relative imports): `gendistill.hub` copies this file unchanged.
"""
from transformers import Qwen3Config

FULL, LINEAR = "full_attention", "linear_attention"
ATTENTION = "attention"  # the mixer of a full-attention layer, in `layer_mixers`
MIXERS = ("kda", "gdn", "gla", "mamba2")  # linear mixers (modeling_hybrid_kda.linear_mixer_class)


class HybridKDAConfig(Qwen3Config):
    """Qwen3Config plus the linear mixers' options. `layer_types[i]` is "full_attention" or "linear_attention" (what
    transformers' caches read: a linear layer keeps a conv context and a recurrent state, whatever its mixer); the
    mixer of a linear layer is `mixer_types[i]` when given, else `linear_mixer` (configs written before other mixers
    existed have neither: every linear layer is KDA). The `kda_conv_*`, `kda_gate_rank` and `kda_output_gate`
    options shape every linear mixer (their short convs, low-rank gates and gated output norm are KDA's)."""

    model_type = "hybrid_kda"

    kda_conv_size: int = 4
    kda_conv_bias: bool = True
    kda_conv_activation: str = "identity"  # the paper's choice; "silu" is fla/Kimi's
    kda_gate_rank: int | None = None  # low rank of the forget and output gates; None -> head_dim
    kda_output_gate: str = "sigmoid"  # "sigmoid" | "silu"
    kda_prefill_chunk: int = 24576  # long inference prefills run KDA layers (and MLPs) in segments of this many tokens
    number_of_conv_states: int = 1  # read by transformers' LinearAttentionLayer: q, k, v share one conv state
    linear_mixer: str = "kda"  # the mixer of every linear layer that `mixer_types` does not name: one of MIXERS
    mixer_types: list[str] | None = None  # per layer: "attention" for full-attention layers, a MIXERS name otherwise
    gla_gate_normalizer: float = 16.0  # GLA's log forget gate is logsigmoid(.) / this (fla's gate_logit_normalizer)

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.kda_conv_activation not in ("identity", "silu"):
            raise ValueError(f"kda_conv_activation must be 'identity' or 'silu', got {self.kda_conv_activation!r}")
        if self.kda_output_gate not in ("sigmoid", "silu"):
            raise ValueError(f"kda_output_gate must be 'sigmoid' or 'silu', got {self.kda_output_gate!r}")
        bad = sorted(set(self.layer_types) - {FULL, LINEAR})
        if bad:
            raise ValueError(f"layer_types may only hold {FULL!r} and {LINEAR!r}, got {bad}")
        if self.linear_mixer not in MIXERS:
            raise ValueError(f"linear_mixer must be one of {MIXERS}, got {self.linear_mixer!r}")
        if self.mixer_types is not None:
            if len(self.mixer_types) != len(self.layer_types):
                raise ValueError(f"mixer_types needs one entry per layer ({len(self.layer_types)}), got "
                                 f"{len(self.mixer_types)}")
            for i, (kind, mixer) in enumerate(zip(self.layer_types, self.mixer_types)):
                allowed = (ATTENTION,) if kind == FULL else MIXERS
                if mixer not in allowed:
                    raise ValueError(f"mixer_types[{i}] of a {kind!r} layer must be one of {allowed}, got {mixer!r}")
        if not self.gla_gate_normalizer > 0:
            raise ValueError(f"gla_gate_normalizer must be positive, got {self.gla_gate_normalizer!r}")

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == FULL]

    @property
    def layer_mixers(self) -> list[str]:
        """Each layer's token mixer: "attention", or the name of its linear mixer (one of MIXERS)."""
        if self.mixer_types is not None:
            return list(self.mixer_types)
        return [ATTENTION if t == FULL else self.linear_mixer for t in self.layer_types]
