"""Distillation throughput: the levers (stage settings) against the path they replace, the sparse top-k teacher
against the full KL, model FLOPs against what PyTorch executes, the --check estimate, the kernel cache, and the
bench (bench/kd_step.py) end to end on CPU."""
from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gendistill.distill import train_stage
from gendistill.distill.data import write_corpus
from gendistill.distill.losses import (TopK, HeadLoss, TeacherCapture, chunked_head_loss, divergence, teacher_topk,
                                       topk_kl)
from gendistill.distill.recipe import load_recipe, parse_stage
from gendistill.io import UserError
from gendistill.testing import random_teacher_and_student

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair():
    return random_teacher_and_student("tiny", seed=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 40, size=120)
    data = rng.integers(3, 384, size=int(lengths.sum()))
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c", data, np.ones_like(data), lengths, {"kind": "text"})


def losses(path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (path / "metrics.jsonl").read_text().splitlines()]


def stage(objective="kd", **kw):
    return {"name": objective, "objective": objective, "steps": 3, "seq_len": 32, "batch_size": 4,
            "micro_batch_size": 2, "lr": 1e-3, "schedule": "constant", "checkpoint_every": 0,
            "train": ["kda"] if "align" in objective else ["kda", "mlp", "norms"], **kw}


# ---- torch.compile: the KDA training path traces ----

def test_kda_layer_training_forward_compiles_as_one_graph(pair):
    """A student KDA block's training forward (reference math on CPU) traces into one graph (fullgraph: no break,
    no ContextVar, no data-dependent branch) and gives eager's output and gradients; with packed documents (their
    boundaries given, as the model computes them once per forward) the PyTorch KDA op is the one opaque call.
    Dynamo's tracing is what is checked here (backend "eager"); inductor's code is checked on the GPU."""
    from gendistill.linear_mixers import packed_documents

    student = copy.deepcopy(pair[1]).train()
    layer = student.model.layers[1]
    assert layer.layer_type == "linear_attention"
    x = torch.randn(2, 32, student.config.hidden_size, requires_grad=True)
    packed = torch.cat([torch.arange(20), torch.arange(12)])[None].expand(2, 32)
    for kwargs, fullgraph in (({}, True), ({"position_ids": packed, "kda_packing": packed_documents(packed)}, False)):
        torch.compiler.reset()
        results = []
        for fn in (layer.forward, torch.compile(layer.forward, fullgraph=fullgraph, backend="eager")):
            x.grad = None
            layer.zero_grad()
            y = fn(x, **kwargs)
            y.square().mean().backward()
            results.append((y.detach(), x.grad.clone(), layer.self_attn.f_b_proj.weight.grad.clone()))
        for eager, compiled in zip(*results):
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_compiled_code_follows_use_backend():
    """Compiled code reads the KDA backend through a global that dynamo guards on: forcing another backend
    recompiles instead of reusing a stale choice."""
    from gendistill.kda import current_backend, use_backend

    torch.compiler.reset()
    fn = torch.compile(lambda x: x * (1.0 if current_backend() == "auto" else 2.0), fullgraph=True, backend="eager")
    x = torch.ones(3)
    assert fn(x).tolist() == [1.0] * 3
    with use_backend("chunk"):
        assert current_backend() == "chunk" and fn(x).tolist() == [2.0] * 3
    assert fn(x).tolist() == [1.0] * 3


@pytest.mark.parametrize("objective", ["kd", "attn_align"])
def test_compile_teacher_batch_and_inference_mode_keep_the_losses(pair, corpus, tmp_path, objective):
    """The throughput settings change how a step runs, not what it computes: compiled blocks (dynamo; inductor's
    code generation is the GPU run's), one teacher forward for two micro-batches under inference mode, same losses."""
    teacher, student = pair
    runs = {}
    for name, extra in (("base", {}), ("fast", {"compile": "eager", "teacher_batch_size": 4,
                                                "teacher_inference_mode": True})):
        torch.compiler.reset()
        train_stage(stage(objective, **extra), copy.deepcopy(student), teacher=teacher, data=corpus,
                    out_dir=tmp_path / name, progress=False, tensorboard=False, save=False)
        runs[name] = losses(tmp_path / name)
    assert runs["fast"] == pytest.approx(runs["base"], rel=1e-5)
    assert all("forward" not in vars(layer) for layer in teacher.model.layers)  # the shared teacher: uncompiled


