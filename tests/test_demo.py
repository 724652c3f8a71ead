"""The miniature demo (tiny world, tiny teacher, a few steps per stage) runs end to end and writes every file."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gendistill.demo import KernelWarmup, build_world_dir, run_demo
from gendistill.io import UserError
from gendistill.world import build_world
from gendistill.world.teacher import (TEACHER_RECORD, demo_recipe, teacher_cache_key, train_teacher,
                                     world_data_overrides)

REPO = Path(__file__).resolve().parent.parent


def test_mini_demo_end_to_end(tmp_path, capsys):
    summary = run_demo("mini", out=tmp_path / "demo", cache=tmp_path / "cache")
    out = tmp_path / "demo"
    for name in ("report.json", "report.md", "report.html"):
        assert (out / "eval" / name).stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["rows"] == json.loads(json.dumps(summary["rows"]))
    report = json.loads((out / "eval" / "report.json").read_text())
    assert report["teacher"] == "teacher" and report["students"] == ["student"]
    assert [s["name"] for s in summary["stages"]] == ["attn_align", "hidden_align", "kd", "kd_instruct"]
    assert summary["converted"] == str(out / "distill" / "convert" / "model")  # the distillation's first step
    assert json.loads((out / "distill" / "run.json").read_text())["convert"]["attention_layers"] == [1, 5]
    assert {r["task"] for r in summary["rows"]} >= {"average", "world_qa_mc_seen", "world_qa_open_seen"}
    # the student keeps a quarter of the attention layers: its KV cache grows 4x slower than the teacher's
    kv = summary["kv_bytes_per_token"]
    assert kv["student"]["per_token"] * 4 == kv["teacher"]["per_token"] and kv["teacher"]["fixed"] == 0
    printed = capsys.readouterr().out
    assert "retention" in printed and "report.html" in printed
    assert "phases, seconds: world" in printed and summary["phases"]["total"] == summary["seconds"]
    assert [s["name"] for s in summary["teacher_stages"]] == ["pretrain", "sft"] and not summary["teacher_reused"]
    assert set(summary["recall"]) == {"teacher", "student"} and summary["no_answer"]["teacher"]
    # The GPU check script reads a finished demo (here the miniature) and ends with its verdicts.
    check = subprocess.run([sys.executable, str(REPO / "bench" / "demo_check.py"), str(out)],
                           capture_output=True, text=True)
    assert check.returncode == 0 and "== verdicts" in check.stdout, check.stderr
    assert "teacher world_qa_open_seen >= 95 %" in check.stdout and "niah_single" in check.stdout
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "demo_check.sh")]).returncode == 0
    # the teacher is cached: a second run reuses it instead of training again
    again = run_demo("mini", out=tmp_path / "demo2", cache=tmp_path / "cache")
    assert "reusing the cached teacher" in capsys.readouterr().out
    assert again["teacher_reused"] and again["teacher_stages"] == summary["teacher_stages"]  # the cached record


def test_teacher_cache_key_follows_the_training_data(tmp_path):
    world = build_world_dir(tmp_path, seed=0, preset="tiny")
    key = teacher_cache_key(world, "mini")
    assert teacher_cache_key(build_world_dir(tmp_path, seed=0, preset="tiny"), "mini") == key  # rebuilt: same world
    assert teacher_cache_key(world, "cpu") != key
    chat = world / "chat.jsonl"
    chat.write_text(chat.read_text().replace("?", " ?", 1))  # a generator change that leaves world.json alone
    assert teacher_cache_key(world, "mini") != key
    assert teacher_cache_key(build_world_dir(tmp_path, seed=1, preset="tiny"), "mini") != key


def test_long_documents_fill_one_training_window_each(tmp_path):
    """A teacher's long stage packs the world's long documents into windows of long_doc_tokens: each window must
    be one whole document, so that its position ids run 0..L-1 (no packed-document mask, plain causal attention)
    and no retrieval episode is cut from its question."""
    from transformers import AutoTokenizer

    from gendistill.distill import DataSource
    from gendistill.distill.data import PackedStream, build_corpus

    world = build_world_dir(tmp_path, seed=0, preset="tiny")
    length = json.loads((world / "world.json").read_text())["preset"]["long_doc_tokens"]
    tok = AutoTokenizer.from_pretrained(world / "tokenizer")
    corpus = build_corpus(DataSource(path=str(world / "longctx.jsonl")), "text", tok, tmp_path / "cache", 1 << 30)
    assert corpus.num_documents == 3 and corpus.num_tokens == 3 * length
    starts = {int(corpus.tokens[o]) for o in corpus.offsets[:-1]}
    stream = PackedStream(corpus, length, seed=0, loss_mask="all")
    for index in range(6):  # two epochs, each in its own order
        seq = stream.sequence(index)
        assert (seq["position_ids"] == np.arange(length)).all()
        assert seq["loss_mask"][:-1].all() and not seq["loss_mask"][-1]  # the last target opens the next document
        assert int(seq["input_ids"][0]) in starts and int(seq["input_ids"][-1]) == tok.eos_token_id


def test_a_teacher_recipe_of_ones_own_gets_the_worlds_long_documents(tmp_path):
    """`gendistill world teacher --recipe`: teacher-gpu.yaml plus a long stage (what the bundled recipe had until it
    wiped the GPU teacher), its pretraining on a mixture of the biographies and the long documents (a `path` list),
    shrunk to a tiny model and one step per stage: the WORLD/ paths are the world's files, and the long stage
    gets the long documents' sequence length."""
    import yaml

    from gendistill.world.cli import build_parser, main

    world = build_world_dir(tmp_path, seed=0, preset="tiny")
    raw = yaml.safe_load(demo_recipe("teacher", "gpu").read_text())
    assert [s["name"] for s in raw["stages"]] == ["pretrain", "sft"] and "long" not in raw["data"]
    raw["data"]["long"] = {"path": "WORLD/longctx.jsonl"}
    raw["data"]["mix"] = {"path": ["WORLD/pretrain.jsonl", "WORLD/longctx.jsonl"]}
    raw["stages"][0].update(data="mix", packing="whole")
    raw["stages"].append({"name": "long", "objective": "ce", "data": "long", "seq_len": 8192, "tokens": 1000000,
                          "lr": 3.0e-4, "train": ["attention", "norms"]})
    recipe = tmp_path / "teacher-long.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    settings = world_data_overrides(recipe, world)
    assert f"data.mix.path={json.dumps([str(world / 'pretrain.jsonl'), str(world / 'longctx.jsonl')])}" in settings
    assert f"data.bios.path={world / 'pretrain.jsonl'}" in settings and "long.seq_len=1024" in settings
    small = ["model.config.num_hidden_layers=2", "model.config.hidden_size=32", "model.config.head_dim=16",
             "model.config.intermediate_size=64", "model.config.num_attention_heads=2",
             "model.config.num_key_value_heads=1", "*.tokens=null", "*.steps=1", "*.batch_size=2",
             "*.micro_batch_size=2", "*.precision=fp32", "pretrain.seq_len=64", "sft.seq_len=64"]
    teacher = train_teacher(world, tmp_path / "teacher", "gpu", overrides=small, recipe=recipe)
    record = json.loads((teacher / TEACHER_RECORD).read_text())
    assert record["recipe"] == "teacher-long.yaml"
    assert [s["name"] for s in record["stages"]] == ["pretrain", "sft", "long"]
    assert record["stages"][2]["tokens"] == 2 * 1024  # two whole 1024-token documents
    assert (teacher / "config.json").exists() and not (tmp_path / "teacher.run").exists()

    bare = tmp_path / "bare"
    build_world(seed=0, scale="tiny", long_docs=0).save(bare / "world")
    with pytest.raises(UserError, match="data.long reads WORLD/longctx.jsonl, but the world .* has no longctx"):
        train_teacher(bare / "world", tmp_path / "t2", "gpu", overrides=small, recipe=recipe)
    args = build_parser("gendistill world").parse_args(
        ["teacher", "--world", str(world), "--out", str(tmp_path / "t3"), "--recipe", str(tmp_path / "nope.yaml")])
    with pytest.raises(UserError, match="nope.yaml not found"):
        main(args)
    assert not (tmp_path / "t3").exists()


