"""KD/CE over the vocabulary: the chunked computation equals the full-logits one (value and gradients) and keeps no
[tokens, vocab] tensor for the backward; the divergences are the textbook ones."""
import math

import pytest
import torch
import torch.nn.functional as F

from gendistill.distill.losses import HeadLoss, chunked_head_loss, divergence, naive_head_loss
from gendistill.recipes import ROOT as BUNDLED




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


# ---- stage-1 Q/K alignment, attention-block freezing, scored-token budgets (issue 24) ----

def _tiny_pair(layers=(0, 2)):
    from gendistill.convert import convert
    from gendistill.testing import tiny_qwen3

    teacher = tiny_qwen3()
    with torch.no_grad():  # trained teachers have non-unit q/k norm scales; the tiny one starts at 1
        for layer in teacher.model.layers:
            layer.self_attn.q_norm.weight.uniform_(0.2, 2.0)
            layer.self_attn.k_norm.weight.uniform_(0.2, 2.0)
    return teacher, convert(teacher, attention_layers=list(layers))


def test_qk_align_is_the_distance_between_normalised_teacher_and_kda_query_key_directions():
    from gendistill.distill.losses import kda_query_key, qk_distance_sum, teacher_query_key
    from gendistill.kda import l2norm

    teacher, student = _tiny_pair()
    x = torch.randn(2, 9, 64)
    position_ids = torch.arange(9)[None].expand(2, 9)
    attn, mixer = teacher.model.layers[1].self_attn, student.model.layers[1].self_attn
    q_t, k_t = teacher_query_key(attn, x)
    q_s, k_s = kda_query_key(mixer, x, position_ids)
    assert q_s.shape == q_t.shape == (2, 9, 4, 16) and k_s.shape == k_t.shape == (2, 9, 2, 16)
    # Conversion copies q/k_proj and the conv starts as identity: the student's q/k are the teacher's before q_norm.
    torch.testing.assert_close(k_s, attn.k_proj(x).view(2, 9, 2, 16))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 4:] = False
    by_hand = 0.0
    q_s, k_s, q_t, k_t = (t.detach() for t in (q_s, k_s, q_t, k_t))
    for s, t in ((q_s, q_t), (k_s, k_t)):
        for b, i in mask.nonzero().tolist():
            by_hand += sum(float(((l2norm(s[b, i, h]) - l2norm(t[b, i, h])) ** 2).sum()) for h in range(s.shape[2])) \
                / s.shape[2]
    assert float(qk_distance_sum((q_s, k_s), (q_t, k_t), mask)) == pytest.approx(by_hand / 2, rel=1e-5)
    assert by_hand > 1e-3  # the dropped q/k norm scales are the gap at the start
    # Folding the teacher's norm scales into the student's projections closes it exactly.
    with torch.no_grad():
        mixer.q_proj.weight.mul_(attn.q_norm.weight.repeat(4)[:, None])
        mixer.k_proj.weight.mul_(attn.k_norm.weight.repeat(2)[:, None])
    q_s, k_s = kda_query_key(mixer, x, position_ids)
    assert float(qk_distance_sum((q_s.detach(), k_s.detach()), (q_t, k_t), mask)) < 1e-9


def test_qk_align_stage_trains_kda_q_k_and_falls(tmp_path):
    from gendistill.distill import load_recipe, train_stage
    from gendistill.distill.data import PackedStream, build_corpus
    from gendistill.distill.recipe import DataSource
    from gendistill.distill.trainer import stage_loss
    from gendistill.testing import tiny_tokenizer

    data = BUNDLED / "data" / "tiny_text.jsonl"
    tok = tiny_tokenizer()
    corpus = build_corpus(DataSource(path=str(data)), "text", tok, tmp_path / "cache", 10**9)
    stage = load_recipe(BUNDLED / "tiny.yaml",
                        ["attn_align.objective=qk_align", "*.steps=10", "*.checkpoint_every=0"]).stage("attn_align")
    teacher, student = _tiny_pair()
    held_out = PackedStream(corpus, stage.seq_len, seed=5, loss_mask="all").batch(50, 4)
    before = stage_loss(stage, student, teacher, held_out)["qk_align"]
    train_stage(stage, student, teacher=teacher, tokenizer=tok, data=corpus, out_dir=tmp_path / "s", progress=False,
                tensorboard=False, save=False)
    after = stage_loss(stage, student, teacher, held_out)["qk_align"]
    assert after < 0.5 * before


