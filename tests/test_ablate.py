"""`gendistill ablate`: a tiny 2-axis sweep shares the stages its variants have in common (and each shared stage is
exactly what a plain `run_recipe` of that variant trains), resumes after being stopped without rerunning finished
work, and reports every run tagged with its axis; the submitit path runs with submitit's debug executor."""
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from gendistill.ablate import build_plan, load_spec, run_ablation, run_recipe_of
from gendistill.cli import main as cli
from gendistill.distill import run_recipe
from gendistill.io import UserError
from gendistill.recipes import ROOT as BUNDLED

TINY = BUNDLED / "tiny.yaml"
MC = [{"id": f"q{i}", "question": f"Where was person {i} born?", "choices": ["Lyon", "Basel", "Zurich", "Geneva"],
       "answer": i % 4} for i in range(4)]


def _spec(tmp_path, axes, name="spec", steps=2):
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in MC))
    (tmp_path / "mc.yaml").write_text('name: mc\nkind: multiple_choice\ndata: mc.jsonl\n'
                                      'prompt: "Question: {question}\\n{choices}Answer:"\nmax_new_tokens: 4\n')
    spec = {"name": name, "base": str(TINY), "out_dir": str(tmp_path / name),
            "set": [f"*.steps={steps}", "progress=false", "tensorboard=false"], "axes": axes, "seeds": [0],
            "eval": {"tasks": str(tmp_path / "mc.yaml"), "batch_size": 8}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


AXES = {"lr": {"path": "kd.lr", "values": [1.0e-3, 3.0e-3]},  # 1e-3 is tiny.yaml's own: the base variant
        "masking": {"path": "kd_instruct.loss_mask", "values": ["completion_only", "all"]}}


class Stop(Exception):
    pass


def test_sweep_shares_stages_resumes_and_reports_by_axis(tmp_path, capsys):
    path = _spec(tmp_path, AXES)
    out = tmp_path / "spec"
    assert cli(["ablate", str(path), "--check"]) == 0
    text = capsys.readouterr().out
    assert "4 runs (4 variants x 1 seeds), 7 unique stages of 16" in text and "time: unknown" in text

    def stop_at_last_stage(job):
        if job["kind"] == "stage" and plan["stages"][job["key"]]["index"] == 3:
            raise Stop
    plan = build_plan(load_spec(path))
    with pytest.raises(Stop):  # killed before the fourth stage of any variant
        run_ablation(path, on_job=stop_at_last_stage)
    done = sorted(p.parent.name for p in (out / "stages").glob("*/stage.json"))
    assert len(done) == 4  # attn_align, hidden_align (shared by all), kd x 2 learning rates
    times = {k: (out / "stages" / k / "stage.json").stat().st_mtime_ns for k in done}
    with pytest.raises(UserError, match="--resume"):
        run_ablation(path)

    ran = []
    summary = run_ablation(path, resume=True, on_job=ran.append)
    assert sorted(j["kind"] for j in ran) == ["eval"] * 3 + ["stage"] * 3 + ["teacher"]
    assert {k: (out / "stages" / k / "stage.json").stat().st_mtime_ns for k in done} == times
    assert summary["unique_stages"] == 7 and summary["stage_runs_without_sharing"] == 16
    runs = {r["name"]: r for r in summary["runs"]}
    assert runs["lr-0.001.s0"]["model"] == runs["masking-completion_only.s0"]["model"]  # both are the base recipe
    assert len({r["model"] for r in runs.values()}) == 3

    manifest = json.loads((out / "report" / "manifest.json").read_text())
    students = {n: m for n, m in manifest["models"].items() if m["role"] == "student"}
    assert {n: (m["group"], m["axis"], m["value"], m["seed"]) for n, m in students.items()} == {
        "lr-0.001.s0": ("lr", "lr", "0.001", 0), "lr-0.003.s0": ("lr", "lr", "0.003", 0),
        "masking-completion_only.s0": ("masking", "masking", "completion_only", 0),
        "masking-all.s0": ("masking", "masking", "all", 0)}
    report = json.loads((out / "report" / "report.json").read_text())
    assert set(report["students"]) == set(students) and report["teacher"] == "teacher"
    tables = summary["by_axis"]
    assert [r["value"] for r in tables["masking"]] == ["completion_only", "all"]
    cell = tables["lr"][1]["average/gen_acc"]
    assert cell["n"] == 1 and cell["mean"] == report["scores"]["lr-0.003.s0"]["average"]["gen_acc"]
    md = (out / "ablation.md").read_text()
    assert "## masking" in md and "| teacher |" in md and "| all | 1 |" in md
    effects = summary["effects"]  # each value against its axis's base, paired by seed: the base itself is left out
    assert effects["masking"]["base"] == "completion_only" and [r["value"] for r in effects["masking"]["rows"]] == ["all"]
    row = effects["masking"]["rows"][0]
    assert row["seeds"] == 1 and row["items"] == len(MC) and "verdict" in row and "## masking (against" in md
    scores = report["scores"]
    assert row["d_gen"]["value"] == pytest.approx(scores["masking-all.s0"]["mc"]["gen_acc"]
                                                  - scores["masking-completion_only.s0"]["mc"]["gen_acc"])

    # A shared stage is what the variant's own run trains: the same weights as run_recipe of that recipe.
    run = next(r for r in plan["runs"] if r["name"] == "masking-all.s0")
    from gendistill.ablate import Run
    recipe = run_recipe_of(load_spec(path), Run(**run))
    alone = run_recipe(recipe.source, list(load_spec(path)["set"]) + run["overrides"] +
                       [f"out_dir={tmp_path / 'alone'}", "student.convert.seed=0"])
    ours = load_file(Path(runs["masking-all.s0"]["model"]) / "model.safetensors")
    theirs = load_file(Path(alone["final_model"]) / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    ran.clear()  # everything done: a third call trains and evaluates nothing, and rebuilds the report
    run_ablation(path, resume=True, on_job=ran.append)
    assert ran == []


def test_submitit_debug_executor_runs_the_sweep(tmp_path):
    path = _spec(tmp_path, {"masking": AXES["masking"]}, name="debug", steps=1)
    summary = run_ablation(path, cluster="debug")
    assert summary["unique_stages"] == 5 and len(summary["runs"]) == 2
    assert (tmp_path / "debug" / "submitit").is_dir()
    assert (tmp_path / "debug" / "report" / "report.html").is_file()


def test_bad_specs_fail_clearly(tmp_path):
    with pytest.raises(UserError, match="at least two"):
        load_spec(_spec(tmp_path, {"lr": {"path": "kd.lr", "values": [1e-3]}}))
    with pytest.raises(UserError, match="unknown key"):
        run_ablation(_spec(tmp_path, {"lr": {"path": "kd.lrr", "values": [1e-3, 2e-3]}}), check=True)
    with pytest.raises(UserError, match="not set"):
        p = tmp_path / "env.yaml"
        p.write_text("base: ${NO_SUCH_VARIABLE_I24}\naxes: {}\n")
        load_spec(p)


def test_local_gpu_queue_runs_one_job_per_gpu_at_a_time_and_reports_failures(tmp_path, monkeypatch):
    import subprocess
    import threading
    import time

    from gendistill import ablate

    running, seen, lock = {}, [], threading.Lock()

    def fake_run(cmd, env, stdout, stderr):
        gpu = env["CUDA_VISIBLE_DEVICES"]
        with lock:
            assert gpu not in running  # never two jobs on one GPU
            running[gpu] = cmd
            seen.append((gpu, json.loads(cmd[-1])["key"]))
        time.sleep(0.05)
        with lock:
            del running[gpu]
        assert cmd[1:4] == ["-m", "gendistill.ablate", str(tmp_path)]
        return subprocess.CompletedProcess(cmd, 1 if json.loads(cmd[-1])["key"] == "k3" else 0)

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(ablate.subprocess, "run", fake_run)
    jobs = [{"kind": "stage", "key": f"k{i}"} for i in range(6)]
    with pytest.raises(UserError, match=r"(?s)1 job\(s\) failed.*stage-k3: exit 1"):
        ablate.run_wave(tmp_path, jobs, "local", {})
    assert sorted(k for _, k in seen) == [f"k{i}" for i in range(6)] and {g for g, _ in seen} == {"0", "1"}


def test_a_job_runs_as_a_worker_subprocess(tmp_path):
    import subprocess
    import sys

    path = _spec(tmp_path, {"masking": AXES["masking"]}, name="sub", steps=1)
    out = tmp_path / "sub"
    out.mkdir()
    plan = build_plan(load_spec(path))
    (out / "plan.json").write_text(json.dumps(plan))
    job = {"kind": "teacher", "key": plan["teacher_eval"]["key"]}
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-m", "gendistill.ablate", str(out), json.dumps(job)], check=True, env=env)
    assert (out / "evals" / job["key"] / "records" / "teacher" / "mc.jsonl").is_file()


def test_grid_mode_reports_each_run_once_per_axis_holding_the_other_axes_fixed(tmp_path):
    from gendistill.ablate import expand

    spec = load_spec(_spec(tmp_path, AXES))
    spec["mode"] = "grid"
    spec["variants"] = {"named": ["kd.lr=0.01"]}
    runs = {r.name: r for r in expand(spec)}
    assert len(runs) == 6 and runs["base.s0"].overrides == []  # 4 combinations, the named variant, its reference
    run = runs["lr-0.003_masking-all.s0"]
    assert run.overrides == ['kd.lr=0.003', 'kd_instruct.loss_mask="all"']
    assert run.groups == [{"group": "lr|masking-all", "axis": "lr", "value": "0.003"},
                          {"group": "masking|lr-0.003", "axis": "masking", "value": "all"}]
    assert runs["named.s0"].groups == [{"group": "variants", "axis": "variants", "value": "named"}]


def _records(ll, gen, task="mc"):
    return {task: [{"id": f"q{i}", "answer": 0, "ll": [0.0], "ll_pred": 1 - a, "ll_pred_norm": 1 - a,
                    "ll_pred_bytes": 1 - a, "gen": {"greedy": {"correct": bool(g), "extracted": "x"}}}
                   for i, (a, g) in enumerate(zip(ll, gen))]}


def test_axis_effects_pair_by_seed_and_call_only_what_the_items_show():
    """A value that moves generation alone is called so; one that is the base's twin is 'no effect'; seeds pair with
    their own base run, and named variants compare with the base recipe."""
    from gendistill.ablate import axis_effects, render_effects

    n = 200
    base_ll, base_gen = [1] * 150 + [0] * 50, [1] * 100 + [0] * 100
    records, models = {}, {}
    for seed in (0, 1):
        for name, value, group, ll, gen in (
                ("a-base", "base", "a", base_ll, base_gen),          # the axis's base (first value)
                ("a-gen", "gen", "a", base_ll, [1] * 160 + [0] * 40),  # generation +30 pp, LL unchanged
                ("a-twin", "twin", "a", base_ll, base_gen),           # identical to the base
                ("v-worse", "worse", "variants", [1] * 100 + [0] * 100, [1] * 50 + [0] * 150)):
            records[f"{name}.s{seed}"] = _records(ll, gen)
            models[f"{name}.s{seed}"] = {"seed": seed, "value": value, "group": group}
    tables = {"a": [{"value": v, "runs": [f"a-{v}.s0", f"a-{v}.s1"]} for v in ("base", "gen", "twin")],
              "variants": [{"value": "worse", "runs": ["v-worse.s0", "v-worse.s1"]}]}
    plan = {"runs": [{"name": f"a-base.s{s}", "overrides": []} for s in (0, 1)]
            + [{"name": f"a-gen.s{s}", "overrides": ["x=1"]} for s in (0, 1)]}
    report = {"models": models, "ll_mode": {"mc": "ll_acc", "average": "ll_acc"}, "tasks": {"mc": {"kind": "mc"}}}
    effects = axis_effects(plan, tables, report, records)
    rows = {r["value"]: r for r in effects["a"]["rows"]}
    assert effects["a"]["base"] == "base" and set(rows) == {"gen", "twin"}
    assert rows["gen"]["items"] == 2 * n and rows["gen"]["d_ll"]["value"] == 0
    assert rows["gen"]["d_gen"]["value"] == pytest.approx(0.3) and rows["gen"]["d_gen"]["low"] > 0.2
    assert rows["gen"]["verdict"] == "moves generation more than LL"
    assert rows["twin"]["d_gen_minus_d_ll"]["value"] == 0 and rows["twin"]["verdict"] == "no effect detected in either mode"
    worse = effects["variants"]["rows"][0]
    assert effects["variants"]["base"] == "base recipe" and worse["d_ll"]["value"] == pytest.approx(-0.25)
    assert worse["d_gen"]["value"] == pytest.approx(-0.25) and worse["verdict"].startswith("moves both modes")
    assert "| gen | 2 | 400 | +0.0 pp" in render_effects(effects)


@pytest.mark.parametrize("spec", sorted(p.name for p in (BUNDLED / "ablations").glob("*.yaml")))
def test_every_bundled_ablation_spec_plans(spec, monkeypatch):
    """The shipped specs are valid: each expands into runs whose recipes validate, every run evaluated."""
    for name, value in (("WORLD", "/data/world"), ("TEACHER", "/data/teacher"), ("SEARCHED", "[0, 2]"),
                        ("EVEN", "[3, 7]"), ("RANDOM_SET", "[6, 7]")):
        monkeypatch.setenv(name, value)
    plan = build_plan(load_spec(BUNDLED / "ablations" / spec))
    runs = plan["runs"]
    assert runs and len({r["name"] for r in runs}) == len(runs)
    assert all(r["stages"] and r["eval"] for r in runs) and set(plan["stages"]) >= {r["stages"][-1] for r in runs}


def test_only_runs_a_subset_of_the_axes(tmp_path):
    path = _spec(tmp_path, AXES)
    spec = load_spec(path, only=["masking"])
    assert list(spec["axes"]) == ["masking"] and not spec["variants"]
    assert {r["name"] for r in build_plan(spec)["runs"]} == {"masking-completion_only.s0", "masking-all.s0"}
    with pytest.raises(UserError, match="--only lrr: not in .* it has lr, masking"):
        load_spec(path, only=["lrr"])


def test_named_variants_alone_run_the_base_recipe_beside_them(tmp_path):
    path = _spec(tmp_path, {"masking": {"values": {"base_mask": {}, "all": {"kd_instruct.loss_mask": "all"}}}})
    spec = load_spec(path)
    spec["variants"] = {"fast": ["kd.lr=0.003"]}
    assert "base.s0" not in {r["name"] for r in build_plan(spec)["runs"]}  # masking-base_mask is the base recipe
    spec["axes"] = {}
    runs = {r["name"]: r for r in build_plan(spec)["runs"]}
    assert set(runs) == {"fast.s0", "base.s0"} and runs["base.s0"]["overrides"] == []


def test_a_named_variant_may_not_take_the_base_recipes_name(tmp_path):
    path = _spec(tmp_path, AXES)
    path.write_text(path.read_text() + "variants:\n  base: {kd.lr: 0.01}\n")
    with pytest.raises(UserError, match="variants.base: `base` names the base recipe's own run"):
        load_spec(path)