def test_kernel_warmup_runs_the_demo_at_its_shapes_in_a_second_process(tmp_path, capsys):
    """The warm-up process (GPU demo: compiles and tunes fla's kernels while the teacher trains) runs the teacher
    recipe, the distillation recipe and the evaluation one step each, records its times and leaves no files."""
    world = build_world_dir(tmp_path, seed=0, preset="tiny")
    warm = KernelWarmup(world, tmp_path / "warm", "mini", seed=0, limit=1)
    record = warm.wait()
    assert record["exit_code"] == 0, Path(record["log"]).read_text()[-3000:]
    assert set(record["parts"]) == {"teacher", "distill", "eval"} and record["seconds"] >= record["waited"] >= 0
    assert not (tmp_path / "warm").exists()
    # A warm-up that fails is reported, and the demo goes on without it.
    broken = KernelWarmup(tmp_path / "no_world", tmp_path / "warm2", "mini", seed=0, limit=1)
    record = broken.wait()
    assert record["exit_code"] != 0 and "parts" not in record
    assert "not a world directory" in Path(record["log"]).read_text()
    assert "kernel warm-up failed" in capsys.readouterr().out


def test_gpu_recipes_match_the_gpu_world():
    """The GPU demo scores recall at 1K up to the gpu preset's long-document length and at one length beyond it; the
    bundled GPU teacher has no long stage (it wiped the teacher: teacher-gpu.yaml)."""
    from gendistill.demo import EVAL_SETTINGS
    from gendistill.distill import load_recipe
    from gendistill.evaluation.tasks import parse_task_list
    from gendistill.world import PRESETS

    preset = PRESETS["gpu"]
    assert preset.long_docs * preset.long_doc_tokens > 0 and preset.mc_questions_per_fact == 3
    assert [stage.name for stage in load_recipe(demo_recipe("teacher", "gpu")).stages] == ["pretrain", "sft"]
    lengths = sorted({n for entry in parse_task_list(EVAL_SETTINGS["gpu"]["recall"]) if isinstance(entry, tuple)
                      for n in entry[1]})
    assert [n for n in lengths if n > preset.long_doc_tokens] == [2 * preset.long_doc_tokens]
    assert {1024, preset.long_doc_tokens} <= set(lengths)
