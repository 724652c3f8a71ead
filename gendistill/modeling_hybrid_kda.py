"""Hybrid-KDA: a Qwen3 decoder in which some softmax-attention layers are replaced by Kimi Delta Attention.

This file is the reference model, in the style of transformers' modeling_qwen3.py and fla's layers/kda.py: every
projection is a module whose forward is called (PEFT adapters and other wrappers take effect), no weight is merged
or cached. Attention layers, MLPs, norms and embeddings are Qwen3's own (parameter names match Qwen3 checkpoints;
`HybridKDAAttention` is Qwen3's attention with its q/k norm + rotary step named); only the token mixer of
`"linear_attention"` layers differs: `KDAMixer`, built as arXiv 2603.26556 builds it (teacher-shaped q/k/v/o, k/v
heads repeated to the q heads at run time, identity-initialised short convs with bias, channel-wise low-rank forget
gate, per-head beta, gated RMSNorm output, NoPE). A config may give linear layers another mixer
(`HybridKDAConfig.linear_mixer` / `mixer_types`: Gated DeltaNet, GLA, Mamba2's SSD), built in the same frame in
linear_mixers.py (`linear_mixer_class`).

It is shipped unchanged inside every student directory (`gendistill.hub`), beside configuration_hybrid_kda.py and
the KDA ops (kda.py, naive.py, chunk.py: pure PyTorch, fla's kernels on CUDA when fla is installed) and
linear_mixers.py, so it imports only torch, transformers and its siblings. gendistill's inference kernels
(`gendistill.kernels`) subclass these, overriding only their hot steps; their outputs are tested equal.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3.modeling_qwen3 import (Qwen3Attention, Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding,
                                                      apply_rotary_pos_emb, eager_attention_forward)

from .configuration_hybrid_kda import FULL, LINEAR, HybridKDAConfig
from .kda import kda_gated
from .linear_mixers import LINEAR_MIXERS, MASKED, LinearMixer, ShortConvolution, init_decay, packed_documents

class KDAMixer(LinearMixer):
    """Kimi Delta Attention token mixer with the teacher attention's projection shapes: the linear mixers' frame
    (`linear_mixers.LinearMixer`: q/k/v projections and short convs, output gate, gated norm, cache) around KDA's
    channel-wise low-rank forget gate and per-head beta."""

    def __init__(self, config: HybridKDAConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.eps = config.rms_norm_eps
        self.conv_activation = config.kda_conv_activation
        self.prefill_chunk = config.kda_prefill_chunk  # read by gendistill's segmented inference path

    def build_gates(self, config):
        hidden, H, D, rank = config.hidden_size, self.num_heads, self.head_dim, self.gate_rank
        self.f_a_proj = nn.Linear(hidden, rank, bias=False)
        self.f_b_proj = nn.Linear(rank, H * D, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H * D))
        self.b_proj = nn.Linear(hidden, H, bias=False)

    def gates(self, x, pad):
        B, T, _ = x.shape
        f = self.f_b_proj(self.f_a_proj(x)).reshape(B, T, self.num_heads, self.head_dim)
        b = self.b_proj(x)
        if pad is not None:
            f = f.masked_fill(~pad[..., None, None], MASKED)
            b = b.masked_fill(~pad[..., None], MASKED)
        return [f, b]

    def init_gates(self):
        init_decay(self.A_log, self.dt_bias)

    def recurrence(self, q, k, v, gates, state, output_final_state, cu_seqlens):
        f, b = gates
        return kda_gated(q, k, v, f, b, self.A_log, self.dt_bias, initial_state=state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens)


class HybridKDAAttention(Qwen3Attention):
    """Qwen3's attention (same parameters, same computation as transformers' modeling_qwen3.py), with the q/k norms
    and the rotary embedding as one step, `norm_and_rotate`, so that a fused kernel can replace that step alone."""

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states, key_states = self.norm_and_rotate(self.q_proj(hidden_states).view(hidden_shape),
                                                        self.k_proj(hidden_states).view(hidden_shape),
                                                        position_embeddings)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                    eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
            sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous()), attn_weights

    def norm_and_rotate(self, q, k, position_embeddings):
        """q and k as projected ([B, T, heads, head_dim]) -> normed and rotated, [B, heads, T, head_dim]."""
        cos, sin = position_embeddings
        return apply_rotary_pos_emb(self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2), cos, sin)


def linear_mixer_class(name: str) -> type[nn.Module]:
    """The token-mixer class of a linear layer whose mixer is `name` (configuration_hybrid_kda.MIXERS): KDAMixer, or
    one of linear_mixers.py's."""
    return KDAMixer if name == "kda" else LINEAR_MIXERS[name]


class HybridKDADecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: HybridKDAConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        mixer = HybridKDAAttention if self.layer_type == FULL else linear_mixer_class(config.layer_mixers[layer_idx])
        self.self_attn = mixer(config, layer_idx)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

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
        hidden_states, normed = self.residual_and_norm(hidden_states, residual)
        return hidden_states + self.mlp(normed)

    def residual_and_norm(self, hidden_states, residual):
        """(residual + attention output, its post-attention norm): one step, so a fused kernel can replace both."""
        hidden_states = residual + hidden_states
        return hidden_states, self.post_attention_layernorm(hidden_states)


class LinearStateCache(DynamicCache):
    """The DynamicCache of a model without attention layers. transformers' DynamicCache reads its length from an
    attention layer (a pure-linear one raises), and generate() needs it: this one counts the steps the model has run
    through it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.steps


def new_cache(config: HybridKDAConfig) -> DynamicCache:
    """An empty decoding cache for `config`: DynamicCache, or LinearStateCache when no layer is attention."""
    return (DynamicCache if FULL in config.layer_types else LinearStateCache)(config=config)


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
        elif isinstance(module, LinearMixer):  # KDA's and the other mixers' gates and output gate
            module.init_mixer_weights()


class HybridKDAModel(HybridKDAPreTrainedModel):
    def __init__(self, config: HybridKDAConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([HybridKDADecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = Qwen3RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def build_masks(self, inputs_embeds, attention_mask, past_key_values, position_ids) -> dict:
        """Per layer type: the causal (block-diagonal when packed) mask for attention, the 2-D padding mask of the
        current tokens for KDA (None when nothing is padded)."""
        if isinstance(attention_mask, dict):  # prepared by generate()
            return attention_mask
        full = None if FULL not in self.config.layer_types else create_causal_mask(  # none in a pure-linear model
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
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
            past_key_values = new_cache(self.config)
        # KDA layers restart at packed-document boundaries in the caller's position_ids. Finding them syncs with the
        # device, so it is done once here (not in every KDA layer) and only where a layer would use them; the layers
        # get the result (`kda_packing`), which also keeps data-dependent code out of a compiled layer.
        kda_position_ids, kda_packing = None, {}
        if (position_ids is not None and past_key_values is None and attention_mask is None
                and inputs_embeds.shape[1] > 1):
            packing = packed_documents(position_ids.expand(inputs_embeds.shape[:2]))
            if packing[0] is not None:
                kda_position_ids, kda_packing = position_ids, {"kda_packing": packing}
        if position_ids is None:  # for RoPE: a cache of linear layers alone has no length (and nothing reads them)
            has_length = past_key_values is not None and FULL in self.config.layer_types
            past_seen = past_key_values.get_seq_length() if has_length else 0
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
                                  past_key_values=past_key_values, use_cache=use_cache,
                                  **(kda_packing if layer.layer_type == LINEAR else {}), **kwargs)
        hidden_states = self.norm(hidden_states)
        if isinstance(past_key_values, LinearStateCache):
            past_key_values.steps += inputs_embeds.shape[1]
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

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate()'s cache: transformers' choice, except a LinearStateCache for its default DynamicCache when no
        layer is attention (generate() reads the cache's length)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if FULL not in self.config.layer_types and type(model_kwargs.get("past_key_values")) is DynamicCache:
            model_kwargs["past_key_values"] = new_cache(self.config)

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
