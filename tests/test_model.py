"""Hybrid-KDA model: parity with Qwen3, cache/padding/packing exactness, save/load, generation."""
import copy
import json
import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, Qwen3ForCausalLM

import gendistill
from gendistill import convert
from gendistill.convert import default_attention_layers
from gendistill.kda import use_backend
from gendistill.kernels.hybrid import FusedKDAMixer as KDAMixer
from gendistill.modeling import HybridKDAForCausalLM, no_weight_decay, parameter_group
from gendistill.testing import qwen3_0_6b_config, tiny_qwen3


@pytest.fixture(scope="module")
def teacher():
    return tiny_qwen3(layers=4)


@pytest.fixture(scope="module")
def student(teacher):
    return convert(teacher, attention_layers=[0, 2])


def ids(B, T, seed=0):
    return torch.randint(3, 384, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_all_attention_student_equals_qwen3(teacher):
    s = convert(teacher, attention_layers=[0, 1, 2, 3])
    x = ids(2, 33)
    torch.testing.assert_close(s(x).logits, teacher(x).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_kda_layers_start_from_teacher_projections(teacher, student):
    assert student.config.layer_types == ["full_attention", "linear_attention", "full_attention", "linear_attention"]
    for i in (1, 3):
        mixer, attn = student.model.layers[i].self_attn, teacher.model.layers[i].self_attn
        assert isinstance(mixer, KDAMixer)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(getattr(mixer, name).weight, getattr(attn, name).weight)
        # identity short conv, fresh gate parameters in the paper's ranges
        assert torch.equal(mixer.q_conv1d.weight[..., -1], torch.ones_like(mixer.q_conv1d.weight[..., -1]))
        assert mixer.q_conv1d.weight[..., :-1].abs().sum() == 0 and mixer.q_conv1d.bias.abs().sum() == 0
        assert 0 <= mixer.A_log.min() and mixer.A_log.max() <= torch.log(torch.tensor(16.0))
        dt = torch.nn.functional.softplus(mixer.dt_bias)
        assert 1e-4 <= dt.min() and dt.max() <= 0.1 + 1e-6
    for i in (0, 2):
        assert torch.equal(student.model.layers[i].self_attn.q_norm.weight, teacher.model.layers[i].self_attn.q_norm.weight)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()


@torch.no_grad()
def test_chunk_and_recurrent_paths_agree_in_the_model(student):
    x = ids(2, 50)
    with use_backend("chunk"):
        fast = student(x).logits
    with use_backend("recurrent"):
        ref = student(x).logits
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ["chunk", "recurrent"])
@torch.no_grad()
def test_prefill_then_decode_equals_one_forward(backend, student):
    with use_backend(backend):
        x = ids(2, 40)
        full = student(x).logits
        cache = DynamicCache(config=student.config)
        pieces = [student(x[:, :25], past_key_values=cache, use_cache=True).logits]
        pieces.append(student(x[:, 25:30], past_key_values=cache, use_cache=True).logits)  # multi-token continuation
        for t in range(30, 40):
            pieces.append(student(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=1e-4)
        # cached states equal those of a single cached forward over all tokens
        cache_full = DynamicCache(config=student.config)
        student(x, past_key_values=cache_full, use_cache=True)
        for i in (1, 3):
            torch.testing.assert_close(cache.get_recurrent_state(i), cache_full.get_recurrent_state(i), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(cache.get_conv_state(i), cache_full.get_conv_state(i))
        assert cache.get_seq_length() == 40


def left_pad(rows, pad_id=0):
    L = max(len(r) for r in rows)
    input_ids = torch.stack([torch.cat([torch.full((L - len(r),), pad_id), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(L - len(r), dtype=torch.long), torch.ones(len(r), dtype=torch.long)])
                        for r in rows])
    return input_ids, mask


@pytest.mark.parametrize("backend", ["chunk", "recurrent"])
@torch.no_grad()
def test_left_padded_batch_equals_each_row_alone(backend, student):
    with use_backend(backend):
        rows = [ids(1, n, seed=n)[0] for n in (4, 17, 9)]
        x, mask = left_pad(rows)
        batched = student(x, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = student(r[None]).logits[0]
            torch.testing.assert_close(batched[i, -len(r):], alone, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_greedy_generate_batched_and_cached_is_exact(student):
    rows = [ids(1, n, seed=10 + n)[0] for n in (6, 13, 3)]
    x, mask = left_pad(rows)
    batched = student.generate(x, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    for i, r in enumerate(rows):
        alone = student.generate(r[None], max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(r):]
        assert batched[i, x.shape[1]:].tolist() == alone.tolist()
        # cached greedy == argmax of the uncached forward, token by token
        seq = r[None]
        for _ in range(12):
            seq = torch.cat([seq, student(seq).logits[:, -1:].argmax(-1)], 1)
        assert seq[0, len(r):].tolist() == alone.tolist()


@torch.no_grad()
def test_sampling_generate_runs_and_is_seeded(student):
    x = ids(2, 8)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        outs.append(student.generate(x, max_new_tokens=6, do_sample=True, top_k=20, top_p=0.9, temperature=0.8,
                                     pad_token_id=0))
    assert torch.equal(outs[0], outs[1]) and outs[0].shape == (2, 14)


@pytest.mark.parametrize("backend", ["chunk", "recurrent"])
@torch.no_grad()
def test_packed_documents_equal_documents_alone(backend, student):
    with use_backend(backend):
        docs = [ids(1, n, seed=n)[0] for n in (9, 21, 5)]
        packed = torch.cat(docs)[None]
        position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
        out = student(packed, position_ids=position_ids, use_cache=False).logits[0]
        start = 0
        for d in docs:
            torch.testing.assert_close(out[start:start + len(d)], student(d[None]).logits[0], atol=1e-5, rtol=1e-5)
            start += len(d)


@torch.no_grad()
def test_document_boundaries_are_looked_for_once_per_forward_at_most(student, monkeypatch):
    """Finding packed-document starts syncs with the device: never for positions the model makes itself, once per
    forward (not once per KDA layer) for the caller's, packed or not: the KDA layers reuse the model's boundaries."""
    import gendistill.linear_mixers as layers

    calls = []
    real = layers.document_starts
    monkeypatch.setattr(layers, "document_starts", lambda p: calls.append(1) or real(p))
    x = ids(1, 12)
    student(x, use_cache=False)
    assert calls == []
    student(x, position_ids=torch.arange(12)[None], use_cache=False)  # one document: no reset for the KDA layers
    assert calls == [1]
    calls.clear()
    student(x, position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None], use_cache=False)
    assert calls == [1]


def test_save_and_auto_load_round_trip(student, tmp_path):
    student.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "hybrid_kda"
    assert type(AutoConfig.from_pretrained(tmp_path)).__name__ == "HybridKDAConfig"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, HybridKDAForCausalLM)
    x = ids(2, 20)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, student(x).logits)


def test_parameter_groups_and_weight_decay(student, teacher):
    groups = {n: parameter_group(student, n) for n, _ in student.named_parameters()}
    assert groups["model.layers.1.self_attn.A_log"] == "kda"
    assert groups["model.layers.1.self_attn.o_norm.weight"] == "kda"
    assert groups["model.layers.0.self_attn.q_proj.weight"] == "attention"
    assert groups["model.layers.3.mlp.up_proj.weight"] == "mlp"
    assert groups["model.layers.3.input_layernorm.weight"] == "norms" and groups["model.norm.weight"] == "norms"
    assert groups["model.embed_tokens.weight"] == "embeddings"
    assert {parameter_group(teacher, n) for n, _ in teacher.named_parameters()} == {"attention", "mlp", "norms",
                                                                                    "embeddings"}
    assert no_weight_decay("model.layers.1.self_attn.dt_bias") and no_weight_decay("model.layers.1.self_attn.A_log")
    assert no_weight_decay("model.layers.1.self_attn.g_b_proj.bias") and no_weight_decay("model.norm.weight")
    assert no_weight_decay("model.layers.1.self_attn.o_norm.weight")
    assert not no_weight_decay("model.layers.1.self_attn.q_proj.weight")


def test_default_attention_layers():
    assert default_attention_layers(28) == [0, 2, 6, 11, 13, 18, 21]
    assert default_attention_layers(8) == [3, 7]
    assert len(default_attention_layers(12)) == 3 and default_attention_layers(12)[-1] == 11
    assert len(default_attention_layers(28, ratio=0.5)) == 14


def test_qwen3_0_6b_shape_converts_and_generates():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    cfg = qwen3_0_6b_config()
    # built on the meta device and filled with a constant: random init of 0.6B parameters takes 20 s on CI's CPU,
    # and this test is about shapes and a generate() that runs, not about values
    with torch.device("meta"):
        teacher = Qwen3ForCausalLM(cfg)
    teacher.to_empty(device="cpu").eval().tie_weights()  # to_empty unties the embedding and the head
    with torch.no_grad():
        for p in teacher.parameters():
            p.fill_(0.01)
    teacher.model.rotary_emb = Qwen3RotaryEmbedding(config=cfg)  # its frequencies are a buffer to_empty left unset
    student = convert(teacher)
    assert student.config.attention_layers == [0, 2, 6, 11, 13, 18, 21]
    mixer = student.model.layers[1].self_attn
    assert mixer.q_proj.weight.shape == (2048, 1024) and mixer.k_proj.weight.shape == (1024, 1024)
    assert mixer.f_b_proj.weight.shape == (2048, 128) and mixer.A_log.shape == (16,) and mixer.dt_bias.shape == (2048,)
    extra = sum(p.numel() for p in student.parameters()) - sum(p.numel() for p in teacher.parameters())
    assert 15e6 < extra < 25e6  # ~0.83M per KDA layer over 21 layers (runtime k/v repeat, no expanded weights)
    out = student.generate(torch.tensor([[151643, 40, 1000, 2000]]), max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    del teacher, student


def test_convert_cli_errors_leave_nothing(tmp_path, teacher, capsys):
    from gendistill.cli import main as cli_main

    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    out = tmp_path / "student"
    # once as a process (the exit status a shell sees), then in-process: each process start costs seconds on CI
    r = subprocess.run([sys.executable, "-m", "gendistill", "convert", "--teacher", str(teacher_dir),
                        "--attention-layers", "0,9", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "out of range" in r.stderr and not out.exists()

    def run(*a):
        rc = cli_main(["convert", *a])
        return rc, capsys.readouterr().err

    rc, err = run("--teacher", str(teacher_dir), "--attention-layers", "1,1", "--out", str(out))
    assert rc == 2 and "repeated" in err and not out.exists()
    rc, err = run("--teacher", str(tmp_path / "nope"), "--out", str(out))
    assert rc == 2 and "could not load teacher" in err and not out.exists()
    rc, err = run("--teacher", str(teacher_dir), "--attention-layers", "0,2", "--out", str(out))
    assert rc == 0, err
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.attention_layers == [0, 2]
    rc, err = run("--teacher", str(teacher_dir), "--out", str(out))
    assert rc == 2 and "already exists" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


def test_convert_rejects_non_qwen3_teacher():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(gendistill.io.UserError, match="not Qwen3-like"):
        convert(gpt2)


@pytest.mark.parametrize("backend", ["chunk", "recurrent"])
@torch.no_grad()
def test_segmented_prefill_equals_one_pass(backend, student):
    with use_backend(backend):
        x = ids(2, 45)
        rows, mask = left_pad([ids(1, n, seed=n)[0] for n in (45, 30)])
        whole, whole_padded = student(x).logits, student(rows, attention_mask=mask).logits
        cache_whole = DynamicCache(config=student.config)
        student(x, past_key_values=cache_whole, use_cache=True)
        mixers = [layer.self_attn for layer in student.model.layers if isinstance(layer.self_attn, KDAMixer)]
        try:
            for m in mixers:
                m.prefill_chunk = 8  # 45 tokens -> 6 segments, the last one partial
            torch.testing.assert_close(student(x).logits, whole, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(student(rows, attention_mask=mask).logits, whole_padded, atol=1e-5, rtol=1e-5)
            cache = DynamicCache(config=student.config)
            student(x, past_key_values=cache, use_cache=True)
            for m in mixers:
                i = m.layer_idx
                torch.testing.assert_close(cache.get_recurrent_state(i), cache_whole.get_recurrent_state(i))
                torch.testing.assert_close(cache.get_conv_state(i), cache_whole.get_conv_state(i))
        finally:
            for m in mixers:
                m.prefill_chunk = student.config.kda_prefill_chunk


def test_weight_edits_between_forwards_take_effect(teacher):
    """No merge of the projections' weights outlives a call: an optimizer step, an in-place `.data` edit (which does
    not bump the tensor's version) and load_state_dict after a forward each change the next forward exactly as a
    freshly built model with those weights computes it."""
    student = convert(teacher, attention_layers=[0])
    mixer = next(m for m in student.modules() if isinstance(m, KDAMixer))
    x = torch.randint(3, 300, (1, 12))

    def fresh_logits():
        fresh = HybridKDAForCausalLM(student.config).eval()
        fresh.load_state_dict(student.state_dict())
        with torch.no_grad():
            return fresh(x).logits

    with torch.no_grad():
        before = student(x).logits
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    student(x).logits.sum().backward()  # gradients reach every merged part
    assert mixer.f_a_proj.weight.grad is not None and mixer.q_conv1d.weight.grad is not None
    optimizer.step()
    with torch.no_grad():
        stepped = student(x).logits
        torch.testing.assert_close(stepped, fresh_logits(), atol=0, rtol=0)
        assert not torch.allclose(stepped, before)
        version = mixer.f_a_proj.weight._version
        mixer.f_a_proj.weight.data.mul_(3.0)  # .data: no version bump, the case a version-keyed cache missed
        mixer.q_conv1d.weight.data[..., -1] += 0.5
        assert mixer.f_a_proj.weight._version == version
        edited = student(x).logits
        torch.testing.assert_close(edited, fresh_logits(), atol=0, rtol=0)
        assert not torch.allclose(edited, stepped)
        state = {k: v.clone() for k, v in student.state_dict().items()}
        state["model.layers.1.self_attn.g_a_proj.weight"].normal_()
        state["model.layers.1.self_attn.b_proj.weight"].normal_()
        student.load_state_dict(state)
        loaded = student(x).logits
        torch.testing.assert_close(loaded, fresh_logits(), atol=0, rtol=0)
        assert not torch.allclose(loaded, edited)


@pytest.mark.parametrize("backend", ["recurrent", "chunk"])
def test_gendistill_classes_equal_the_reference_model(student, backend):
    """gendistill's classes (merged GEMMs, segments, the residual folded into the norm) against the reference model
    that student directories ship (modeling_hybrid_kda: every projection and conv a module call): uncached, left-padded,
    packed documents, in segments, cached prefill + decode steps, and the gradients."""
    from gendistill import modeling_hybrid_kda as reference

    ref = reference.HybridKDAForCausalLM(student.config).eval()
    ref.load_state_dict(student.state_dict())
    assert not any(type(m) is KDAMixer for m in ref.modules()) and type(student.model.layers[1].self_attn) is KDAMixer
    x = ids(2, 30)
    rows, mask = left_pad([ids(1, n, seed=n)[0] for n in (30, 19)])
    docs = torch.cat([torch.arange(11), torch.arange(19)])[None].expand(2, 30)
    close = dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad(), use_backend(backend):
        for kwargs in ({}, {"position_ids": docs, "use_cache": False}):
            torch.testing.assert_close(student(x, **kwargs).logits, ref(x, **kwargs).logits, **close)
        torch.testing.assert_close(student(rows, attention_mask=mask).logits, ref(rows, attention_mask=mask).logits,
                                   **close)
        mixers = [m for m in student.modules() if isinstance(m, KDAMixer)]
        for m in mixers:
            m.prefill_chunk = 8
        try:
            torch.testing.assert_close(student(x).logits, ref(x).logits, **close)
        finally:
            for m in mixers:
                m.prefill_chunk = student.config.kda_prefill_chunk
        caches = [DynamicCache(config=student.config) for _ in range(2)]
        pieces = [[model(x[:, :25], past_key_values=c, use_cache=True).logits] for model, c in ((student, caches[0]),
                                                                                               (ref, caches[1]))]
        for t in range(25, 30):
            for piece, model, c in zip(pieces, (student, ref), caches):
                piece.append(model(x[:, t:t + 1], past_key_values=c, use_cache=True).logits)
        torch.testing.assert_close(torch.cat(pieces[0], 1), torch.cat(pieces[1], 1), **close)
        torch.testing.assert_close(torch.cat(pieces[1], 1), ref(x).logits, **close)
    with use_backend(backend):
        student.zero_grad(), ref.zero_grad()
        student(x, labels=x).loss.backward()
        ref(x, labels=x).loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    student.zero_grad()


class LargestTensor(TorchFunctionMode):
    """The largest tensor (bytes) any torch function or tensor method returns inside the block (torch's public
    function-mode hook: every Python-level call of an op, the mask builders' included)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        stack = [out]
        while stack:
            item = stack.pop()
            if isinstance(item, torch.Tensor):
                self.bytes = max(self.bytes, item.numel() * item.element_size())
            elif isinstance(item, (tuple, list)):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())
        return out


@torch.no_grad()
def test_generate_builds_nothing_at_full_length(student):
    """generate(ids, max_new_tokens=1) allocates no tensor larger than the cached forward it runs: no [T, T] mask, no
    full-length logits (issue 18: 56.6 GiB against 5.3 on an H200 at 128K). What did that there: a prompt holding
    the pad token's id (random ids over the whole vocabulary, with pad_token_id != eos_token_id) makes generate()
    infer an attention mask with a hole, so transformers builds the [B, 1, T, T] mask for the attention layers
    (16 GiB at 128K, and SDPA's bf16 copy of it) and SDPA leaves its flash kernel; an explicit attention_mask (or a
    prompt without that id) keeps the fast path."""
    T = 640  # a [T, T] bool mask outgrows every [T, width] activation of the tiny model (width 128 in fp32)
    x = torch.randint(3, 384, (1, T), generator=torch.Generator().manual_seed(0))
    seen = []
    hooks = [student.lm_head.register_forward_hook(lambda m, i, o: seen.append(("logits", o.shape[1])))]
    hooks += [layer.register_forward_pre_hook(
        lambda m, a, k: seen.append((m.layer_type, None if k["attention_mask"] is None else k["attention_mask"].dim())),
        with_kwargs=True) for layer in student.model.layers]
    try:
        with LargestTensor() as forward:
            student(x, past_key_values=DynamicCache(config=student.config), use_cache=True, logits_to_keep=1)
        seen.clear()
        with LargestTensor() as generate:
            student.generate(x, max_new_tokens=1, do_sample=False)
        assert seen == [(t, None) for t in student.config.layer_types] + [("logits", 1)]
        assert generate.bytes <= forward.bytes < T * T
        holed = x.clone()
        holed[0, T // 2] = student.generation_config.pad_token_id
        seen.clear()
        with LargestTensor() as inferred:
            student.generate(holed, max_new_tokens=1, do_sample=False)
        assert ("full_attention", 4) in seen and inferred.bytes >= T * T  # the cause, as transformers does it
        with LargestTensor() as explicit:
            student.generate(holed, attention_mask=torch.ones_like(holed), max_new_tokens=1, do_sample=False)
        assert explicit.bytes <= forward.bytes
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.gpu
@torch.no_grad()
def test_cuda_fast_path_equals_the_reference_model(teacher):
    """On the GPU: gendistill's classes (Triton head split, segments, fused norms) against the shipped reference model
    (fla's chunk kernel, conv and gated norm), fp32, uncached and cached + decode; and a projection replaced by a
    wrapper (as PEFT does) makes the fast mixer step aside for the module calls."""
    from gendistill import modeling_hybrid_kda as reference

    student = convert(teacher, attention_layers=[0, 2]).cuda().float().eval()
    ref = reference.HybridKDAForCausalLM(student.config).cuda().float().eval()
    ref.load_state_dict(student.state_dict())
    x = ids(2, 200).cuda()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    want = ref(x).logits
    assert rel(student(x).logits, want) < 1e-2
    cache = DynamicCache(config=student.config)
    pieces = [student(x[:, :190], past_key_values=cache, use_cache=True).logits]
    pieces += [student(x[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(190, 200)]
    assert rel(torch.cat(pieces, 1), want) < 1e-2

    class Doubled(torch.nn.Module):  # a wrapper around the real projection, as PEFT's LoRA layers are
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, h):
            return 2 * self.base(h)

    for model in (student, ref):
        model.model.layers[1].self_attn.f_a_proj = Doubled(model.model.layers[1].self_attn.f_a_proj)
    assert not student.model.layers[1].self_attn.fast_path_applies()
    changed = ref(x).logits
    assert rel(changed, want) > 1e-3 and rel(student(x).logits, changed) < 1e-2
