"""Hybrid-KDA: a Qwen3 decoder in which some softmax-attention layers are replaced by Kimi Delta Attention.

Config/model pair in the transformers style. Attention layers, MLPs, norms and embeddings are Qwen3's own modules
(parameter names match Qwen3 checkpoints); only the token mixer of `"linear_attention"` layers differs: `KDAMixer`,
built as arXiv 2603.26556 builds it (teacher-shaped q/k/v/o, 8 k/v heads repeated to 16 at run time, identity-
initialised short convs with bias, channel-wise low-rank forget gate, per-head beta, gated RMSNorm output, NoPE).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel, Qwen3Config
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RMSNorm, Qwen3RotaryEmbedding

from gendistill.fused import FusedMLP, FusedRMSNorm, fuse_modules, linear_into
from gendistill.kda import (RECURRENT_MAX_STEPS, Conv, gated_rms_norm, kda_gated, kda_heads, kda_heads_fused,
                            next_conv_context, resolve_backend, short_conv)
from gendistill.kda.segments import SegmentedKDA

FULL, LINEAR = "full_attention", "linear_attention"
MASKED = -1e4  # gate and beta pre-activation at skipped positions: softplus and sigmoid give exactly 0 (no decay, no write)


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


class ShortConvolution(nn.Module):
    """Depthwise causal conv over time (weight [D, 1, W] like nn.Conv1d) that can restart at document starts."""

    def __init__(self, dim: int, kernel_size: int, bias: bool):
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None


class KDAMixer(nn.Module):
    """Kimi Delta Attention token mixer with the teacher attention's projection shapes."""

    def __init__(self, config: HybridKDAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.eps = config.rms_norm_eps
        hidden, H, Hkv, D = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        rank = config.kda_gate_rank or D
        self.conv_activation = config.kda_conv_activation
        self.output_gate = config.kda_output_gate

        self.q_proj = nn.Linear(hidden, H * D, bias=False)
        self.k_proj = nn.Linear(hidden, Hkv * D, bias=False)
        self.v_proj = nn.Linear(hidden, Hkv * D, bias=False)
        self.q_conv1d = ShortConvolution(H * D, config.kda_conv_size, config.kda_conv_bias)
        self.k_conv1d = ShortConvolution(Hkv * D, config.kda_conv_size, config.kda_conv_bias)
        self.v_conv1d = ShortConvolution(Hkv * D, config.kda_conv_size, config.kda_conv_bias)
        self.f_a_proj = nn.Linear(hidden, rank, bias=False)
        self.f_b_proj = nn.Linear(rank, H * D, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H * D))
        self.b_proj = nn.Linear(hidden, H, bias=False)
        self.g_a_proj = nn.Linear(hidden, rank, bias=False)
        self.g_b_proj = nn.Linear(rank, H * D, bias=True)
        self.o_norm = Qwen3RMSNorm(D, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(H * D, hidden, bias=False)
        self.prefill_chunk = config.kda_prefill_chunk
        self._kept = {}  # _kept_cat's merges: not parameters, not in the state dict

    def _merged_params(self):
        """Weights of projections that read the same input, side by side: [q | k | v] (projection and conv) and
        [f_a | g_a | b] (the gates' low-rank halves and beta). One GEMM and one conv call for each group cost the host
        fewer calls and the device no concatenation of activations. Inference keeps the small merges (the convs and
        the gates, 0.6 MB a layer of the 0.6B shape) while their parts are unchanged (`_kept_cat`); [q | k | v]
        (8 MB a layer) is concatenated per call."""
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        qkv = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        conv_weight = self._kept_cat("conv_weight", [c.weight for c in convs])
        conv_bias = None if convs[0].bias is None else self._kept_cat("conv_bias", [c.bias for c in convs])
        gates = self._kept_cat("gates", [self.f_a_proj.weight, self.g_a_proj.weight, self.b_proj.weight])
        return qkv, conv_weight, conv_bias, gates

    def _kept_cat(self, name: str, parts: list) -> torch.Tensor:
        """torch.cat(parts), kept between inference calls while no part has changed: a part's (storage, version)
        changes with every in-place update (optimizer steps, loads) and every move. Under autograd, cat per call."""
        if torch.is_grad_enabled():
            return torch.cat(parts)
        stamp = [(p.data_ptr(), p._version) for p in parts]
        kept = self._kept.get(name)
        if kept is None or kept[0] != stamp:
            kept = self._kept[name] = (stamp, torch.cat(parts))
        return kept[1]

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values: Cache | None = None,
                **kwargs):
        """attention_mask: 2-D padding mask of the current tokens ([B, T], 0 = pad) or None. Without a mask and
        without a cache (training), `position_ids` that restart mark packed documents: state and conv restart there.
        Long inference prefills run in segments of `prefill_chunk` tokens, carrying conv context and state, so
        activation memory stays bounded whatever the context length (`kda.segments.SegmentedKDA`: on CUDA each
        segment's state scan runs beside the next segment's parallel work)."""
        B, T, _ = hidden_states.shape
        cache = past_key_values
        pad = None if attention_mask is None else attention_mask[:, -T:].bool()
        doc_start = None
        if pad is None and position_ids is not None and T > 1 and cache is None:  # as transformers' packed masks
            doc_start = _document_starts(position_ids.expand(B, T))
        conv_context = cache.get_conv_state(self.layer_idx) if cache is not None else None
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        segment = T if torch.is_grad_enabled() or doc_start is not None else self.prefill_chunk
        params = self._merged_params()
        # GPU inference splits, repeats and normalises q/k in one Triton pass (kda/heads.py); training keeps autograd
        # through fla's own norms, the PyTorch paths normalise in `kda_gated`.
        normalized = not torch.is_grad_enabled() and resolve_backend(hidden_states, T) == "fla"
        # fla inference beyond a decode step goes through SegmentedKDA even in one segment: fla's stages called
        # directly cost the host less than its autograd wrapper (host-bound at a few thousand tokens).
        if segment >= T and not (normalized and doc_start is None and T > RECURRENT_MAX_STEPS):
            kda_in, gate_low, conv_context, cu_seqlens = self._inputs(hidden_states, pad, doc_start, conv_context,
                                                                       params, normalized, cache is not None)
            o, state = kda_gated(*kda_in, self.A_log, self.dt_bias, initial_state=state,
                                 output_final_state=cache is not None, cu_seqlens=cu_seqlens,
                                 qk_normalized=normalized)
            o = self._output(o, gate_low)
        else:
            o = hidden_states.new_empty(B, T, self.o_proj.out_features)
            kda = SegmentedKDA(self.A_log, self.dt_bias, state, normalized, hidden_states)
            for start in range(0, T, segment):
                part = slice(start, start + segment)
                kda_in, gate_low, conv_context, _ = self._inputs(hidden_states[:, part],
                                                                 None if pad is None else pad[:, part], None,
                                                                 conv_context, params, normalized,
                                                                 cache is not None or start + segment < T)
                for o_part, (gate_part, out_part) in kda.add(kda_in, tag=(gate_low, o[:, part])):
                    self._output(o_part, gate_part, out_part)
            for o_part, (gate_part, out_part) in kda.finish():
                self._output(o_part, gate_part, out_part)
            state = kda.state
        if cache is not None:
            cache.update_conv_state(conv_context, self.layer_idx, conv_kernel_size=conv_context.shape[-1])
            cache.update_recurrent_state(state.float(), self.layer_idx)
        return o, None

    def _inputs(self, x, pad, doc_start, conv_context, params, normalized: bool, keep_context: bool):
        """KDA's inputs for x (one segment, or the whole input): [q, k, v, f, b] (q and k L2-normalised when
        `normalized`), the output gate's low-rank half, the new conv context (may be None unless `keep_context`), and
        cu_seqlens for packed documents (then q..b are one flattened row)."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        cu_seqlens = pos_in_doc = None
        if doc_start is not None:  # packed documents: the kernels take the boundaries over the flattened batch
            starts = doc_start.clone()
            starts[:, 0] = True
            cu_seqlens = torch.cat([starts.reshape(-1).nonzero().squeeze(-1),
                                    torch.tensor([B * T], device=starts.device)])
            pos_in_doc = _position_in_document(doc_start)
        qkv_weight, conv_weight, conv_bias, gates_weight = params
        qkv = F.linear(x, qkv_weight)
        if pad is not None:  # a padded step must look like the zero left-padding of the sequence alone
            qkv = qkv * pad[..., None].to(qkv.dtype)
        # k/v keep the teacher's Hkv heads, repeated as GQA's repeat_kv.
        if normalized and cu_seqlens is None:  # the conv folded into the Triton head split
            conv = Conv(conv_weight, conv_bias, conv_context, self.conv_activation)
            q, k, v = kda_heads_fused(qkv, H, Hkv, D, True, conv)
            conv_context = next_conv_context(conv_context, qkv, conv_weight.shape[-1]) if keep_context else None
        else:
            qkv, conv_context = short_conv(qkv, conv_weight, conv_bias, conv_context, self.conv_activation,
                                           cu_seqlens, pos_in_doc)
            q, k, v = (kda_heads_fused if normalized else kda_heads)(qkv, H, Hkv, D, normalized)
        f_low, gate_low, b = F.linear(x, gates_weight).split([self.f_a_proj.out_features,
                                                              self.g_a_proj.out_features, H], dim=-1)
        f = self.f_b_proj(f_low).reshape(B, T, H, D)
        if pad is not None:
            f = f.masked_fill(~pad[..., None, None], MASKED)
            b = b.masked_fill(~pad[..., None], MASKED)
        if cu_seqlens is not None:
            q, k, v, f, b = (t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v, f, b))
        return [q, k, v, f, b], gate_low, conv_context, cu_seqlens

    def _output(self, o, gate_low, out=None):
        """The gated output norm and o_proj of KDA's output o; written into `out` (a slice of the whole prefill's
        output) when given."""
        B, T = gate_low.shape[:2]
        H, D = self.num_heads, self.head_dim
        o = o.reshape(B, T, H, D)
        gate = self.g_b_proj(gate_low.contiguous()).reshape(B, T, H, D)  # strided, the bias would be a separate add
        o = gated_rms_norm(o.to(gate_low.dtype), gate, self.o_norm.weight, self.o_norm.variance_epsilon,
                           self.output_gate)
        o = o.reshape(B, T, H * D)
        return self.o_proj(o) if out is None else linear_into(o, self.o_proj.weight, out)


def _document_starts(position_ids: torch.Tensor) -> torch.Tensor | None:
    """[B, T] bool, True where a new packed document begins after the first step (position does not go up by one);
    None when nothing is packed."""
    step = torch.diff(position_ids, dim=-1) != 1
    if not step.any():
        return None
    return F.pad(step, (1, 0), value=False)


def _position_in_document(doc_start: torch.Tensor) -> torch.Tensor:
    T = doc_start.shape[-1]
    idx = torch.arange(T, device=doc_start.device).expand_as(doc_start)
    start_idx = torch.where(doc_start, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - start_idx


class HybridKDADecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HybridKDAConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.self_attn = (Qwen3Attention if self.layer_type == FULL else KDAMixer)(config, layer_idx)
        fuse_modules(self.self_attn)  # attention's q/k norms + rotary in one kernel
        self.mlp = FusedMLP(config)
        self.input_layernorm = FusedRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = FusedRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states, normed = self.post_attention_layernorm.add_and_norm(hidden_states, residual)
        return hidden_states + self.mlp(normed)


class HybridKDAPreTrainedModel(PreTrainedModel):
    config: HybridKDAConfig
    config_class = HybridKDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridKDADecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _is_stateful = True
    _keep_in_fp32_modules_strict = ["A_log", "dt_bias"]  # the decay gate is computed in fp32 whatever the dtype

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ShortConvolution):
            # Identity init: only the last tap (the current step) is 1, so copied q/k/v pass through unchanged.
            weight = torch.zeros_like(module.weight)
            weight[..., -1] = 1.0
            init.copy_(module.weight, weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, KDAMixer):
            # Mamba-style: A ~ U[1, 16]; dt ~ logU[1e-3, 1e-1] stored as inverse softplus in dt_bias.
            init.copy_(module.A_log, torch.empty_like(module.A_log).uniform_(1, 16).log())
            dt = torch.exp(torch.empty_like(module.dt_bias).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
            init.copy_(module.dt_bias, dt + torch.log(-torch.expm1(-dt)))
            # Output gate starts constant: sigmoid(0) = 0.5, or silu(1.278) ~= 1 (identity gate).
            init.zeros_(module.g_b_proj.weight)
            init.constant_(module.g_b_proj.bias, 0.0 if module.output_gate == "sigmoid" else 1.278)


class HybridKDAModel(HybridKDAPreTrainedModel):
    def __init__(self, config: HybridKDAConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([HybridKDADecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = FusedRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def build_masks(self, inputs_embeds, attention_mask, past_key_values, position_ids) -> dict:
        """Per layer type: the causal (block-diagonal when packed) mask for attention, the 2-D padding mask of the
        current tokens for KDA (None when nothing is padded)."""
        if isinstance(attention_mask, dict):  # prepared by generate()
            return attention_mask
        full = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  past_key_values=past_key_values, position_ids=position_ids)
        linear = None
        if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
            linear = attention_mask[:, -inputs_embeds.shape[1]:]
        return {FULL: full, LINEAR: linear}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_hidden_states=None, **kwargs) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        # KDA layers restart at packed-document boundaries in the caller's position_ids. Finding them syncs with the
        # device, so it is done once here (not in every KDA layer) and only where a layer would use them.
        kda_position_ids = None
        if (position_ids is not None and past_key_values is None and attention_mask is None
                and inputs_embeds.shape[1] > 1
                and _document_starts(position_ids.expand(inputs_embeds.shape[:2])) is not None):
            kda_position_ids = position_ids
        if position_ids is None:
            past_seen = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = (torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen)[None]
        masks = self.build_masks(inputs_embeds, attention_mask, past_key_values, position_ids)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, attention_mask=masks[layer.layer_type],
                                  position_embeddings=position_embeddings,
                                  position_ids=kda_position_ids if layer.layer_type == LINEAR else position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache, **kwargs)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states,
                                       past_key_values=past_key_values if use_cache else None,
                                       hidden_states=tuple(all_hidden) if all_hidden is not None else None)


class HybridKDAForCausalLM(HybridKDAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridKDAConfig):
        super().__init__(config)
        self.model = HybridKDAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int | torch.Tensor = 0,
                output_hidden_states=None, **kwargs) -> CausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             output_hidden_states=output_hidden_states, **kwargs)
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states)


AutoConfig.register(HybridKDAConfig.model_type, HybridKDAConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridKDAConfig, HybridKDAForCausalLM, exist_ok=True)


# ---- parameter groups (used by the distillation stages to freeze/train parts of any Qwen3-like model) ----
PARAMETER_GROUPS = ("kda", "attention", "mlp", "norms", "embeddings")
_NO_DECAY_SUFFIXES = ("A_log", "dt_bias", "bias")


def parameter_group(model: nn.Module, name: str) -> str:
    """Which trainable group a parameter belongs to: kda | attention | mlp | norms | embeddings."""
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
    """A_log, dt_bias, every norm weight and every bias are excluded from weight decay."""
    parts = name.split(".")
    return name.endswith(_NO_DECAY_SUFFIXES) or any(p.endswith("norm") or p.endswith("layernorm") for p in parts[:-1])

