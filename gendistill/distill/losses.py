"""What a stage computes: KD divergences and CE over the vocabulary (chunked), alignment losses, and the glue that
feeds the teacher's captured per-layer inputs to the student's layers.

Vocabulary-sized terms never hold full [tokens, vocab] logits: `chunked_head_loss` projects the final hidden states
through each model's lm_head `chunk_tokens` rows at a time, computes the loss and its gradient for that chunk inside
the forward, and keeps only the gradients w.r.t. the student's hidden states and head weight (the technique of
Liger's fused linear losses and TRL's chunked divergence), so neither the forward nor the backward keeps logits.

Normalisation: every term returns a *sum* over the local tokens divided by the number of scored tokens in the whole
global batch (all micro-batches, all processes), times the number of processes (DDP/FSDP average gradients). The
sum over micro-batches and processes is then exactly the global-batch mean, whatever the world size.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

FULL, LINEAR = "full_attention", "linear_attention"
ALIGN_TERMS = ("attn_align", "qk_align", "hidden_align")  # per-layer terms: they read `layers` and the token mask


# ----------------------------------------------------------------------------------------------------------------
# token-level math (fp32 logits in, one value per token out)

def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "fkl", beta: float = 0.5,
               temperature: float = 1.0) -> torch.Tensor:
    """Per-token divergence between teacher and student next-token distributions, shapes [N, V] -> [N].

    fkl: KL(teacher || student) (mode covering, the paper's choice); rkl: KL(student || teacher);
    jsd: generalised JSD with mixture m = beta * teacher + (1 - beta) * student:
         beta * KL(teacher || m) + (1 - beta) * KL(student || m)  (TRL's convention for beta).
    """
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "fkl":
        return (t.exp() * (t - s)).sum(-1)
    if kind == "rkl":
        return (s.exp() * (s - t)).sum(-1)
    if kind == "jsd":
        m = torch.logsumexp(torch.stack([s + math.log(1 - beta), t + math.log(beta)]), dim=0)
        return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}")


# ---- sparse teacher distributions: top-k probabilities plus one tail bucket ----
#
# A cached teacher keeps, per scored token, the k most probable next tokens S and their log-probabilities log p_t(S)
# (at the stage's temperature). What is left of the teacher's distribution is its tail mass r_t = 1 - sum_S p_t.
# The KD term is then the KL between the two distributions *coarsened* to k + 1 outcomes (the k tokens of S, and
# "any other token"):
#     KL_k = sum_{i in S} p_t(i) log(p_t(i) / p_s(i)) + r_t log(r_t / r_s),      r_s = 1 - sum_S p_s.
# Exactness: KL_full = KL_k + r_t * KL(p_t(. | tail) || p_s(. | tail)) (the chain rule of KL over the partition), so
# KL_k <= KL_full always, KL_k = KL_full when the teacher's tail is empty, KL_k grows with k, and the error is the
# tail mass times the divergence *within* the tail. Its gradient w.r.t. the student logits is p_s - p~_t, where
# p~_t is p_t on S and spreads r_t over the other tokens in proportion to the student's own tail (r_t p_s / r_s):
# the student is pulled towards the teacher's head and its tail mass, not the tail's shape, which the cache lacks.
# A teacher tail below TAIL_MIN (1e-6) counts as empty (the listed mass is 1 within fp32 rounding); KL_k then drops
# r_t log(r_t / r_s), which is at most TAIL_MIN * log(TAIL_MIN / r_s) per token.

class TopK(NamedTuple):
    """A teacher's top-k next-token distribution per token: ids [N, k] (int) and their log-probabilities [N, k]."""

    ids: torch.Tensor
    logp: torch.Tensor

    def __getitem__(self, index):  # rows, like a tensor (a NamedTuple of tensors is otherwise indexed by field)
        if isinstance(index, int):
            return tuple.__getitem__(self, index)
        return TopK(self.ids[index], self.logp[index])


def teacher_topk(teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, k: int, temperature: float = 1.0,
                 chunk_tokens: int = 1024) -> TopK:
    """The teacher's top-k log-probabilities (fp32, at `temperature`) from its final hidden states [N, H], the logits
    computed `chunk_tokens` rows at a time (never [N, vocab] at once)."""
    ids, logp = [], []
    with torch.no_grad():
        w = teacher_weight.to(teacher_hidden.dtype)
        for lo in range(0, teacher_hidden.shape[0], chunk_tokens):
            log_t = torch.log_softmax((teacher_hidden[lo:lo + chunk_tokens] @ w.T).float() / temperature, dim=-1)
            values, index = log_t.topk(k, dim=-1)
            ids.append(index.to(torch.int32))
            logp.append(values)
    if not ids:
        empty = teacher_hidden.new_zeros(0, k)
        return TopK(empty.to(torch.int32), empty.float())
    return TopK(torch.cat(ids), torch.cat(logp))


TAIL_MIN = 1e-6  # a teacher tail below this counts as empty: the listed mass is 1 within its fp32 rounding


def _tail_log_mass(logp: torch.Tensor, vocab: int) -> torch.Tensor:
    """log r_t = log(1 - sum exp(logp)) per row; -inf (no tail) when S is the whole vocabulary or r_t < TAIL_MIN."""
    listed = torch.logsumexp(logp, dim=-1)
    empty = listed >= math.log1p(-TAIL_MIN) if logp.shape[-1] < vocab else torch.ones_like(listed, dtype=torch.bool)
    return torch.where(empty, -math.inf, torch.log(-torch.expm1(listed.clamp(max=math.log1p(-TAIL_MIN)))))


def topk_kl(student_logits: torch.Tensor, topk: TopK, temperature: float = 1.0) -> torch.Tensor:
    """Per-token KL_k (see above) between the teacher's cached top-k + tail and the student, [N, V] -> [N]; the
    reference (autograd) definition that the chunked path is tested against."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    ids = topk.ids.long()
    log_s_top = log_s.gather(-1, ids)
    p_t = topk.logp.exp()
    head = (p_t * (topk.logp - log_s_top)).sum(-1)
    log_rt = _tail_log_mass(topk.logp, log_s.shape[-1])
    has_tail = ~torch.isinf(log_rt)  # rows whose teacher keeps mass outside S (the others have no tail term)
    log_rs = torch.logsumexp(log_s[has_tail].scatter(-1, ids[has_tail], -math.inf), dim=-1)
    tail = torch.zeros_like(head)
    tail[has_tail] = log_rt[has_tail].exp() * (log_rt[has_tail] - log_rs)
    return head + tail


def _topk_kl_and_grad(logits: torch.Tensor, topk: TopK, temperature: float):
    """(sum over rows of KL_k, d/dlogits) for fp32 logits [n, V]: the closed form p_s - p~_t, divided by T."""
    ids = topk.ids.long()
    log_s = torch.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)
    log_s_top = log_s.gather(-1, ids)
    p_t = topk.logp.exp()
    log_rt = _tail_log_mass(topk.logp, log_s.shape[-1])
    no_tail = torch.isinf(log_rt)
    log_rs = torch.logsumexp(log_s.scatter(-1, ids, -math.inf), dim=-1)
    value = (p_t * (topk.logp - log_s_top)).sum() + torch.where(no_tail, 0.0, log_rt.exp() * (log_rt - log_rs)).sum()
    # p~_t = p_t on S, r_t p_s / r_s elsewhere: grad = p_s (1 - r_t / r_s) off S, p_s - p_t on S
    tail_keep = torch.where(no_tail, 1.0, -torch.expm1(log_rt - log_rs))
    grad = log_s.exp_().mul_(tail_keep[:, None])
    grad.scatter_(-1, ids, log_s_top.exp() - p_t)
    if temperature != 1:
        grad.div_(temperature)
    return value, grad


KD_KERNELS = ("chunked", "liger_kl", "liger_jsd")


def _liger_kl_loss_and_grad():
    """Liger-Kernel's fused KL primitive (one Triton pass per row chunk: log-softmax of the student logits, the KL
    against given teacher probabilities, and its gradient written over the logits)."""
    try:
        import liger_kernel.functional  # noqa: F401  (declares where the kernels live, for Liger's dispatcher)
        from liger_kernel.backends import dispatch
    except ImportError as err:
        raise ImportError("kd_kernel liger_kl needs Liger-Kernel (pip install liger-kernel) and a CUDA GPU") from err
    return dispatch


@dataclasses.dataclass(frozen=True)
class HeadLoss:
    """The vocabulary-sized terms of a stage: weights per term ("kd", "ce") and the KD settings.

    kernel: how the KD term's per-chunk math runs. chunked: PyTorch ops (any device; the reference). liger_kl: the same
    chunks, with Liger-Kernel's fused KL loss-and-gradient Triton kernel instead of the eager softmax passes (forward
    KL only). liger_jsd: Liger's whole fused linear JSD (`LigerFusedLinearJSDFunction`, its own chunking) at
    beta = 0, which is exactly forward KL(teacher || student). Both Liger paths need CUDA."""

    weights: dict
    divergence: str = "fkl"
    beta: float = 0.5
    temperature: float = 1.0
    chunk_tokens: int = 1024
    kernel: str = "chunked"

    def per_chunk(self, student_logits, teacher_logits, targets) -> list[torch.Tensor]:
        """Sum over the chunk's tokens of each term, in `weights` order (differentiable; the reference path)."""
        out = []
        for term in self.weights:
            if term == "kd":
                out.append(divergence(student_logits, teacher_logits, self.divergence, self.beta,
                                      self.temperature).sum())
            elif term == "ce":
                out.append(F.cross_entropy(student_logits.float(), targets, reduction="sum"))
            else:
                raise ValueError(f"{term!r} is not a vocabulary-sized term")
        return out

    def loss_and_grad(self, hidden, weight, teacher_hidden, teacher_weight, targets, need_grad: bool):
        """One chunk: (per-term sums [K], d(weighted sum)/d logits or None), logits computed here in fp32.

        Forward KL and CE (the paper's terms) use their closed-form gradients computed in place, so about three
        [chunk, vocab] fp32 buffers are alive at once; rkl/jsd (and no-grad evaluation) go through autograd."""
        if isinstance(teacher_hidden, TopK):
            return self._topk_loss_and_grad(hidden, weight, teacher_hidden, targets, need_grad)
        if self.kernel == "liger_kl" and need_grad:
            return self._liger_loss_and_grad(hidden, weight, teacher_hidden, teacher_weight)
        logits = (hidden @ weight.T).float()
        teacher_logits = None if teacher_hidden is None else (teacher_hidden @ teacher_weight.T).float()
        if not need_grad:
            with torch.no_grad():
                return torch.stack(self.per_chunk(logits, teacher_logits, targets)), None
        if "kd" in self.weights and self.divergence != "fkl":
            logits.requires_grad_()
            with torch.enable_grad():
                terms = torch.stack(self.per_chunk(logits, teacher_logits, targets))
                weights = torch.tensor(list(self.weights.values()), device=terms.device)
                (grad,) = torch.autograd.grad((terms * weights).sum(), logits)
            return terms.detach(), grad
        values, grad = {}, None
        if "ce" in self.weights:  # -log softmax(z)[target]; gradient softmax(z) - onehot(target)
            rows = torch.arange(len(targets), device=logits.device)
            log_p = torch.log_softmax(logits, dim=-1)
            values["ce"] = -log_p[rows, targets].sum()
            grad = log_p.exp_()
            grad[rows, targets] -= 1
            grad.mul_(self.weights["ce"])
            del log_p
        if "kd" in self.weights:  # KL(p_t || p_s), p = softmax(z / T); gradient (p_s - p_t) / T
            T = self.temperature
            log_s = torch.log_softmax(logits if T == 1 else logits / T, dim=-1)
            del logits
            log_t = torch.log_softmax(teacher_logits if T == 1 else teacher_logits / T, dim=-1)
            del teacher_logits
            p_t = log_t.exp()
            values["kd"] = log_t.sub_(log_s).mul_(p_t).sum()
            del log_t
            g = log_s.exp_().sub_(p_t)
            grad = g.mul_(self.weights["kd"] / T) if grad is None else grad.add_(g, alpha=self.weights["kd"] / T)
        return torch.stack([values[t] for t in self.weights]), grad

    def _topk_loss_and_grad(self, hidden, weight, topk: TopK, targets, need_grad: bool):
        """KD against a cached top-k teacher (`topk_kl`), plus CE if weighted; fp32 softmax math as above."""
        logits = (hidden @ weight.T).float()
        values, grad = {}, None
        if "ce" in self.weights:
            rows = torch.arange(len(targets), device=logits.device)
            log_p = torch.log_softmax(logits, dim=-1)
            values["ce"] = -log_p[rows, targets].sum()
            if need_grad:
                grad = log_p.exp_()
                grad[rows, targets] -= 1
                grad.mul_(self.weights["ce"])
            del log_p
        if "kd" in self.weights:
            values["kd"], g = _topk_kl_and_grad(logits, topk, self.temperature)
            if need_grad:
                grad = g.mul_(self.weights["kd"]) if grad is None else grad.add_(g, alpha=self.weights["kd"])
        return torch.stack([values[t] for t in self.weights]), grad

    def _liger_loss_and_grad(self, hidden, weight, teacher_hidden, teacher_weight):
        """Forward KL through Liger's fused kernel: the student logits stay in the GEMM's dtype (the kernel upcasts
        in registers and overwrites them with the gradient); the teacher's probabilities are one fp32 softmax."""
        logits = hidden @ weight.T
        probs = torch.softmax((teacher_hidden @ teacher_weight.T).float() / self.temperature, dim=-1)
        rows, grad = _liger_kl_loss_and_grad()("kl_loss_and_grad", logits, probs, None, -100, self.temperature,
                                               torch.finfo(torch.float32).tiny, 1.0)
        weight_kd = self.weights["kd"]
        if weight_kd != 1:
            grad.mul_(weight_kd)
        return rows.sum()[None], grad


