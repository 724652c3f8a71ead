"""The training loop on a tiny teacher/student: every objective really falls, freezing is exact, outputs are plain HF
dirs, a killed run resumes to the same weights, a checkpoint interrupted while written never replaces the last good
one, and a NaN stops the run naming the stage, step and term."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from gendistill.convert import convert
from gendistill.distill import TrainingDiverged, checkpoint, load_recipe, run_recipe, train_stage
from gendistill.distill.data import PackedStream, build_corpus
from gendistill.distill.recipe import DataSource
from gendistill.distill.trainer import stage_loss
from gendistill.modeling import parameter_group
from gendistill.recipes import ROOT as RECIPES
from gendistill.testing import tiny_qwen3, tiny_tokenizer

TINY = RECIPES / "tiny.yaml"
QUIET = ["progress=false", "tensorboard=false"]




@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    tok = tiny_tokenizer()
    cache = tmp_path_factory.mktemp("cache")
    text = build_corpus(DataSource(path=str(RECIPES / "data" / "tiny_text.jsonl")), "text", tok, cache, 10**9)
    chat = build_corpus(DataSource(path=str(RECIPES / "data" / "tiny_chat.jsonl")), "chat", tok, cache, 10**9)
    return {"text": text, "chat": chat, "tokenizer": tok}


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage_name,changes,min_drop", [
    ("attn_align", {}, 0.5),
    ("hidden_align", {}, 0.3),
    ("kd", {}, 0.25),
    ("kd_instruct", {}, 0.3),
    ("kd", {"divergence": "jsd", "jsd_beta": 0.5, "temperature": 2.0, "train": ["kda"]}, 0.2),
    ("kd", {"objective": {"kd": 1.0, "ce": 0.2}, "divergence": "rkl", "train": ["mlp", "embeddings"], "lr": 3e-3},
     0.08),
])
def test_each_objective_falls_and_only_trainable_groups_move(tmp_path, corpora, stage_name, changes, min_drop):
    recipe = load_recipe(TINY, ["*.steps=12"])
    stage = dataclasses.replace(recipe.stage(stage_name), checkpoint_every=0, **changes)
    corpus = corpora[recipe.data[stage.data].path.rsplit("_", 1)[-1].split(".")[0]]
    teacher = tiny_qwen3()
    student = convert(teacher, attention_layers=[0, 2])
    held_out = PackedStream(corpus, stage.seq_len, seed=999, loss_mask=stage.loss_mask).batch(100, 8)
    before, params = stage_loss(stage, student, teacher, held_out), _snapshot(student)
    teacher_params = _snapshot(teacher)

    result = train_stage(stage, student, teacher=teacher, tokenizer=corpora["tokenizer"], data=corpus,
                         out_dir=tmp_path / stage.name, progress=False, tensorboard=False)
    after = stage_loss(stage, student, teacher, held_out)
    assert after["loss"] < (1 - min_drop) * before["loss"], (before, after)
    for term in stage.objective:
        assert after[term] < before[term]
    trained = set(stage.train)
    for name, param in student.named_parameters():
        if parameter_group(student, name) in trained:
            assert not torch.equal(param, params[name]), f"{name} did not move"
        else:
            assert torch.equal(param, params[name]), f"frozen {name} changed"
    assert all(torch.equal(p, teacher_params[n]) for n, p in teacher.named_parameters())
    assert result["steps"] == 12 and result["trainable"].keys() == trained


def test_ce_trains_a_model_from_scratch_without_teacher(tmp_path):
    """The demo's teacher: a Qwen3 built from a config, pretrained on text, then chat SFT, by the same trainer."""
    raw = {
        "name": "scratch", "out_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False,
        "tokenizer": {"factory": "gendistill.testing:tiny_tokenizer"},
        "student": {"config": {"model_type": "qwen3", "vocab_size": 384, "hidden_size": 64, "intermediate_size": 128,
                               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               "head_dim": 16, "tie_word_embeddings": True}, "seed": 0},
        "data": {"text": str(RECIPES / "data" / "tiny_text.jsonl"), "chat": str(RECIPES / "data" / "tiny_chat.jsonl")},
        "defaults": {"seq_len": 32, "batch_size": 4, "steps": 15, "lr": 3e-3, "schedule": "constant",
                     "precision": "fp32", "checkpoint_every": 0},
        "stages": [{"name": "pretrain", "objective": "ce", "data": "text"},
                   {"name": "sft", "objective": "ce", "data": "chat", "loss_mask": "completion_only"}],
    }
    summary = run_recipe(raw)
    for stage in summary["stages"]:
        losses = [json.loads(l)["loss"] for l in open(Path(stage["model_dir"]).parent / "metrics.jsonl")]
        assert sum(losses[-3:]) / 3 < 0.75 * losses[0], losses
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(summary["final_model"])
    assert type(model).__name__ == "Qwen3ForCausalLM"


# ---- a short two-stage run, uninterrupted, used as the reference by the resume tests ----

