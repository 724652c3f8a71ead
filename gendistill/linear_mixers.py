"""The linear mixers other than KDA, for the architecture axis: Gated DeltaNet, GLA and Mamba2's SSD.

Each is `KDAMixer`'s frame around another recurrence, so that a comparison of mixers compares recurrences only:
teacher-shaped q/k/v/o projections (`convert` copies the teacher attention's), k/v heads repeated to the q heads at
run time as GQA's repeat_kv, identity-initialised short convs on q, k and v (`kda_conv_*`), the low-rank output gate
and gated RMSNorm (`kda_gate_rank`, `kda_output_gate`), no positional encoding; the cache keeps one conv context for
[q | k | v] and the recurrent state [B, H, D, D] in fp32, as KDA's. What differs:
- `gdn`, Gated DeltaNet (arXiv 2412.06464, fla's GatedDeltaNet): KDA's delta rule with one forget gate per head,
  g = -exp(A_log) * softplus(a_proj(x) + dt_bias); q and k L2-normalised; beta = sigmoid(b_proj(x)).
- `gla`, Gated Linear Attention (arXiv 2312.06635, fla's GatedLinearAttention): no delta rule,
  S <- Diag(exp(g)) S + k v^T, with the channel-wise gate g = logsigmoid(f_b_proj(f_a_proj(x)) + gate_bias) /
  gla_gate_normalizer (fla's low-rank gate, its bias held by the mixer as KDA holds dt_bias);
  q and k as projected (fla's default: no feature map, no normalisation).
- `mamba2`, Mamba2's SSD (arXiv 2405.21060) in attention's terms, C = q, B = k, x = v (as MambaInLlama maps them): one
  decay per head exp(-exp(A_log) * dt), dt = softplus(dt_proj(x) + dt_bias), values scaled by dt, plus Mamba2's D skip;
  no 1/sqrt(d) scale (Mamba2 has none). Unlike mamba_ssm's layer, q, k and v have the three separate convs above, and
  the output norm normalises and then gates (as the other mixers) where Mamba2's gates and then normalises.

Padding, packing and caching behave as KDA's (left-padded rows equal the rows alone, packed documents restart conv and
state, cached decoding equals one forward): padded steps carry zero projections, no decay and no write.

The building blocks every linear mixer shares, KDA's included, live here too (`ShortConvolution`, `MASKED`,
`packed_documents`): modeling_hybrid_kda.py imports this file, never the other way round. Shipped in every student
directory beside modeling_hybrid_kda.py (`gendistill.hub`), so it imports only torch, transformers and its siblings. These mixers have no fast class of gendistill's own: their reference forward runs
everywhere, with fla's kernels on CUDA (`kda.gdn_gated`, `gla_gated`, `ssd_gated`) and PyTorch elsewhere.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from .configuration_hybrid_kda import HybridKDAConfig
from .kda import gated_rms_norm, gdn_gated, gla_gated, short_conv, ssd_gated

MASKED = -1e4  # gate and beta pre-activation at skipped positions: softplus and sigmoid give exactly 0 (no decay, no write)


class ShortConvolution(nn.Module):
    """Depthwise causal conv over time (weight [D, 1, W] like nn.Conv1d) that can restart at document starts."""

    def __init__(self, dim: int, kernel_size: int, bias: bool, activation: str = "identity"):
        super().__init__()
        self.kernel_size = kernel_size
        self.activation = activation
        self.weight = nn.Parameter(torch.empty(dim, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None

    def forward(self, x, context=None, cu_seqlens=None, pos_in_doc=None):
        """x [B, T, D], context [B, D, W-1] (the previous inputs; None: zeros) -> (y [B, T, D], new context)."""
        return short_conv(x, self.weight, self.bias, context, self.activation, cu_seqlens, pos_in_doc)


def gated_output(mixer: nn.Module, o: torch.Tensor, x: torch.Tensor, cache, conv_contexts, state) -> torch.Tensor:
    """Every linear mixer's last steps, KDA's included: the recurrence's output o through the gated RMSNorm (gate from
    x by the low-rank g_a/g_b projections) and o_proj; with a cache, the q/k/v conv contexts and the fp32 state
    stored for the next call."""
    B, T = x.shape[:2]
    H, D = mixer.num_heads, mixer.head_dim
    gate = mixer.g_b_proj(mixer.g_a_proj(x)).reshape(B, T, H, D)
    o = gated_rms_norm(o.reshape(B, T, H, D).to(x.dtype), gate, mixer.o_norm.weight, mixer.o_norm.variance_epsilon,
                       mixer.output_gate)
    if cache is not None:
        context = torch.cat(conv_contexts, dim=1)
        cache.update_conv_state(context, mixer.layer_idx, conv_kernel_size=context.shape[-1])
        cache.update_recurrent_state(state.float(), mixer.layer_idx)
    return mixer.o_proj(o.reshape(B, T, H * D))


def document_starts(position_ids: torch.Tensor) -> torch.Tensor | None:
    """[B, T] bool, True where a new packed document begins after the first step (position does not go up by one);
    None when nothing is packed."""
    step = torch.diff(position_ids, dim=-1) != 1
    if not step.any():
        return None
    return F.pad(step, (1, 0), value=False)


def packed_documents(position_ids: torch.Tensor):
    """(cu_seqlens over the flattened [B * T] steps, each step's index inside its document [B, T]) for packed
    documents, or (None, None) when nothing is packed."""
    doc_start = document_starts(position_ids)
    if doc_start is None:
        return None, None
    B, T = doc_start.shape
    starts = doc_start.clone()
    starts[:, 0] = True
    cu_seqlens = torch.cat([starts.reshape(-1).nonzero().squeeze(-1), torch.tensor([B * T], device=starts.device)])
    idx = torch.arange(T, device=doc_start.device).expand_as(doc_start)
    start_idx = torch.where(doc_start, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return cu_seqlens, idx - start_idx


class LinearMixer(nn.Module):
    """The frame every mixer here shares with KDAMixer (projections, convs, output gate and norm, cache); subclasses
    give the per-step gate inputs (`gates`), the recurrence (`recurrence`) and their parameters' initialisation
    (`init_gates`)."""

    def __init__(self, config: HybridKDAConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, H, Hkv, D = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.gate_rank = config.kda_gate_rank or D
        W, conv_bias, act = config.kda_conv_size, config.kda_conv_bias, config.kda_conv_activation
        self.output_gate = config.kda_output_gate

        self.q_proj = nn.Linear(hidden, H * D, bias=False)
        self.k_proj = nn.Linear(hidden, Hkv * D, bias=False)
        self.v_proj = nn.Linear(hidden, Hkv * D, bias=False)
        self.q_conv1d = ShortConvolution(H * D, W, conv_bias, act)
        self.k_conv1d = ShortConvolution(Hkv * D, W, conv_bias, act)
        self.v_conv1d = ShortConvolution(Hkv * D, W, conv_bias, act)
        self.build_gates(config)
        self.g_a_proj = nn.Linear(hidden, self.gate_rank, bias=False)
        self.g_b_proj = nn.Linear(self.gate_rank, H * D, bias=True)
        self.o_norm = Qwen3RMSNorm(D, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(H * D, hidden, bias=False)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        """As KDAMixer.forward: attention_mask is the 2-D padding mask of the current tokens ([B, T], 0 = pad) or
        None; without a mask and without a cache (training), `position_ids` that restart mark packed documents."""
        x, cache = hidden_states, past_key_values
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        pad = None if attention_mask is None else attention_mask[:, -T:].bool()
        cu_seqlens = pos_in_doc = None
        if pad is None and position_ids is not None and T > 1 and cache is None:  # as transformers' packed masks
            # `kda_packing`: packed_documents(position_ids) computed once by the model for every layer
            cu_seqlens, pos_in_doc = kwargs.get("kda_packing") or packed_documents(position_ids.expand(B, T))
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        context = cache.get_conv_state(self.layer_idx) if cache is not None else None
        contexts = [None] * 3 if context is None else context.split([c.weight.shape[0] for c in convs], dim=1)
        projected = [self.q_proj(x), self.k_proj(x), self.v_proj(x)]
        if pad is not None:  # a padded step must look like the zero left-padding of the sequence alone
            projected = [p * pad[..., None].to(p.dtype) for p in projected]
        (q, q_ctx), (k, k_ctx), (v, v_ctx) = (conv(p, ctx, cu_seqlens, pos_in_doc)
                                              for conv, p, ctx in zip(convs, projected, contexts))
        if pad is not None:  # the conv's bias reaches padded steps: a zero value writes nothing (GLA has no beta)
            v = v * pad[..., None].to(v.dtype)
        q = q.reshape(B, T, H, D)
        k, v = (t.reshape(B, T, Hkv, D).repeat_interleave(H // Hkv, dim=2) for t in (k, v))  # as GQA's repeat_kv
        gates = self.gates(x, pad)
        if cu_seqlens is not None:  # the kernels take packed documents as one flattened row
            q, k, v, *gates = (t.reshape(1, B * T, *t.shape[2:]) for t in (q, k, v, *gates))
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        o, state = self.recurrence(q, k, v, gates, state, cache is not None, cu_seqlens)
        return gated_output(self, o, x, cache, (q_ctx, k_ctx, v_ctx), state), None

    def build_gates(self, config: HybridKDAConfig) -> None:
        """Where a subclass may register its gates' modules: after the convs, before the output gate (KDA's order,
        which fixes the order parameters are initialised and listed in)."""

    def gates(self, x: torch.Tensor, pad: torch.Tensor | None) -> list[torch.Tensor]:
        """The recurrence's per-step gate inputs from x [B, T, hidden] ([B, T, ...] each), set at padded steps
        (`pad` False) so that the step neither decays nor writes the state."""
        raise NotImplementedError

    def recurrence(self, q, k, v, gates, state, output_final_state: bool, cu_seqlens):
        """(o [B, T, H, D], final state [N, H, D, D] fp32 or None) from q, k, v [B, T, H, D] and `gates`."""
        raise NotImplementedError

    def init_mixer_weights(self) -> None:
        """Called by HybridKDAPreTrainedModel._init_weights (after the projections' own initialisation): the output
        gate starts constant as KDA's (sigmoid(0) = 0.5, or silu(1.278) ~= 1), then the recurrence's gates.
        transformers initialises a custom-code module only if it holds parameters of its own (not only in
        submodules): every mixer here does (its gates' A_log, dt_bias, gate_bias)."""
        init.zeros_(self.g_b_proj.weight)
        init.constant_(self.g_b_proj.bias, 0.0 if self.output_gate == "sigmoid" else 1.278)
        self.init_gates()

    def init_gates(self) -> None:
        pass


def init_decay(A_log: nn.Parameter, dt_bias: nn.Parameter) -> None:
    """Mamba2's (and KDA's) decay initialisation: A ~ U[1, 16]; dt ~ logU[1e-3, 1e-1] stored as inverse softplus."""
    init.copy_(A_log, torch.empty_like(A_log).uniform_(1, 16).log())
    dt = torch.exp(torch.empty_like(dt_bias).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
    init.copy_(dt_bias, dt + torch.log(-torch.expm1(-dt)))


class GDNMixer(LinearMixer):
    """Gated DeltaNet: the delta rule with one forget gate per head."""

    def __init__(self, config: HybridKDAConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        H = self.num_heads
        self.a_proj = nn.Linear(config.hidden_size, H, bias=False)
        self.b_proj = nn.Linear(config.hidden_size, H, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))

    def gates(self, x, pad):
        a, b = self.a_proj(x), self.b_proj(x)
        if pad is not None:  # softplus(-1e4) = sigmoid(-1e4) = 0: no decay, no write
            a, b = (t.masked_fill(~pad[..., None], MASKED) for t in (a, b))
        return [a, b]

    def recurrence(self, q, k, v, gates, state, output_final_state, cu_seqlens):
        a, b = gates
        return gdn_gated(q, k, v, a, b, self.A_log, self.dt_bias, initial_state=state,
                         output_final_state=output_final_state, cu_seqlens=cu_seqlens)

    def init_gates(self):
        init_decay(self.A_log, self.dt_bias)


class GLAMixer(LinearMixer):
    """Gated linear attention: a channel-wise forget gate, no delta rule."""

    def __init__(self, config: HybridKDAConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.gate_normalizer = config.gla_gate_normalizer
        self.f_a_proj = nn.Linear(config.hidden_size, self.gate_rank, bias=False)
        self.f_b_proj = nn.Linear(self.gate_rank, self.num_heads * self.head_dim, bias=False)
        self.gate_bias = nn.Parameter(torch.empty(self.num_heads * self.head_dim))

    def gates(self, x, pad):
        B, T, _ = x.shape
        f = self.f_b_proj(self.f_a_proj(x)).float() + self.gate_bias.float()
        g = F.logsigmoid(f).reshape(B, T, self.num_heads, self.head_dim) / self.gate_normalizer
        if pad is not None:  # no decay (the forward zeroes v there: no write)
            g = g.masked_fill(~pad[..., None, None], 0.0)
        return [g]

    def recurrence(self, q, k, v, gates, state, output_final_state, cu_seqlens):
        return gla_gated(q, k, v, gates[0], initial_state=state, output_final_state=output_final_state,
                         cu_seqlens=cu_seqlens)

    def init_gates(self):
        init.zeros_(self.gate_bias)  # logsigmoid(0) / 16: a decay of 0.958 per step, as fla's zero-bias init


class Mamba2Mixer(LinearMixer):
    """Mamba2's SSD with C = q, B = k, x = v: one decay per head, dt-scaled values, the D skip."""

    def __init__(self, config: HybridKDAConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        H = self.num_heads
        self.dt_proj = nn.Linear(config.hidden_size, H, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))

    def gates(self, x, pad):
        dt = self.dt_proj(x)
        if pad is not None:  # softplus(-1e4) = 0: dt = 0, no decay and a zero write
            dt = dt.masked_fill(~pad[..., None], MASKED)
        return [dt]

    def recurrence(self, q, k, v, gates, state, output_final_state, cu_seqlens):
        o, state = ssd_gated(q, k, v, gates[0], self.A_log, self.dt_bias, scale=1.0, initial_state=state,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens)
        return (o.float() + self.D.float()[:, None] * v.float()).to(o.dtype), state

    def init_gates(self):
        init_decay(self.A_log, self.dt_bias)
        init.ones_(self.D)


LINEAR_MIXERS = {"gdn": GDNMixer, "gla": GLAMixer, "mamba2": Mamba2Mixer}