class _ChunkedHeadLoss(torch.autograd.Function):
    """loss = scale * sum_terms weight * sum_tokens term(hidden @ weight.T, teacher_hidden @ teacher_weight.T).

    Forward walks the tokens chunk by chunk and computes the gradient of each chunk's loss w.r.t. its logits on the
    spot (`HeadLoss.loss_and_grad`), then folds it into d/dhidden and d/dweight; backward only rescales them.
    """

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, spec: HeadLoss, scale: float, dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit below
            w = weight.to(dtype)
            tw = None if teacher_hidden is None or isinstance(teacher_hidden, TopK) else \
                teacher_weight.to(teacher_hidden.dtype)
            grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            sums = torch.zeros(len(spec.weights), dtype=torch.float32, device=hidden.device)
            weights = torch.tensor(list(spec.weights.values()), dtype=torch.float32, device=hidden.device)
            for lo in range(0, hidden.shape[0], spec.chunk_tokens):
                h = hidden[lo:lo + spec.chunk_tokens].to(dtype)
                th = None if teacher_hidden is None else teacher_hidden[lo:lo + spec.chunk_tokens]
                terms, grad_logits = spec.loss_and_grad(h, w, th, tw, targets[lo:lo + spec.chunk_tokens],
                                                        need_h or need_w)
                sums += terms
                if need_h:
                    grad_h[lo:lo + spec.chunk_tokens] = (grad_logits.to(dtype) @ w).float()
                if need_w:
                    grad_w.addmm_(grad_logits.T.float(), h.float())
                del grad_logits  # before the next chunk allocates its logits
        ctx.hidden_dtype, ctx.weight_dtype, ctx.has = hidden.dtype, weight.dtype, (need_h, need_w)
        ctx.save_for_backward(*(g * scale for g in (grad_h, grad_w) if g is not None))
        sums = sums * scale
        ctx.mark_non_differentiable(sums)
        return (sums * weights).sum(), sums

    @staticmethod
    def backward(ctx, grad_total, _grad_sums):
        saved = iter(ctx.saved_tensors)
        grad_h = (next(saved) * grad_total).to(ctx.hidden_dtype) if ctx.has[0] else None
        grad_w = (next(saved) * grad_total).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_h, grad_w, None, None, None, None, None, None


