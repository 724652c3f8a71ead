"""The Hybrid-KDA model's inference paths: subclasses of the reference classes (`modeling_hybrid_kda`) that override
only their hot steps, with the same parameters, and fall back to the reference wherever their kernels do not apply
(`policy.enabled`, or a projection that is not a plain nn.Linear: a PEFT adapter's forward must run):
- `FusedKDAMixer`: [q | k | v] and [f_a | g_a | b] projected with one GEMM each (the weights concatenated per call,
  never kept: a kept merge would go stale under in-place edits), the short conv folded into the Triton head split,
  long inference prefills in segments (`segments.SegmentedKDA`: bounded activation memory, each segment's state scan
  beside the next segment's parallel work), the gated output norm in one launch;
- `FusedAttention`: q_norm, k_norm and the rotary embedding of q and k in one launch (`norm.qk_norm_rotary`) where
  transformers' form costs ~14 eager kernels and makes five whole-size temporaries of q (the 128K prefill's memory
  peak);
- `FusedDecoderLayer`: the residual add folded into the post-attention norm (one kernel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gendistill import modeling_hybrid_kda as reference
from gendistill.kda import RECURRENT_MAX_STEPS, gated_rms_norm, kda_gated, next_conv_context, resolve_backend, short_conv
from gendistill.kernels import policy
from gendistill.kernels.heads import Conv, kda_heads, kda_heads_fused
from gendistill.kernels.norm import qk_norm_rotary, rms_norm
from gendistill.kernels.qwen3 import FusedRMSNorm, linear_into, plain_linears
from gendistill.kernels.segments import SegmentedKDA
from gendistill.linear_mixers import MASKED, ShortConvolution


def gated_output_norm(x, gate, weight, eps: float, activation: str = "sigmoid"):
    """KDA's gated output norm (`kda.gated_rms_norm`); in GPU inference one launch of kernels.norm's kernel."""
    if policy.enabled(x, weight):
        return rms_norm(x, weight, eps, gate=gate, activation=activation)
    return gated_rms_norm(x, gate, weight, eps, activation)


class FusedAttention(reference.HybridKDAAttention):
    def norm_and_rotate(self, q, k, position_embeddings):
        cos, sin = position_embeddings  # [1 or B, T, head_dim], the two halves repeated
        if (not policy.enabled(q, self.q_norm.weight) or self.training or cos.shape[0] not in (1, q.shape[0])
                or cos.shape[-1] != self.head_dim or self.head_dim & (self.head_dim - 1)
                or type(self.q_norm) not in (reference.Qwen3RMSNorm, FusedRMSNorm)):
            # the kernel: whole-head rotation, D a power of two, the norms plain RMSNorms
            return super().norm_and_rotate(q, k, position_embeddings)
        q, k = qk_norm_rotary(q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.variance_epsilon, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2)


class FusedKDAMixer(reference.KDAMixer):
    """The reference KDA mixer with gendistill's inference paths (same parameters, same outputs)."""

    def fast_path_applies(self) -> bool:
        """Whether every projection and conv is the plain module, so that reading weights equals calling modules."""
        return plain_linears(self.q_proj, self.k_proj, self.v_proj, self.f_a_proj, self.f_b_proj, self.b_proj,
                             self.g_a_proj, self.g_b_proj, self.o_proj) and all(
            type(c) is ShortConvolution for c in (self.q_conv1d, self.k_conv1d, self.v_conv1d))

    def _merged_params(self):
        """Weights of projections that read the same input, side by side: [q | k | v] (projection and conv) and
        [f_a | g_a | b] (the gates' low-rank halves and beta). One GEMM and one conv call for each group cost the host
        fewer calls and the device no concatenation of activations. Concatenated on every call, never kept: the
        weights may change in place between calls (optimizer steps, `.data` edits, loads)."""
        convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
        qkv = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        conv_weight = torch.cat([c.weight for c in convs])
        conv_bias = None if convs[0].bias is None else torch.cat([c.bias for c in convs])
        gates = torch.cat([self.f_a_proj.weight, self.g_a_proj.weight, self.b_proj.weight])
        return qkv, conv_weight, conv_bias, gates

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        """attention_mask: 2-D padding mask of the current tokens ([B, T], 0 = pad) or None. Without a mask and
        without a cache (training), `position_ids` that restart mark packed documents: state and conv restart there.
        Long inference prefills run in segments of `prefill_chunk` tokens, carrying conv context and state, so
        activation memory stays bounded whatever the context length (`kernels.segments.SegmentedKDA`: on CUDA each
        segment's state scan runs beside the next segment's parallel work)."""
        if not self.fast_path_applies():
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, **kwargs)
        B, T, _ = hidden_states.shape
        cache = past_key_values
        pad = None if attention_mask is None else attention_mask[:, -T:].bool()
        packed = None
        if pad is None and position_ids is not None and T > 1 and cache is None:  # as transformers' packed masks
            packed = kwargs.get("kda_packing") or reference.packed_documents(position_ids.expand(B, T))
            packed = None if packed[0] is None else packed
        conv_context = cache.get_conv_state(self.layer_idx) if cache is not None else None
        state = cache.get_recurrent_state(self.layer_idx) if cache is not None else None
        segment = T if torch.is_grad_enabled() or packed is not None else self.prefill_chunk
        params = self._merged_params()
        # GPU inference splits, repeats and normalises q/k in one Triton pass (kernels/heads.py); training keeps autograd
        # through fla's own norms, the PyTorch paths normalise in `kda_gated`.
        normalized = not torch.is_grad_enabled() and resolve_backend(hidden_states, T) == "fla"
        # fla inference beyond a decode step goes through SegmentedKDA even in one segment: fla's stages called
        # directly cost the host less than its autograd wrapper (host-bound at a few thousand tokens).
        if segment >= T and not (normalized and packed is None and T > RECURRENT_MAX_STEPS):
            kda_in, gate_low, conv_context, cu_seqlens = self._inputs(hidden_states, pad, packed, conv_context,
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

    def _inputs(self, x, pad, packed, conv_context, params, normalized: bool, keep_context: bool):
        """KDA's inputs for x (one segment, or the whole input): [q, k, v, f, b] (q and k L2-normalised when
        `normalized`), the output gate's low-rank half, the new conv context (may be None unless `keep_context`), and
        cu_seqlens for packed documents (then q..b are one flattened row)."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        cu_seqlens, pos_in_doc = (None, None) if packed is None else packed  # the kernels flatten packed documents
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
        o = gated_output_norm(o.to(gate_low.dtype), gate, self.o_norm.weight, self.o_norm.variance_epsilon,
                              self.output_gate)
        o = o.reshape(B, T, H * D)
        return self.o_proj(o) if out is None else linear_into(o, self.o_proj.weight, out)


class FusedDecoderLayer(reference.HybridKDADecoderLayer):
    """The reference layer with the residual add folded into the post-attention norm (`FusedRMSNorm.add_and_norm`:
    one kernel on the GPU; elsewhere the same two steps as the reference)."""

    def residual_and_norm(self, hidden_states, residual):
        return self.post_attention_layernorm.add_and_norm(hidden_states, residual)