def _two_stage(out, *extra):
    return [f"out_dir={out}", *QUIET, "stages=[{name: attn_align, objective: attn_align, data: text, train: [kda], "
            "steps: 3, lr: 3.0e-3}, {name: kd, objective: kd, data: text, train: [kda, mlp, norms], steps: 6, "
            "lr: 1.0e-3, schedule: wsd, warmup: 0.2, decay: 0.4, checkpoint_every: 2, keep_checkpoints: 2}]", *extra]


def _losses(stage_dir):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(Path(stage_dir) / "metrics.jsonl"))]


def _weights(model_dir):
    from safetensors.torch import load_file
    return load_file(str(Path(model_dir) / "model.safetensors"))


def _assert_same_run(a: Path, b: Path):
    for stage in ("01-attn_align", "02-kd"):
        la, lb = _losses(a / stage), _losses(b / stage)
        assert [s for s, _ in la] == [s for s, _ in lb] == list(range(1, len(la) + 1))
        assert max(abs(x - y) for (_, x), (_, y) in zip(la, lb)) <= 1e-6
        wa, wb = _weights(a / stage / "model"), _weights(b / stage / "model")
        assert wa.keys() == wb.keys()
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = run_recipe(TINY, _two_stage(out))
    return out, summary


def test_outputs_are_plain_hf_dirs_with_metrics_and_checkpoints(reference):
    from transformers import AutoModelForCausalLM

    out, summary = reference
    assert summary["final_model"] == str(out / "02-kd" / "model")
    assert (out / "recipe.yaml").exists() and json.loads((out / "run.json").read_text())["recipe"] == "tiny"
    model = AutoModelForCausalLM.from_pretrained(out / "02-kd" / "model")
    assert type(model).__name__ == "HybridKDAForCausalLM"
    final = checkpoint.load(checkpoint.latest(out / "02-kd"))
    assert final["step"] == 6
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, final["model"]["student." + name], rtol=0, atol=0)
    assert [p.name for _, p in checkpoint.list_checkpoints(out / "02-kd")] == ["step-0000004", "step-0000006"]
    records = [json.loads(l) for l in open(out / "02-kd" / "metrics.jsonl")]
    assert {"loss", "loss/kd", "lr", "grad_norm", "tokens", "tokens_per_s"} <= records[0].keys()
    lrs = [r["lr"] for r in records]
    assert lrs[0] < lrs[1] == lrs[2] == lrs[3] > lrs[4] > lrs[5]  # wsd: warmup, stable, decay
    stage = json.loads((out / "02-kd" / "stage.json").read_text())
    assert stage["trainable"].keys() == {"kda", "mlp", "norms"} and stage["steps"] == 6
    tok = __import__("transformers").AutoTokenizer.from_pretrained(out / "02-kd" / "model")
    assert tok.chat_template


def test_conversion_is_the_runs_first_step(reference, tmp_path):
    """A `student: {convert: ...}` recipe writes the converted student (before stage 1 trains it) to convert/model,
    recorded in run.json and convert.json; stage 1's model card carries the conversion's provenance. A continued run
    keeps an intact copy and rewrites a damaged one, leaving the stages alone."""
    import shutil

    from gendistill.distill.trainer import model_checksums, weights_sha256

    out, summary = reference
    record = json.loads((out / "run.json").read_text())
    expected = convert(tiny_qwen3(seed=0), attention_layers=[0, 2])
    assert record["convert"] == {"model_dir": "convert/model", "teacher": "gendistill.testing:tiny_qwen3",
                                 "options": {"attention_layers": [0, 2]}, "attention_layers": [0, 2],
                                 "weights_sha256": weights_sha256(expected)}
    assert record["fingerprint"]["stages"][0]["keys"]["student.weights.sha256"] == weights_sha256(expected)
    assert summary["converted_model"] == str(out / "convert" / "model")
    saved = _weights(out / "convert" / "model")
    for name, value in expected.state_dict().items():
        if name != "lm_head.weight":  # tied to the embedding
            torch.testing.assert_close(saved[name], value, rtol=0, atol=0)
    step = json.loads((out / "convert" / "convert.json").read_text())
    assert step["model_dir"] == "model" and step["model_files"] == model_checksums(out / "convert" / "model")
    assert __import__("transformers").AutoTokenizer.from_pretrained(out / "convert" / "model").chat_template
    card = json.loads((out / "01-attn_align" / "model" / "gendistill.json").read_text())
    assert card["teacher"] == "gendistill.testing:tiny_qwen3" and card["attention_layers"] == [0, 2]

    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    stage_files = model_checksums(copy / "02-kd" / "model")
    kept = (copy / "convert" / "model" / "model.safetensors").stat().st_mtime_ns
    run_recipe(TINY, _two_stage(copy), resume=True)
    assert (copy / "convert" / "model" / "model.safetensors").stat().st_mtime_ns == kept
    (copy / "convert" / "model" / "model.safetensors").write_bytes(b"damaged")
    run_recipe(TINY, _two_stage(copy), resume=True)
    assert model_checksums(copy / "convert" / "model") == step["model_files"]
    assert model_checksums(copy / "02-kd" / "model") == stage_files