def chunked_head_loss(hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor | None,
                      teacher_weight: torch.Tensor | None, targets: torch.Tensor, spec: HeadLoss,
                      scale: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """hidden [N, H] (only the scored tokens), weight [V, H]; returns (weighted loss, {term: detached value}).
    The projections run in the autocast dtype when autocast is on (as lm_head would), else in hidden's dtype; the
    softmax math is always fp32."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if spec.kernel == "liger_jsd" and not isinstance(teacher_hidden, TopK):
        return _liger_jsd_head_loss(hidden, weight, teacher_hidden, teacher_weight, spec, scale, dtype)
    total, sums = _ChunkedHeadLoss.apply(hidden, weight, teacher_hidden, teacher_weight, targets, spec, scale, dtype)
    return total, dict(zip(spec.weights, sums.unbind()))


def _liger_jsd_head_loss(hidden, weight, teacher_hidden, teacher_weight, spec: HeadLoss, scale: float, dtype):
    """KD as Liger's fused linear JSD at beta = 0 (its kernel's forward-KL branch: sum p_t (log p_t - log p_s)),
    which returns the mean over the rows; times the rows and `scale` it is the chunked path's sum convention."""
    try:
        from liger_kernel.ops.fused_linear_jsd import LigerFusedLinearJSDFunction
    except ImportError as err:
        raise ImportError("kd_kernel liger_jsd needs Liger-Kernel (pip install liger-kernel) and a CUDA GPU") from err
    rows = hidden.shape[0]
    with torch.autocast(hidden.device.type, enabled=False):
        mean = LigerFusedLinearJSDFunction.apply(hidden.to(dtype), weight.to(dtype), teacher_hidden,
                                                 teacher_weight.to(teacher_hidden.dtype), None, 0.0, -100,
                                                 spec.temperature)
    kd = mean.float() * (rows * scale)
    return kd * spec.weights["kd"], {"kd": kd.detach()}


