"""KD/CE over the vocabulary: the chunked computation equals the full-logits one (value and gradients) and keeps no
[tokens, vocab] tensor for the backward; the divergences are the textbook ones."""
import math

import pytest
import torch
import torch.nn.functional as F

from gendistill.distill.losses import HeadLoss, chunked_head_loss, divergence, naive_head_loss




def _inputs(n=37, h=16, ht=24, v=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.5
    teacher_hidden = torch.randn(n, ht, generator=g)
    teacher_weight = torch.randn(v, ht, generator=g) * 0.5
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, teacher_hidden, teacher_weight, targets


@pytest.mark.parametrize("weights,kind,beta,temperature", [
    ({"kd": 1.0}, "fkl", 0.5, 1.0),
    ({"kd": 1.0}, "rkl", 0.5, 1.0),
    ({"kd": 1.0}, "jsd", 0.3, 1.0),
    ({"kd": 1.0}, "fkl", 0.5, 2.0),
    ({"ce": 1.0}, "fkl", 0.5, 1.0),
    ({"kd": 1.0, "ce": 0.25}, "jsd", 0.7, 1.5),
])
def test_chunked_loss_and_gradients_equal_full_logits(weights, kind, beta, temperature):
    hidden, weight, t_hidden, t_weight, targets = _inputs()
    spec = HeadLoss(weights=weights, divergence=kind, beta=beta, temperature=temperature, chunk_tokens=8)  # 37 = 4x8+5
    uses_teacher = "kd" in weights

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss1, terms1 = chunked_head_loss(h1, w1, t_hidden if uses_teacher else None, t_weight if uses_teacher else None,
                                      targets, spec, scale=1 / 37)
    (loss1 * 3.0).backward()  # a non-unit upstream gradient must be honoured
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss2, terms2 = naive_head_loss(h2, w2, t_hidden if uses_teacher else None, t_weight if uses_teacher else None,
                                    targets, spec, scale=1 / 37)
    (loss2 * 3.0).backward()

    assert loss1.item() > 1e-3
    torch.testing.assert_close(loss1, loss2, rtol=1e-5, atol=1e-7)
    for term in weights:
        torch.testing.assert_close(terms1[term], terms2[term], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-7)


def test_frozen_head_weight_gets_no_gradient_and_empty_selection_is_zero():
    hidden, weight, t_hidden, t_weight, targets = _inputs()
    h = hidden.clone().requires_grad_()
    loss, _ = chunked_head_loss(h, weight, t_hidden, t_weight, targets, HeadLoss({"kd": 1.0}, chunk_tokens=5))
    loss.backward()
    assert weight.grad is None and h.grad.abs().sum() > 0
    empty = torch.zeros(0, 16, requires_grad=True)
    loss, _ = chunked_head_loss(empty, weight, t_hidden[:0], t_weight, targets[:0], HeadLoss({"kd": 1.0}))
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 16)


def test_backward_keeps_no_vocabulary_sized_tensor():
    n, v, h = 64, 1000, 16
    hidden, weight, t_hidden, t_weight, targets = _inputs(n=n, h=h, v=v)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    spec = HeadLoss({"kd": 1.0, "ce": 0.5}, chunk_tokens=16)
    for fn in (chunked_head_loss, naive_head_loss):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(hidden.clone().requires_grad_(), weight.clone().requires_grad_(), t_hidden, t_weight, targets, spec)
        if fn is chunked_head_loss:
            assert max(saved) <= max(n * h, v * h) < n * v  # only d/dhidden and d/dweight
        else:
            assert max(saved) >= n * v  # the reference does keep full logits: the check above is meaningful


def test_divergences_match_their_definitions():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 50, generator=g), torch.randn(5, 50, generator=g) * 2
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    fkl = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)  # KL(teacher || student)
    torch.testing.assert_close(divergence(s, t, "fkl"), fkl)
    torch.testing.assert_close(divergence(s, t, "rkl"), divergence(t, s, "fkl"))
    torch.testing.assert_close(divergence(s, s, "fkl"), torch.zeros(5), atol=1e-6, rtol=0)
    jsd = divergence(s, t, "jsd", beta=0.5)
    torch.testing.assert_close(jsd, divergence(t, s, "jsd", beta=0.5))  # symmetric at beta = 0.5
    assert bool((jsd > 0).all()) and bool((jsd <= math.log(2) + 1e-6).all())
    m = 0.3 * lt.exp() + 0.7 * ls.exp()
    manual = 0.3 * (lt.exp() * (lt - m.log())).sum(-1) + 0.7 * (ls.exp() * (ls - m.log())).sum(-1)
    torch.testing.assert_close(divergence(s, t, "jsd", beta=0.3), manual, rtol=1e-5, atol=1e-6)
    # temperature softens both sides before comparing
    torch.testing.assert_close(divergence(s, t, "fkl", temperature=2.0), divergence(s / 2, t / 2, "fkl"))


def test_under_bf16_autocast_the_projections_run_in_bf16_and_match_full_logits():
    hidden, weight, t_hidden, t_weight, targets = _inputs()
    spec = HeadLoss({"kd": 1.0, "ce": 0.5}, chunk_tokens=8)
    results = []
    for fn in (chunked_head_loss, naive_head_loss):
        h = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = fn(h, weight, t_hidden.bfloat16(), t_weight.bfloat16(), targets, spec, scale=1 / 37)
        loss.backward()
        results.append((loss.detach(), h.grad))
    assert results[0][1].dtype == torch.float32  # gradient in the dtype of the (fp32) hidden states
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=5e-2, atol=5e-3)
    fp32, _ = chunked_head_loss(hidden, weight, t_hidden, t_weight, targets, spec, scale=1 / 37)
    assert results[0][0].item() != fp32.item()  # the bf16 path really ran
