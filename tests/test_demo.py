"""The miniature demo (tiny world, tiny teacher, a few steps per stage) runs end to end and writes every file."""
import json

from gendistill.demo import build_world_dir, run_demo
from gendistill.world.teacher import teacher_cache_key


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
    # the teacher is cached: a second run reuses it instead of training again
    run_demo("mini", out=tmp_path / "demo2", cache=tmp_path / "cache")
    assert "reusing the cached teacher" in capsys.readouterr().out


def test_teacher_cache_key_follows_the_training_data(tmp_path):
    world = build_world_dir(tmp_path, seed=0, preset="tiny")
    key = teacher_cache_key(world, "mini")
    assert teacher_cache_key(build_world_dir(tmp_path, seed=0, preset="tiny"), "mini") == key  # rebuilt: same world
    assert teacher_cache_key(world, "cpu") != key
    chat = world / "chat.jsonl"
    chat.write_text(chat.read_text().replace("?", " ?", 1))  # a generator change that leaves world.json alone
    assert teacher_cache_key(world, "mini") != key
    assert teacher_cache_key(build_world_dir(tmp_path, seed=1, preset="tiny"), "mini") != key
