"""The reliability suite (issue 17): nothing is lost, nothing is silently mixed. One test per case of the issue,
driven through the CLI (`gendistill.cli.main`) where a user would meet it; a subprocess only where a process must
die holding the run's lock. The trained runs are two tiny stages (attn_align 2 steps, kd 4 steps with checkpoints
at 2 and 4), trained once per module and copied by each test that changes them."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gendistill.cli import main as cli_main
from gendistill.distill import checkpoint, run_recipe
from gendistill.io import UserError, atomic_dir
from gendistill.recipes import ROOT as BUNDLED
from gendistill.testing import tiny_qwen3, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = BUNDLED / "tiny.yaml"
TEXT = BUNDLED / "data" / "tiny_text.jsonl"
TWO_STAGES = ("stages=[{name: attn_align, objective: attn_align, data: text, train: [kda], steps: 2, lr: 3.0e-3}, "
              "{name: kd, objective: kd, data: text, train: [kda, mlp, norms], steps: 4, lr: 1.0e-3, "
              "checkpoint_every: 2, keep_checkpoints: 2}]")


def sets(out, *extra) -> list[str]:
    """CLI arguments for the two-stage tiny run into `out`."""
    args = [str(TINY), "--no-progress", "--set", f"out_dir={out}", "--set", "tensorboard=false", "--set", TWO_STAGES]
    for item in extra:
        args += ["--set", item]
    return args


def cli(capsys, *argv) -> tuple[int, str]:
    """Run `gendistill ARGV` in-process: (exit code, stderr). A traceback would escape as an exception."""
    capsys.readouterr()
    try:
        rc = cli_main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own usage errors
        rc = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(model_dir / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-stage run (never modified: tests copy it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert cli_main(["distill", *sets(out)]) == 0
    return out


def copy_run(trained: Path, dest: Path, interrupted: bool = False) -> Path:
    """A copy of the finished run; `interrupted`: as if killed in stage kd after its step-2 checkpoint."""
    shutil.copytree(trained, dest)
    if interrupted:
        kd = dest / "02-kd"
        shutil.rmtree(kd / "model")
        (kd / "stage.json").unlink()
        shutil.rmtree(kd / "checkpoints" / "step-0000004")
    return dest


# ---- 1. data loss ------------------------------------------------------------------------------------------------

def test_overwrite_never_deletes_what_gendistill_did_not_create(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    work = home / "work"
    work.mkdir(parents=True)
    (work / "thesis.tex").write_text("years of work")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    for out in (".", str(work), str(home), str(tmp_path)):  # the cwd, its parents, home
        rc, err = cli(capsys, "distill", *sets(out), "--overwrite")
        assert rc == 2 and "refusing to delete" in err, err
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_text("meow")
    rc, err = cli(capsys, "distill", *sets(other), "--overwrite")
    assert rc == 2 and "gendistill did not create it" in err
    assert (work / "thesis.tex").read_text() == "years of work" and (other / "cat.jpg").read_text() == "meow"
    assert listing(tmp_path) == ["home", "home/work", "home/work/thesis.tex", "photos", "photos/cat.jpg"]


def test_overwrite_onto_a_file_and_replacing_a_dir_leave_nothing_behind(tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    rc, err = cli(capsys, "convert", "--teacher", tmp_path / "nowhere", "--out", target, "--overwrite")
    assert rc == 2 and "is a file" in err and target.read_text() == "mine"
    out = tmp_path / "out"
    for text in ("one", "two"):  # a directory gendistill made is replaced in place, without `.out.old`
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "x").write_text(text)
    assert (out / "x").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "out"]


# ---- 2. silent mixing on resume -----------------------------------------------------------------------------------

def test_resume_refuses_a_new_teacher_or_data_mid_stage(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run", interrupted=True)
    recipe_before = (run / "recipe.yaml").read_text()
    rc, err = cli(capsys, "distill", *sets(run, "teacher.kwargs.seed=1"), "--resume")
    assert rc == 2 and "teacher.kwargs.seed: 0 -> 1" in err and "teacher.weights.sha256" in err
    assert "--from-stage attn_align" in err  # the teacher shapes every stage
    other = tmp_path / "other.jsonl"
    other.write_text(TEXT.read_text().replace("Alice", "Alicia"))
    rc, err = cli(capsys, "distill", *sets(run, f"data.text.path={other}"), "--resume")
    assert rc == 2 and "data.text.files" in err
    assert (run / "recipe.yaml").read_text() == recipe_before
    assert not (run / "02-kd" / "model").exists()


def test_resume_refuses_changes_to_finished_stages(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    before = listing(run), (run / "recipe.yaml").read_text()
    rc, err = cli(capsys, "distill", *sets(run, "attn_align.lr=0.5"), "--resume")
    assert rc == 2 and "attn_align.lr: 0.003 -> 0.5" in err and "--from-stage attn_align" in err
    rc, err = cli(capsys, "distill", *sets(run, "kd.objective=ce"), "--resume")
    assert rc == 2 and "kd.objective.kd: 1.0 -> (unset)" in err and "kd.objective.ce: (unset) -> 1.0" in err
    assert "--from-stage kd" in err
    assert (listing(run), (run / "recipe.yaml").read_text()) == before
    assert cli(capsys, "distill", *sets(run), "--resume")[0] == 0  # unchanged: nothing to redo


def test_from_stage_keeps_earlier_stages_and_records_the_change(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    rc, err = cli(capsys, "distill", *sets(run, "kd.lr=5e-4"), "--from-stage", "kd")
    assert rc == 0, err
    assert same_weights(run / "01-attn_align" / "model", trained / "01-attn_align" / "model")
    assert not same_weights(run / "02-kd" / "model", trained / "02-kd" / "model")
    record = json.loads((run / "run.json").read_text())
    assert record["history"][-1] == {**record["history"][-1], "mode": "from_stage", "from_stage": "kd",
                                     "changed": ["kd.lr: 0.001 -> 0.0005"]}
    assert yaml.safe_load((run / "recipe.yaml").read_text())["stages"][1]["lr"] == 5e-4
    rc, err = cli(capsys, "distill", *sets(run, "attn_align.lr=0.5"), "--from-stage", "2")
    assert rc == 2 and "attn_align.lr: 0.003 -> 0.5" in err  # a kept stage may not change either


def test_a_copied_run_directory_resumes_from_its_own_stages(trained, tmp_path, capsys):
    original = copy_run(trained, tmp_path / "original", interrupted=True)
    moved = tmp_path / "moved"
    shutil.copytree(original, moved)
    shutil.rmtree(original)
    for path in moved.rglob("*.json"):  # nothing inside names where the run was
        assert str(trained) not in path.read_text() and str(original) not in path.read_text(), path
    rc, err = cli(capsys, "distill", *sets(moved), "--resume")
    assert rc == 0, err
    assert not original.exists()
    assert same_weights(moved / "02-kd" / "model", trained / "02-kd" / "model")  # and bit-identical to no kill


def test_resume_of_a_directory_that_does_not_exist_is_an_error(tmp_path, capsys):
    rc, err = cli(capsys, "distill", *sets(tmp_path / "typo"), "--resume")
    assert rc == 2 and "no run directory" in err and not (tmp_path / "typo").exists()


# ---- 3. one run per directory -------------------------------------------------------------------------------------

# Another run holding the lock: gendistill/io.py loaded on its own (stdlib + filelock), so the process starts fast.
_HOLD = ("import importlib.util, sys, time; spec = importlib.util.spec_from_file_location('gio', sys.argv[2]); "
         "gio = importlib.util.module_from_spec(spec); spec.loader.exec_module(gio); "
         "lock = gio.DirLock(sys.argv[1]).acquire(); print('locked', flush=True); {}")


def _holder(run: Path, then: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD.format(then), str(run), str(ROOT / "gendistill" / "io.py")],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_into_a_locked_directory_is_refused(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run", interrupted=True)
    proc = _holder(run, "time.sleep(60)")
    try:
        rc, err = cli(capsys, "distill", *sets(run), "--resume")
        assert rc == 2 and f"in use by process {proc.pid}" in err
        assert not (run / "02-kd" / "model").exists()
        assert len((run / "02-kd" / "metrics.jsonl").read_text().splitlines()) == 4  # untouched
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run", interrupted=True)
    proc = _holder(run, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert proc.wait() == -signal.SIGKILL
    rc, err = cli(capsys, "distill", *sets(run), "--resume")
    assert rc == 0 and f"taking over the lock of {run} left by process {proc.pid}" in err
    assert "no longer running" in err and not (run / ".gendistill.lock.json").exists()


# ---- 4. recipes are data ------------------------------------------------------------------------------------------

def test_code_in_a_recipe_needs_allow_code_and_check_imports_nothing(tmp_path, capsys, monkeypatch):
    pwned = tmp_path / "pwned"
    (tmp_path / "evil_module.py").write_text(f"open({str(pwned)!r}, 'w').write('imported')\n"
                                             "def build(**kwargs):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    system = f"teacher={{factory: 'os:system', kwargs: {{command: 'touch {pwned}'}}}}"
    out = tmp_path / "run"
    rc, err = cli(capsys, "distill", *sets(out, system))
    assert rc == 2 and "teacher.factory = os:system" in err and "--allow-code" in err
    rc, err = cli(capsys, "distill", *sets(out, "student={factory: 'evil_module:build'}"), "--check")
    assert rc == 2 and "--allow-code" in err
    assert not pwned.exists() and not out.exists()
    capsys.readouterr()
    assert cli_main(["distill", *sets(out, "student={factory: 'evil_module:build'}"), "--check",
                     "--allow-code"]) == 0
    assert "code: student.factory = evil_module:build (needs --allow-code)" in capsys.readouterr().out
    assert pwned.read_text() == "imported" and not out.exists()  # imported only once allowed; nothing written


def test_report_refuses_manifest_names_that_are_paths(tmp_path, capsys):
    secret = tmp_path / "secret" / "records" / "x"
    secret.mkdir(parents=True)
    (secret / "t.jsonl").write_text('{"id": "stolen"}\n')
    eval_dir = tmp_path / "evals" / "e"
    eval_dir.mkdir(parents=True)
    (eval_dir / "manifest.json").write_text(json.dumps({
        "models": {"../../secret/records/x": {"role": "student"}}, "tasks": {"t": {"kind": "open"}}}))
    rc, err = cli(capsys, "report", eval_dir)
    assert rc == 2 and "not a plain name" in err and sorted(p.name for p in eval_dir.iterdir()) == ["manifest.json"]


def test_task_prompts_cannot_reach_attributes(tmp_path):
    from gendistill.evaluation.tasks import load_task

    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "a", "question": "q?", "answer": "x"}) + "\n")
    for prompt in ("{question.__class__}", "{question.__class__.__init__.__globals__}", "{question[0]}",
                   "{question!r}", "{question:>99999}"):
        (tmp_path / "task.yaml").write_text(yaml.safe_dump({"name": "t", "kind": "open", "data": "items.jsonl",
                                                            "prompt": prompt}))
        with pytest.raises(UserError, match="bad prompt template"):
            load_task(tmp_path / "task.yaml")


# ---- 5. corruption ------------------------------------------------------------------------------------------------

def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    shutil.rmtree(run / "02-kd" / "model")
    (run / "02-kd" / "stage.json").unlink()
    state = run / "02-kd" / "checkpoints" / "step-0000004" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    rc, err = cli(capsys, "distill", *sets(run), "--resume")
    assert rc == 0, err
    assert "skipping damaged checkpoint step-0000004" in err and "resuming from step-0000002" in err
    assert same_weights(run / "02-kd" / "model", trained / "02-kd" / "model")
    assert checkpoint.load(run / "02-kd" / "checkpoints" / "step-0000004")["step"] == 4  # rewritten, intact


def test_a_damaged_finished_stage_is_caught_before_it_is_trained_on(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run", interrupted=True)
    weights_file = run / "01-attn_align" / "model" / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-100:-90] = bytes(b ^ 0xFF for b in data[-100:-90])  # flipped bits in the tensors, the header intact
    weights_file.write_bytes(bytes(data))
    metrics = (run / "02-kd" / "metrics.jsonl").read_text()
    rc, err = cli(capsys, "distill", *sets(run), "--resume")
    assert rc == 2 and "model.safetensors" in err and "checksum" in err and "--from-stage attn_align" in err
    assert (run / "02-kd" / "metrics.jsonl").read_text() == metrics and not (run / "02-kd" / "model").exists()


# ---- 6. validated before training ---------------------------------------------------------------------------------

def test_a_chat_stage_without_a_chat_template_fails_before_any_stage(tmp_path, capsys):
    tok = tiny_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").unlink(missing_ok=True)
    out = tmp_path / "run"
    rc, err = cli(capsys, "distill", str(TINY), "--no-progress", "--set", f"out_dir={out}", "--set", "*.steps=1",
                  "--set", f"tokenizer={tmp_path / 'tok'}")
    assert rc == 2 and "no chat template" in err and "kd_instruct" in err and not out.exists()


def test_seq_len_beyond_the_models_positions_fails(tmp_path, capsys):
    out = tmp_path / "run"
    rc, err = cli(capsys, "distill", *sets(out, "teacher.kwargs.max_position_embeddings=16"))
    assert rc == 2 and "seq_len: 32 exceeds" in err and "max_position_embeddings (16)" in err and not out.exists()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_qwen3(max_position_embeddings=48).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_eval_prompts_beyond_the_models_positions_fail_before_scoring(model_dir, tmp_path, capsys):
    (tmp_path / "items.jsonl").write_text(json.dumps({"id": "long", "question": "The key is 7351. " * 20,
                                                      "answer": "7351"}) + "\n")
    (tmp_path / "long.yaml").write_text("name: long\nkind: open\ndata: items.jsonl\nprompt: '{question}'\n")
    out = tmp_path / "eval"
    rc, err = cli(capsys, "eval", "--model", model_dir, "--tasks", tmp_path / "long.yaml", "--out", out,
                  "--device", "cpu", "--no-progress")
    assert rc == 2 and "task long, item 'long'" in err and "max_position_embeddings (48)" in err
    assert not out.exists()


@pytest.mark.parametrize("ratio", ["1.5", "1", "0", "-0.5", "nan", "inf", "0.9"])
def test_convert_ratio_must_leave_a_hybrid(model_dir, tmp_path, capsys, ratio):
    rc, err = cli(capsys, "convert", "--teacher", model_dir, "--out", tmp_path / "s", "--ratio", ratio)
    assert rc == 2 and "--ratio" in err and not (tmp_path / "s").exists()


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_eval_limit_must_be_positive(model_dir, tmp_path, capsys, limit):
    rc, err = cli(capsys, "eval", "--model", model_dir, "--tasks", "niah_single@1k", "--out", tmp_path / "e",
                  "--limit", limit, "--device", "cpu")
    assert rc == 2 and "--limit" in err and not (tmp_path / "e").exists()


def test_a_bad_record_leaves_nothing_that_blocks_a_rerun(tmp_path, capsys):
    data = tmp_path / "text.jsonl"
    data.write_text(TEXT.read_text() + json.dumps({"text": 5}) + "\n")
    out = tmp_path / "run"
    args = ["distill", *sets(out, f"data.text.path={data}")]
    for _ in range(2):  # the rerun meets the same data error, not "already exists"
        rc, err = cli(capsys, *args)
        assert rc == 2 and "record" in err and "'text' string" in err and "already exists" not in err
        assert not out.exists()


def test_a_divergence_suggests_retraining_the_stage_not_deleting_the_run(tmp_path):
    teacher = tiny_qwen3()
    with torch.no_grad():
        teacher.model.norm.weight[0] = float("nan")
    with pytest.raises(UserError) as err:
        run_recipe(TINY, [f"out_dir={tmp_path / 'run'}", "progress=false", "tensorboard=false",
                          "stages=[{name: kd, objective: kd, data: text, train: [kda], steps: 2}]"], teacher=teacher)
    assert "--from-stage kd" in str(err.value) and "--overwrite" not in str(err.value)


# ---- 7. user mistakes: one clear message, exit 2, no traceback, nothing written -----------------------------------

def test_user_mistakes_end_in_one_clear_message(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    no_tok = tmp_path / "no_tok"
    tiny_qwen3().save_pretrained(no_tok)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    bad_json, partial = tmp_path / "bad_json", tmp_path / "partial"
    for d, text in ((bad_json, "{not json"), (partial, '{"models": {}}')):
        d.mkdir()
        (d / "manifest.json").write_text(text)
    before = listing(tmp_path)
    cases = [
        (["distill", *sets("r1", "teacher=missing_teacher_dir")], "missing_teacher_dir: no such directory"),
        (["distill", *sets("r2", f"data.text.path={empty}")], "is empty"),
        (["eval", "--model", no_tok, "--tasks", "niah_single@1k", "--out", "e1"], "holds no tokenizer"),
        (["convert", "--teacher", model_dir, "--out", "c1", "--dtype", "int8"], "invalid choice: 'int8'"),
        (["eval", "--model", model_dir, "--tasks", "niah_single@1k", "--out", "e2", "--dtype", "int8"],
         "invalid choice: 'int8'"),
        (["eval", "--model", model_dir, "--tasks", "niah_single@0", "--out", "e3"], "bad context length '0'"),
        (["report", bad_json], "not valid JSON"),
        (["report", partial], "incomplete manifest"),
        (["report", bad_json, "--out", a_file], "is a file"),
        (["eval", "--model", ".", "--tasks", "niah_single@1k", "--out", "e4"], "not a model directory"),
        (["distill", *sets(a_file)], "is a file, not a directory"),
    ]
    for argv, needle in cases:
        rc, err = cli(capsys, *argv)
        assert rc == 2 and needle in err and "Repo id" not in err, (argv, err)
        assert err.count("error:") == 1, err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err = cli(capsys, "eval", "--model", model_dir, "--tasks", "niah_single@1k", "--out", "e5", "--device", "cuda")
    assert rc == 2 and "CUDA is not available" in err
    assert listing(tmp_path) == before


def test_output_directories_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