def test_teacher_batch_splits_back_to_each_micro_batch(pair):
    """run_many: one forward on micro-batches side by side equals one forward per micro-batch."""
    teacher = pair[0]
    capture = TeacherCapture(teacher, mixer_layers=[1], block_layers=[3], need_hidden=True, inference_mode=True)
    batches = [{"input_ids": torch.randint(3, 384, (2, 16)), "position_ids": torch.arange(16).expand(2, 16)}
               for _ in range(3)]
    together = capture.run_many(batches)
    for batch, joint in zip(batches, together):
        alone = capture.run(batch)
        for key in ("hidden",):
            torch.testing.assert_close(joint[key], alone[key], rtol=1e-5, atol=1e-6)
        for key in ("mixer_in", "mixer_out", "block_in", "block_out"):
            torch.testing.assert_close(joint[key], alone[key], rtol=1e-5, atol=1e-6)
        assert not joint["hidden"].is_inference()  # cloned out: the student's backward may save it
    capture.close()


# ---- sparse teacher: top-k + tail bucket ----

def test_topk_kl_is_the_full_kl_minus_the_tail_term_and_grows_with_k():
    """KL_full = KL_k + r_t * KL(p_t(.|tail) || p_s(.|tail)) exactly (the chain rule over the partition S / tail):
    so KL_k <= KL_full, KL_k grows with k, and equals KL_full once the teacher's tail is empty."""
    torch.manual_seed(0)
    n, vocab = 64, 200
    student_logits, teacher_logits = torch.randn(n, vocab) * 2, torch.randn(n, vocab) * 3
    full = divergence(student_logits, teacher_logits)
    log_t, log_s = F.log_softmax(teacher_logits, -1), F.log_softmax(student_logits, -1)
    previous = torch.zeros(n)
    for k in (1, 5, 20, 100, 199, 200):
        values, ids = log_t.topk(k, dim=-1)
        kl_k = topk_kl(student_logits, TopK(ids.to(torch.int32), values))
        tail = torch.ones(n, vocab, dtype=torch.bool).scatter(-1, ids, False)
        if k < vocab:  # the within-tail divergence, computed independently from the full distributions
            t_tail = torch.where(tail, log_t, -math.inf)
            s_tail = torch.where(tail, log_s, -math.inf)
            r_t = torch.logsumexp(t_tail, -1)
            cond_t, cond_s = t_tail - r_t[:, None], s_tail - torch.logsumexp(s_tail, -1)[:, None]
            within = torch.where(tail, cond_t.exp() * (cond_t - cond_s), 0.0).sum(-1)
            torch.testing.assert_close(kl_k + r_t.exp() * within, full, rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(kl_k, full, rtol=1e-5, atol=1e-6)
        assert (kl_k <= full + 1e-5).all() and (kl_k >= previous - 1e-5).all()
        previous = kl_k


def test_chunked_topk_kd_matches_its_reference_in_value_and_gradient():
    """The chunked path's closed-form gradient (p_s - p~_t) against autograd through `topk_kl`, with CE beside it."""
    torch.manual_seed(0)
    n, hidden, vocab = 45, 8, 70
    h, w = torch.randn(n, hidden, requires_grad=True), (torch.randn(vocab, hidden) * 0.5).requires_grad_()
    topk = teacher_topk(torch.randn(n, hidden), torch.randn(vocab, hidden), k=7, temperature=1.5, chunk_tokens=16)
    targets = torch.randint(0, vocab, (n,))
    spec = HeadLoss({"kd": 1.0, "ce": 0.3}, temperature=1.5, chunk_tokens=16)
    total, terms = chunked_head_loss(h, w, topk, None, targets, spec, scale=0.1)
    total.backward()
    got = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    logits = h @ w.T
    kd = topk_kl(logits, topk, temperature=1.5).sum() * 0.1
    ce = F.cross_entropy(logits, targets, reduction="sum") * 0.1
    (kd + 0.3 * ce).backward()
    torch.testing.assert_close(total, kd + 0.3 * ce, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["kd"], kd.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[0], h.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[1], w.grad, rtol=1e-4, atol=1e-6)


def test_teacher_cache_is_written_once_then_read_without_the_teacher(pair, corpus, tmp_path, monkeypatch):
    teacher, student = pair
    cache = tmp_path / "cache"
    settings = {"kd_topk": 16, "teacher_cache": str(cache)}
    train_stage(stage(**settings), copy.deepcopy(student), teacher=teacher, data=corpus, out_dir=tmp_path / "a",
                progress=False, tensorboard=False, save=False)
    (key_dir,) = cache.iterdir()
    files = sorted(p.name for p in key_dir.glob("*.safetensors"))
    assert files == [f"step{s:08d}-mb{j:04d}.safetensors" for s in range(3) for j in range(2)]
    manifest = json.loads((key_dir / "manifest.json").read_text())
    assert manifest["kd_topk"] == 16 and len(manifest["teacher.weights.sha256"]) == 64

    def no_teacher(*_):
        raise AssertionError("the teacher ran although its top-k is cached")
    monkeypatch.setattr(TeacherCapture, "run_many", no_teacher)
    train_stage(stage(**settings), copy.deepcopy(student), teacher=teacher, data=corpus, out_dir=tmp_path / "b",
                progress=False, tensorboard=False, save=False)
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    monkeypatch.undo()
    # another data order is another fingerprint: a second directory, written afresh
    train_stage(stage(seed=1, **settings), copy.deepcopy(student), teacher=teacher, data=corpus,
                out_dir=tmp_path / "c", progress=False, tensorboard=False, save=False)
    assert len(list(cache.iterdir())) == 2


def test_topk_kd_stays_close_to_full_kd_on_a_real_step(pair, corpus, tmp_path):
    """Top-64 of a 384-token vocabulary: the sparse KD loss is below the full one (KL_k <= KL) and close to it."""
    teacher, student = pair
    for name, extra in (("full", {}), ("topk", {"kd_topk": 64})):
        train_stage(stage(steps=1, **extra), copy.deepcopy(student), teacher=teacher, data=corpus,
                    out_dir=tmp_path / name, progress=False, tensorboard=False, save=False)
    full, sparse = losses(tmp_path / "full")[0], losses(tmp_path / "topk")[0]
    assert sparse <= full and sparse > 0.5 * full


@pytest.mark.parametrize("extra, message", [
    ({"objective": "ce", "kd_topk": 8}, "applies to the kd term"),
    ({"teacher_cache": "teacher-cache"}, "set kd_topk too"),
    ({"objective": {"kd": 1.0, "ce": 0.1}, "kd_kernel": "liger_kl"}, "computes forward KL alone"),
    ({"divergence": "rkl", "kd_kernel": "liger_jsd"}, "computes forward KL alone"),
    ({"kd_kernel": "fused"}, "expected one of chunked, liger_kl, liger_jsd"),
    ({"compile": 3}, "expected true, false or a torch.compile backend name"),
    ({"micro_batch_size": 2, "teacher_batch_size": 3}, "not a multiple of micro_batch_size"),
])
def test_throughput_settings_are_validated(extra, message):
    with pytest.raises(UserError, match=message):
        parse_stage({**stage(), **extra})


def test_throughput_settings_do_not_change_the_stage_fingerprint():
    """A resumed stage may switch levers (they change speed, not math); kd_topk changes the math."""
    base = parse_stage(stage()).math_keys()
    fast = parse_stage(stage(compile=True, teacher_batch_size=4, teacher_inference_mode=True)).math_keys()
    assert fast == base and "kd_topk" not in base
    assert parse_stage(stage(kd_topk=8)).math_keys()["kd_topk"] == 8


def test_liger_kernels_need_cuda(pair, corpus, tmp_path):
    with pytest.raises(UserError, match="need a CUDA GPU"):
        train_stage(stage(kd_kernel="liger_kl"), copy.deepcopy(pair[1]), teacher=pair[0], data=corpus,
                    out_dir=tmp_path, progress=False, tensorboard=False, save=False)


# ---- model FLOPs and MFU ----

def test_peak_table_matches_gpu_names():
    from gendistill.distill.throughput import mfu, peak_tflops

    assert peak_tflops("NVIDIA H200") == peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0 and peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("cpu") is None and mfu(1000.0, 1e9, "cpu") is None
    assert mfu(98_900.0, 1e9, "NVIDIA H200") == pytest.approx(0.1)


@pytest.mark.parametrize("train", ["all", ["kda", "mlp", "norms"]])
def test_linear_flops_equal_what_pytorch_executes(pair, train):
    """The formula's student matmul FLOPs (forward, input and weight gradients of every nn.Linear in the layers)
    against the matrix products torch's FlopCounterMode counts in a real forward+backward: frozen weights skip their
    weight gradients, and the gradient reaches every layer's inputs."""
    from torch.utils.flop_counter import FlopCounterMode

    from gendistill.distill.throughput import flops_per_token
    from gendistill.distill.trainer import trainable_groups

    student = copy.deepcopy(pair[1]).train()
    trainable_groups(student, train)
    seq = 32
    counter = FlopCounterMode(display=False)
    with counter:
        hidden = student.model(input_ids=torch.randint(3, 384, (1, seq)), use_cache=False).last_hidden_state
        hidden.square().mean().backward()
    # every nn.Linear (and the KDA mixer's merged projections) runs as mm/addmm; attention and KDA use bmm/sdpa
    ops = counter.get_flop_counts()["Global"]
    executed = sum(v for op, v in ops.items() if str(op) in ("aten.mm", "aten.addmm")) / seq
    parts = flops_per_token(student, None, {"ce": 1.0}, seq_len=seq)
    head = student.lm_head.in_features * student.lm_head.out_features
    head_flops = 2 * head * (3 if student.lm_head.weight.requires_grad else 2)
    formula = parts["student_forward"] + parts["student_input_grads"] + parts["student_weight_grads"] - head_flops
    assert formula == pytest.approx(executed, rel=1e-6)


def test_flops_per_stage_for_the_qwen3_0_6b_shape():
    """The 0.6B shape on the meta device: KD counts the teacher's whole forward and head, the alignment stages only
    the teacher layers up to the last aligned one, and the student parts of the stage."""
    from transformers import Qwen3ForCausalLM

    from gendistill.convert import convert
    from gendistill.distill.throughput import flops_per_token
    from gendistill.distill.trainer import align_layers, trainable_groups
    from gendistill.testing import qwen3_0_6b_config

    with torch.device("meta"):
        teacher = Qwen3ForCausalLM(qwen3_0_6b_config())
        student = convert(teacher, attention_layers=[0, 2, 6, 11, 13, 18, 21])
    trainable_groups(student, ["kda", "mlp", "norms"])
    kd = flops_per_token(student, teacher, {"kd": 1.0}, seq_len=2048)
    n_teacher = sum(p.numel() for n, p in teacher.named_parameters() if p.dim() == 2 and "embed" not in n) \
        + teacher.lm_head.weight.numel()
    assert kd["teacher_forward"] == 2 * n_teacher
    assert 2.5e9 < kd["total"] < 5e9  # ~6 x 0.44B trained student + 2 x 0.6B teacher + attention
    s = parse_stage(stage("attn_align"))
    trainable_groups(student, s.train)
    align = flops_per_token(student, teacher, s.objective, align_layers(s, student), seq_len=2048)
    assert align["teacher_forward"] < kd["teacher_forward"] and align["total"] < kd["total"] / 2


# ---- --check: the bill before the run ----

def test_check_prints_each_stages_wall_time_and_the_total(capsys):
    from gendistill.cli import main

    assert main(["distill", "tiny.yaml", "--check", "--set", "*.steps=3"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "steps x" in line and "calibrated" in line]
    assert [line.split(":")[0].strip() for line in lines] == ["1. attn_align", "2. hidden_align", "3. kd",
                                                             "4. kd_instruct"]
    assert "total:" in out and "kernel cache:" in out


def test_estimate_uses_a_matching_table_row(pair, tmp_path):
    """A bench row measured with a stage's exact key gives its tokens/s, no calibration."""
    from gendistill.distill import parallel
    from gendistill.distill.throughput import estimate_stages, model_key, stage_key

    teacher, student = pair
    recipe = load_recipe({"name": "t", "teacher": {"config": {"model_type": "qwen3"}}, "student": {"convert": {}},
                          "data": {"d": {"path": "x.jsonl"}}, "stages": [{**stage(), "steps": 10, "data": "d"}]})
    s = recipe.stages[0]
    key = stage_key(s, model_key(teacher, student), "cpu", 1, 2)
    table = tmp_path / "kd_step.json"
    table.write_text(json.dumps({"rows": [{"key": json.loads(json.dumps(key)), "tokens_per_s": 640.0}]}))
    (row,) = estimate_stages(recipe, teacher, student, parallel.Env(), "cpu", table=table, calibrate=False)
    assert row["source"].startswith("table") and row["micro_batches_per_step"] == 2
    assert row["step_s"] == pytest.approx(2 * 2 * 32 / 640.0) and row["seconds"] == pytest.approx(10 * row["step_s"])


# ---- kernel cache ----

def test_kernel_cache_defaults_under_gendistill_and_keeps_the_users(tmp_path, monkeypatch):
    import gendistill.kernels.cache as kernel_cache

    monkeypatch.setenv("GENDISTILL_CACHE", str(tmp_path))
    env = {}
    report = kernel_cache.configure("NVIDIA H200", environ=env)
    assert env == {"TRITON_CACHE_DIR": str(tmp_path / "triton")} and report["triton_cache_files"] == 0
    env = {"TRITON_CACHE_DIR": "/x", "FLA_CACHE_MODE": "disabled"}
    report = kernel_cache.configure("NVIDIA H200", environ=env)
    assert env == {"TRITON_CACHE_DIR": "/x", "FLA_CACHE_MODE": "disabled"}  # the user's settings stand
    assert "set by the user" in report["fla_configs"]
    assert kernel_cache.gpu_key("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"


@pytest.mark.parametrize("versions, pinned", [("installed", True), ("other", False)])
def test_pinned_configs_apply_only_for_their_gpu_and_versions(tmp_path, monkeypatch, versions, pinned):
    import gendistill.kernels.cache as kernel_cache

    monkeypatch.setattr(kernel_cache, "PINNED_ROOT", tmp_path)
    (tmp_path / "NVIDIA_H200").mkdir()
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    installed = {"fla": version("fla-core") or version("flash-linear-attention"), "triton": version("triton")}
    manifest = installed if versions == "installed" else {"fla": "0.0", "triton": "0.0"}
    (tmp_path / "NVIDIA_H200" / "manifest.json").write_text(json.dumps(manifest))
    env = {"TRITON_CACHE_DIR": "/x"}
    kernel_cache.configure("NVIDIA H200", environ=env)
    assert (env.get("FLA_CONFIG_DIR") == str(tmp_path / "NVIDIA_H200")) is pinned
    assert (env.get("FLA_CACHE_MODE") == "fuzzy") is pinned  # other shapes take the nearest entry, no autotuning
    other_gpu = {"TRITON_CACHE_DIR": "/x"}
    kernel_cache.configure("NVIDIA A100", environ=other_gpu)
    assert other_gpu == {"TRITON_CACHE_DIR": "/x"}  # nothing pinned for that GPU


def test_an_h200_takes_the_h100_set_unless_it_has_its_own(tmp_path, monkeypatch):
    import gendistill.kernels.cache as kernel_cache

    monkeypatch.setattr(kernel_cache, "PINNED_ROOT", tmp_path)
    manifest = {"fla": kernel_cache._version("fla-core") or kernel_cache._version("flash-linear-attention"),
                "triton": kernel_cache._version("triton")}
    for gpu in ("NVIDIA_H100_80GB_HBM3", "NVIDIA_H200"):
        env = {"TRITON_CACHE_DIR": "/x"}
        (tmp_path / gpu).mkdir()
        (tmp_path / gpu / "manifest.json").write_text(json.dumps(manifest))
        kernel_cache.configure("NVIDIA H200", environ=env)
        assert env["FLA_CONFIG_DIR"] == str(tmp_path / gpu)  # first the H100's, then its own
    env = {"TRITON_CACHE_DIR": "/x"}
    kernel_cache.configure("NVIDIA H100 PCIe", environ=env)  # another chip (114 SMs): nothing
    assert "FLA_CONFIG_DIR" not in env


def test_kernels_warm_names_its_mixers_and_needs_cuda(capsys):
    from gendistill import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["kernels", "warm", "--mixers", "kda,lstm"])
    assert exit_info.value.code == 2 and "unknown mixer(s) lstm" in capsys.readouterr().err
    assert cli.main(["kernels", "export", "out", "--mixers", "all"]) != 0  # this CPU machine: a clear error
    assert "need a CUDA GPU" in capsys.readouterr().err


def test_shipped_pinned_configs_are_whole_and_in_fla_format():
    """Each GPU's shipped set (gendistill/kernels/configs/<gpu>/, written by `gendistill kernels export` on that
    GPU): its directory is fla's name for the GPU in the manifest, and every kernel the manifest lists has its file,
    in fla's format, with as many autotuning entries as the manifest says, for the manifest's Triton."""
    from gendistill.kernels.cache import PINNED_ROOT, gpu_key

    sets = [d for d in PINNED_ROOT.iterdir() if d.is_dir()]
    assert sets, "no pinned configs shipped"
    for directory in sets:
        manifest = json.loads((directory / "manifest.json").read_text())
        assert directory.name == gpu_key(manifest["gpu"]) and manifest["fla"] and manifest["triton"]
        files = {f.stem for f in directory.glob("*.json")} - {"manifest"}
        assert files == set(manifest["kernels"]), directory
        for name, entries in manifest["kernels"].items():
            config = json.loads((directory / f"{name}.json").read_text())
            assert config["kernel_name"] == name and config["triton_version"] == manifest["triton"]
            assert len(config["autotune_entries"]) == entries
            for entry in config["autotune_entries"].values():
                assert entry["autotune_key"] and {"num_warps", "num_stages"} <= set(entry["config"])


# ---- the bench itself ----

def test_kd_step_bench_runs_on_cpu(tmp_path):
    out = tmp_path / "kd.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "kd_step.py"), "--shape", "tiny", "--rows",
                           "kd,ce,attn_align", "--seq-lens", "32", "--levers", "teacher_batch,topk", "--optimized",
                           "teacher_batch", "--curves", "4", "--steps", "1", "--warmup", "1", "--no-hf",
                           "--profile", "kd", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "GENDISTILL_CACHE": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    env = result["environment"]
    assert env["command"] and env["date"] and "commit" in env and env["torch"] == torch.__version__
    rows = {(r["row"], r["lever"]): r for r in result["rows"]}
    assert set(rows) == {("kd", "baseline"), ("kd", "teacher_batch"), ("kd", "topk"), ("kd", "optimized"),
                         ("ce", "baseline"), ("attn_align", "baseline"), ("attn_align", "optimized")}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["first_step_s"] > 0 and r["flops_per_token"]["total"] > 0
        assert r["mfu"] is None and r["key"]["model"]["layers"] == 4  # no peak known for a CPU
    assert rows[("kd", "baseline")]["flops_per_token"]["teacher_forward"] > 0
    assert rows[("ce", "baseline")]["flops_per_token"]["teacher_forward"] == 0
    assert rows[("kd", "topk")]["write_pass_step_s"] > 0
    curves = result["curves"]
    assert len(curves["baseline"]) == len(curves["optimized"]) == 4 and curves["verdict"] == "within noise"
    # same seed, same data: the first step (before any update) differs by rounding only, the repeat not at all
    assert curves["first_step_rel_diff"] < 1e-5 and curves["baseline_repeat"] == curves["baseline"]
    assert result["optimized"] == ["teacher_batch"] and "FLOPs/token" in result["flops_formula"]
    profiles = {p["lever"]: p for p in result["profiles"]}
    assert set(profiles) == {"baseline", "optimized"} and all(p["row"] == "kd" for p in profiles.values())
    for p in profiles.values():  # two profiled steps of the real trainer, their operators sorted into categories
        assert p["steps"] == 2 and 0 < p["busy_ms"] <= p["wall_ms"] and p["categories"]["gemm"]["ms"] > 0
        assert sum(c["ms"] for c in p["categories"].values()) == pytest.approx(p["kernel_ms"])
        assert "mfu_factors" not in p and p["holds_back"].startswith("besides the GEMMs: idle")
        # every operator in one phase of the step, found through the trainer's record_function ranges
        assert set(p["phases_ms"]) >= {"teacher forward", "student forward + loss", "backward", "optimizer"}
        assert sum(p["phases_ms"].values()) == pytest.approx(p["kernel_ms"])
        assert p["phases_ms"]["unlinked"] < 0.01 * p["kernel_ms"]  # every operator found its phase
        assert p["phases_ms"].get("other", 0) < 0.05 * p["kernel_ms"]


def test_profile_attribution_takes_mfu_apart():
    sys.path.insert(0, str(ROOT / "bench"))
    from profiling import attribute, category, holds_back, union_us

    assert union_us([(0, 10), (5, 15), (20, 25), (21, 22)]) == 20
    assert category("sm90_xmma_gemm_bf16") == "gemm" and category("chunk_kda_fwd_kernel") == "kda_kernels"
    # two steps: overlapping GEMMs on two streams, a loss kernel, idle gaps; times in microseconds
    step = [("nvjet_gemm", 0, 10_000), ("cutlass_gemm", 5_000, 15_000), ("softmax_fwd", 20_000, 25_000)]
    kernels = step + [(name, start + 50_000, end + 50_000) for name, start, end in step]
    r = attribute(kernels, wall_s=0.1, steps=2, model_flops_per_step=1e12, peak_tflops=100)
    assert r["wall_ms"] == 50 and r["busy_ms"] == 20 and r["idle_ms"] == 30 and r["launches"] == 3
    assert r["categories"]["gemm"]["ms"] == 20 and r["categories"]["loss"]["ms"] == 5
    f = r["mfu_factors"]  # MFU = 1e12 / (0.05 s x 1e14) = 0.2 = busy 0.4 x GEMM share 1.0 x GEMM rate 0.5
    assert f["mfu"] == pytest.approx(0.2) and f["busy_fraction"] == pytest.approx(0.4)
    assert f["gemm_share_of_busy"] == pytest.approx(1.0) and f["gemm_rate_over_peak"] == pytest.approx(0.5)
    assert f["busy_fraction"] * f["gemm_share_of_busy"] * f["gemm_rate_over_peak"] == pytest.approx(f["mfu"])
    assert holds_back(r).startswith("MFU 20.0% = busy 40% x GEMM share 100% x GEMM rate 50% of peak")