def test_killed_run_resumes_to_the_same_losses_and_weights(tmp_path, reference):
    out = tmp_path / "run"

    def kill(stage, step, record):
        if stage == "kd" and step == 3:  # checkpoint at 2; step 3 is lost with the process
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_recipe(TINY, _two_stage(out), on_step=kill)
    assert checkpoint.latest(out / "02-kd").name == "step-0000002" and not (out / "02-kd" / "model").exists()
    assert len(_losses(out / "02-kd")) == 3
    summary = run_recipe(TINY, _two_stage(out), resume=True)
    assert summary["stages"][1]["resumed_from_step"] == 2
    _assert_same_run(reference[0], out)


def test_checkpoint_interrupted_while_written_keeps_the_previous_one(tmp_path, reference, monkeypatch):
    out = tmp_path / "run"
    real_write = checkpoint.write_files

    def crash_mid_write(directory, state, summary):
        if state["step"] == 4 and state["stage"]["name"] == "kd":
            (directory / "state.pt").write_bytes(b"half a checkpoint")
            raise OSError("disk full")
        real_write(directory, state, summary)
    monkeypatch.setattr(checkpoint, "write_files", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        run_recipe(TINY, _two_stage(out))
    ckpts = out / "02-kd" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002"]  # no half step-4, no temporary left
    assert checkpoint.load(ckpts / "step-0000002")["step"] == 2
    monkeypatch.setattr(checkpoint, "write_files", real_write)
    run_recipe(TINY, _two_stage(out), resume=True)
    _assert_same_run(reference[0], out)


def test_resume_refuses_a_changed_stage(tmp_path):
    out = tmp_path / "run"

    def kill(stage, step, record):
        if stage == "kd" and step == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_recipe(TINY, _two_stage(out), on_step=kill)
    from gendistill.io import UserError
    with pytest.raises(UserError, match=r"kd.lr: 0.001 -> 0.0005\. .* --from-stage kd"):
        run_recipe(TINY, _two_stage(out, "kd.lr=5e-4"), resume=True)


def test_nan_stops_with_stage_step_and_term_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    teacher = tiny_qwen3()

    def poison(stage, step, record):
        if stage == "kd" and step == 2:
            with torch.no_grad():
                teacher.model.norm.weight[0] = float("nan")
    with pytest.raises(TrainingDiverged) as err:
        run_recipe(TINY, _two_stage(out), teacher=teacher, on_step=poison)
    msg = str(err.value)
    assert "stage kd, step 3: loss term 'kd' is not finite" in msg and "step-0000002" in msg
    last = checkpoint.latest(out / "02-kd")
    assert last.name == "step-0000002"
    state = checkpoint.load(last)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "02-kd" / "model").exists() and not (out / "02-kd" / "stage.json").exists()
    assert [s for s, _ in _losses(out / "02-kd")] == [1, 2]


def test_student_from_a_converted_dir_and_an_eval_hook(tmp_path, reference):
    calls = []

    def hook(model_dir, **kwargs):
        calls.append((model_dir, kwargs))
        return {"score": 1.0}
    raw = yaml.safe_load(TINY.read_text().replace("${recipe_dir}", str(RECIPES)))
    raw.update(out_dir=str(tmp_path / "run"), progress=False, tensorboard=False,
               student=str(reference[0] / "01-attn_align" / "model"))
    raw["stages"] = [{"name": "kd", "objective": "kd", "data": "text", "train": ["kda"], "steps": 1,
                      "eval": hook, "eval_args": {"tasks": "x"}}]
    summary = run_recipe(raw)
    model_dir = str(tmp_path / "run" / "01-kd" / "model")
    assert calls == [(model_dir, {"tasks": "x"})]
    assert summary["stages"][0]["eval"] == {"score": 1.0}
    assert json.loads((tmp_path / "run" / "01-kd" / "eval.json").read_text()) == {"score": 1.0}


def test_progress_bar_banner_and_optional_tensorboard(tmp_path, corpora, capsys, monkeypatch):
    import sys
    import types

    scalars = []

    class FakeWriter:  # stands in for torch.utils.tensorboard (tensorboard is not a dependency)
        def __init__(self, logdir, purge_step=None):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, step))

        def close(self):
            pass
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    stage = {"name": "kd", "objective": "kd", "train": ["kda"], "steps": 2, "seq_len": 32, "batch_size": 2,
             "checkpoint_every": 0}
    teacher = tiny_qwen3()
    train_stage(stage, convert(teacher, attention_layers=[0, 2]), teacher=teacher, data=corpora["text"],
                out_dir=tmp_path / "kd", progress=True, tensorboard=True)
    err = capsys.readouterr().err
    assert "stage kd: 1*kd, all tokens, 2 steps x 2 x 32; trains kda (0.03M); frozen: attention, embeddings, mlp, " \
           "norms" in err
    assert "loss=" in err and "lr=" in err and "tok_s=" in err and "2/2" in err
    assert ("kd/loss", 1) in scalars and ("kd/tokens_per_s", 2) in scalars