def naive_head_loss(hidden, weight, teacher_hidden, teacher_weight, targets, spec: HeadLoss, scale: float = 1.0):
    """The same loss from full logits (the reference the chunked path is tested and benchmarked against)."""
    logits = (hidden @ weight.to(hidden.dtype).T).float()
    teacher_logits = None
    if teacher_hidden is not None:
        teacher_logits = (teacher_hidden @ teacher_weight.to(teacher_hidden.dtype).T).float()
    terms = torch.stack(spec.per_chunk(logits, teacher_logits, targets)) * scale
    weights = torch.tensor(list(spec.weights.values()), dtype=torch.float32, device=hidden.device)
    return (terms * weights).sum(), dict(zip(spec.weights, terms.detach().unbind()))


def relative_mse_sum(student_out: torch.Tensor, teacher_out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked tokens of ||s - t||^2 / mean_masked ||t||^2: an MSE normalised by the layer's own output scale
    (so layers with large activations do not dominate). Divided by the token count it is the relative squared error."""
    s, t = student_out[mask].float(), teacher_out[mask].float()
    scale = t.pow(2).sum(-1).mean().clamp_min(1e-12).detach()
    return (s - t).pow(2).sum() / scale


# Stage 1 of the paper is "Q/K projection alignment via L2 hidden-state distance". gendistill's reading (`qk_align`):
# for each aligned KDA layer i, both models read the teacher's layer-i attention input x (its input_layernorm
# output, as attn_align). The target is the teacher attention's query and key *after* q_norm/k_norm and *before*
# RoPE (the KDA student has no positional encoding, so a rotated target is unreachable); the student's side is what
# KDA's kernel takes: q/k projections after the short conv, before the kernel's L2 normalisation. The kernel
# L2-normalises q and k, so only their directions reach KDA: the term is the squared L2 distance between the
# L2-normalised per-head vectors (= 2 - 2 cos), averaged over heads and over {q, k}, per token (range [0, 4]).
# Conversion copies q_proj/k_proj but drops q_norm/k_norm, so at the start the gap is exactly the teacher's
# per-channel q/k norm scales; k is compared at the teacher's KV heads (before KDA's GQA repeat).

def teacher_query_key(attention: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Qwen3 attention's q [B, T, H, D] and k [B, T, Hkv, D] after q_norm/k_norm, before RoPE."""
    shape = (*x.shape[:-1], -1, attention.head_dim)
    return attention.q_norm(attention.q_proj(x).view(shape)), attention.k_norm(attention.k_proj(x).view(shape))


def kda_query_key(mixer: nn.Module, x: torch.Tensor, position_ids: torch.Tensor):
    """A KDA mixer's q [B, T, H, D] and k [B, T, Hkv, D] as its kernel takes them, before the L2 norm (projection
    and short conv, restarting at packed-document starts as the mixer's own forward does)."""
    from gendistill.linear_mixers import packed_documents

    B, T, _ = x.shape
    cu_seqlens, pos_in_doc = packed_documents(position_ids.expand(B, T)) if T > 1 else (None, None)
    # module calls, as the reference mixer makes them: adapters on q_proj/k_proj or the convs count here too
    q, _ = mixer.q_conv1d(mixer.q_proj(x), None, cu_seqlens, pos_in_doc)
    k, _ = mixer.k_conv1d(mixer.k_proj(x), None, cu_seqlens, pos_in_doc)
    return q.reshape(B, T, -1, mixer.head_dim), k.reshape(B, T, -1, mixer.head_dim)  # k at the Hkv heads


def qk_distance_sum(student_qk, teacher_qk, mask: torch.Tensor) -> torch.Tensor:
    """Sum over masked tokens of the mean over heads and over (q, k) of ||l2n(student) - l2n(teacher)||^2."""
    from gendistill.kda import l2norm

    return sum((l2norm(s[mask]) - l2norm(t[mask])).pow(2).sum(-1).mean(-1).sum()
               for s, t in zip(student_qk, teacher_qk)) / len(student_qk)


# ----------------------------------------------------------------------------------------------------------------
# the teacher pass: final hidden states and per-layer inputs/outputs, captured with hooks in one forward

class _StopForward(Exception):
    pass


def _map_tensors(value, fn):
    """`value` (nested dicts/tuples of tensors) with fn applied to every tensor."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    return value


class TeacherCapture:
    """Registers forward hooks on the teacher's layers once per stage; `run(batch)` does one no-grad teacher forward
    and returns what the stage's terms read: `hidden` (final hidden states), and for each aligned layer i
    `mixer_in/mixer_out[i]` (input to / output of layers[i].self_attn), `block_in/block_out[i]`, and for qk_layers
    `qk[i]` = (q, k) of the teacher attention on mixer_in[i] (`teacher_query_key`)."""

    def __init__(self, teacher: nn.Module, mixer_layers=(), block_layers=(), need_hidden: bool = False,
                 qk_layers=(), inference_mode: bool = False):
        self.teacher, self.need_hidden, self.qk_layers = teacher, need_hidden, sorted(set(qk_layers))
        self.inference_mode = inference_mode
        mixer_layers = set(mixer_layers) | set(qk_layers)
        self.captured: dict = {}
        self.handles = []
        layers = teacher.model.layers
        needed = set(mixer_layers) | set(block_layers)
        self.last_layer = max(needed) if needed else -1
        for i in sorted(set(mixer_layers)):
            self.handles.append(layers[i].self_attn.register_forward_pre_hook(self._store("mixer_in", i, True),
                                                                                 with_kwargs=True))
            self.handles.append(layers[i].self_attn.register_forward_hook(self._store("mixer_out", i, False)))
        for i in sorted(set(block_layers)):
            self.handles.append(layers[i].register_forward_pre_hook(self._store("block_in", i, True), with_kwargs=True))
            self.handles.append(layers[i].register_forward_hook(self._store("block_out", i, False)))
        if needed and not need_hidden:  # nothing after the last aligned layer is needed: stop the forward there
            self.handles.append(layers[self.last_layer].register_forward_hook(self._stop))

    def _store(self, kind: str, i: int, is_input: bool):
        def hook(module, args, *rest):
            if is_input:
                kwargs = rest[0]
                value = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            else:
                out = rest[0]
                value = out[0] if isinstance(out, tuple) else out
            self.captured.setdefault(kind, {})[i] = value.detach()
        return hook

    def _stop(self, *_):
        raise _StopForward

    def run(self, batch: dict) -> dict:
        """One teacher forward on `batch`. Under inference mode the captured tensors are cloned on the way out:
        inference tensors cannot be saved for the student's backward, which the alignment terms need."""
        self.captured = {}
        with torch.inference_mode() if self.inference_mode else torch.no_grad():
            try:
                out = self.teacher.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                         use_cache=False)
                self.captured["hidden"] = out.last_hidden_state
            except _StopForward:
                pass
            layers = self.teacher.model.layers
            self.captured["qk"] = {i: teacher_query_key(layers[i].self_attn, self.captured["mixer_in"][i])
                                   for i in self.qk_layers}
        if self.inference_mode:
            self.captured = _map_tensors(self.captured, torch.clone)
        self.captured["head"] = self.teacher.lm_head.weight
        return self.captured

    def run_many(self, batches: list[dict]) -> list[dict]:
        """One teacher forward on the micro-batches `batches` side by side (a larger batch than the student's), split
        back into one captured dict per micro-batch."""
        if len(batches) == 1:
            return [self.run(batches[0])]
        sizes = [len(b["input_ids"]) for b in batches]
        joined = self.run({k: torch.cat([b[k] for b in batches]) for k in ("input_ids", "position_ids")})
        head = joined.pop("head")
        return [{**_map_tensors(joined, lambda t, i=i: t.split(sizes)[i]), "head": head} for i in range(len(sizes))]

    def close(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


# ----------------------------------------------------------------------------------------------------------------
# the student side: one module computing every term (so FSDP/DDP wrap exactly what runs)

def _layer_context(model: nn.Module, x: torch.Tensor, position_ids: torch.Tensor):
    """Masks per layer type, rotary embeddings and the KDA layers' packed-document boundaries (`kda_packing`), as the
    model's own forward computes them once for all its layers."""
    base = model.model
    extra = {FULL: {}, LINEAR: {}}
    if hasattr(base, "build_masks"):
        from gendistill.linear_mixers import packed_documents

        masks = base.build_masks(x, None, None, position_ids)
        if x.shape[1] > 1:
            extra[LINEAR] = {"kda_packing": packed_documents(position_ids.expand(x.shape[:2]))}
    else:
        from transformers.masking_utils import create_causal_mask
        masks = {FULL: create_causal_mask(config=base.config, inputs_embeds=x, attention_mask=None,
                                          past_key_values=None, position_ids=position_ids), LINEAR: None}
    return masks, base.rotary_emb(x, position_ids), extra


def run_mixer(model, i: int, x, position_ids, context=None):
    """Student layer i's token mixer on `x` (KDA: the mixer ignores masks/rotary; attention: needs them)."""
    masks, rotary, extra = context or _layer_context(model, x, position_ids)
    layer_type = model.config.layer_types[i]
    out = model.model.layers[i].self_attn(hidden_states=x, attention_mask=masks[layer_type], position_ids=position_ids,
                                          position_embeddings=rotary, use_cache=False, **extra.get(layer_type, {}))
    return out[0]


def run_block(model, i: int, x, position_ids, context=None):
    """Student decoder block i on `x`."""
    masks, rotary, extra = context or _layer_context(model, x, position_ids)
    layer_type = model.config.layer_types[i]
    out = model.model.layers[i](x, attention_mask=masks[layer_type], position_ids=position_ids,
                                position_embeddings=rotary, use_cache=False, **extra.get(layer_type, {}))
    return out[0] if isinstance(out, tuple) else out


class StudentObjective(nn.Module):
    """The student and a stage's weighted terms. `forward(batch, teacher_out, norms)` -> (loss, {term: value}).

    norms: {"tokens": scored next-token positions in the global batch, "align": scored positions x aligned layers
    in the global batch, "world": number of processes}.
    """

    def __init__(self, student: nn.Module, objective: dict[str, float], align_layers: list[int], head: HeadLoss):
        super().__init__()
        self.student = student
        self.objective = objective
        self.align_layers = align_layers
        self.head = head

    def forward(self, batch: dict, teacher_out: dict, norms: dict):
        terms: dict[str, torch.Tensor] = {}
        loss = 0.0
        position_ids = batch["position_ids"]
        align_scale = norms["world"] / max(norms["align"], 1)
        if any(t in self.objective for t in ALIGN_TERMS):
            x0 = teacher_out.get("mixer_in", teacher_out.get("block_in", {}))[self.align_layers[0]]
            context = _layer_context(self.student, x0, position_ids)
            mask = batch["token_mask"]
            for term, run, inp, out in (("attn_align", run_mixer, "mixer_in", "mixer_out"),
                                        ("hidden_align", run_block, "block_in", "block_out")):
                if term not in self.objective:
                    continue
                total = sum(relative_mse_sum(run(self.student, i, teacher_out[inp][i], position_ids, context),
                                             teacher_out[out][i], mask) for i in self.align_layers)
                terms[term] = total * align_scale
                loss = loss + self.objective[term] * terms[term]
            if "qk_align" in self.objective:
                mixers = [self.student.model.layers[i].self_attn for i in self.align_layers]
                total = sum(qk_distance_sum(kda_query_key(m, teacher_out["mixer_in"][i], position_ids),
                                            teacher_out["qk"][i], mask) for m, i in zip(mixers, self.align_layers))
                terms["qk_align"] = total * align_scale
                loss = loss + self.objective["qk_align"] * terms["qk_align"]
        if self.head.weights:
            hidden = self.student.model(input_ids=batch["input_ids"], position_ids=position_ids,
                                        use_cache=False).last_hidden_state
            mask = batch["loss_mask"]
            teacher_hidden = teacher_head = None
            if "topk" in teacher_out:  # a cached sparse teacher, already restricted to the scored tokens
                teacher_hidden = teacher_out["topk"]
            elif "kd" in self.head.weights:
                teacher_hidden, teacher_head = teacher_out["hidden"][mask], teacher_out["head"]
            total, head_terms = chunked_head_loss(hidden[mask], self.student.lm_head.weight, teacher_hidden,
                                                  teacher_head, batch["targets"][mask], self.head,
                                                  scale=norms["world"] / max(norms["tokens"], 1))
            loss = loss + total
            terms.update(head_terms)
        return loss, {k: v.detach() for k, v in terms.items()}