def test_qk_align_refuses_attention_layers():
    from gendistill.distill import load_recipe
    from gendistill.distill.trainer import align_layers
    from gendistill.io import UserError

    stage = load_recipe(BUNDLED / "tiny.yaml",
                        ["attn_align.objective=qk_align", "attn_align.layers=all"]).stage("attn_align")
    with pytest.raises(UserError, match="not KDA"):
        align_layers(stage, _tiny_pair()[1])


def test_attention_block_freezes_the_attention_layers_input_norm_too():
    from gendistill.distill.trainer import trainable_groups
    from gendistill.io import UserError

    student = _tiny_pair()[1]  # layers 0 and 2 attention
    trainable_groups(student, ["kda", "mlp", "norms"])  # "attention frozen" as S2 reads the paper
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert "model.layers.0.input_layernorm.weight" in trained
    assert not any(".self_attn." in n for n in trained if n.startswith(("model.layers.0.", "model.layers.2.")))
    counts = trainable_groups(student, ["kda", "mlp", "norms"], freeze=["attention_block"])
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert {"model.layers.0.input_layernorm.weight", "model.layers.2.input_layernorm.weight"}.isdisjoint(trained)
    assert {"model.layers.1.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
            "model.norm.weight", "model.layers.1.self_attn.q_proj.weight"} <= trained
    assert set(counts) == {"kda", "mlp", "norms"}
    trainable_groups(student, ["attention_block"])
    trained = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in student.named_parameters()
                       if n.startswith(("model.layers.0.", "model.layers.2."))
                       and (".self_attn." in n or "input_layernorm" in n)}
    with pytest.raises(UserError, match="leaves no parameter"):
        trainable_groups(student, ["attention"], freeze=["attention_block"])


@pytest.mark.parametrize("loss_mask,kind", [("completion_only", "chat"), ("all", "text")])
def test_scored_budget_takes_the_fewest_steps_whose_scored_tokens_reach_it(tmp_path, loss_mask, kind):
    from gendistill.distill.data import PackedStream, build_corpus
    from gendistill.distill.recipe import DataSource, load_stage
    from gendistill.distill.trainer import stage_steps, stage_stream
    from gendistill.testing import tiny_tokenizer

    data = BUNDLED / "data" / f"tiny_{kind}.jsonl"
    corpus = build_corpus(DataSource(path=str(data)), kind, tiny_tokenizer(), tmp_path, 10**9)
    for budget in (1, 37, 500, 3 * corpus.num_tokens):  # the last spans several epochs
        stage = load_stage({"name": "s", "objective": "kd", "tokens": budget, "count": "scored", "seq_len": 16,
                            "batch_size": 3, "loss_mask": loss_mask})
        steps = stage_steps(stage, corpus)
        stream = stage_stream(stage, corpus)
        scored = lambda n: int(stream.batch(0, n * 3)["loss_mask"].sum()) if n else 0
        assert scored(steps) >= budget > scored(steps - 1), (budget, steps)
    assert isinstance(stream, PackedStream)


def test_a_scored_budget_stage_trains_until_its_scored_tokens_reach_the_budget(tmp_path):
    import json
    from gendistill.distill import train_stage
    from gendistill.distill.data import build_corpus
    from gendistill.distill.recipe import DataSource
    from gendistill.testing import tiny_tokenizer

    data = BUNDLED / "data" / "tiny_chat.jsonl"
    tok = tiny_tokenizer()
    corpus = build_corpus(DataSource(path=str(data)), "chat", tok, tmp_path / "cache", 10**9)
    teacher, student = _tiny_pair()
    stage = {"name": "kd_instruct", "objective": "kd", "loss_mask": "completion_only", "tokens": 300,
             "count": "scored", "seq_len": 32, "batch_size": 2, "train": ["kda"], "checkpoint_every": 0}
    summary = train_stage(stage, student, teacher=teacher, tokenizer=tok, data=corpus, out_dir=tmp_path / "s",
                          progress=False, tensorboard=False, save=False)
    per_step = [json.loads(line)["scored_tokens"] for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert summary["scored_tokens"] == sum(per_step) >= 300 > sum(per_step[:-1])
    assert summary["tokens"] == summary["steps"] * 64 > 300  # the packed tokens are more: prompts are not scored
