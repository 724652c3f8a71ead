"""Recipes: the shipped ones validate; overrides land where they say; every bad key/value is a UserError naming it,
raised before anything is written (no output directory, no token cache)."""
import json

import pytest
import yaml

from gendistill.distill import load_recipe, run_recipe
from gendistill.distill.trainer import lr_factor, total_steps
from gendistill.io import UserError
from gendistill.recipes import ROOT as RECIPES
from gendistill.testing import tiny_tokenizer

TINY = RECIPES / "tiny.yaml"


def test_bundled_recipes_by_name(tmp_path, monkeypatch):
    """A recipe argument is a file, else a bundled recipe's name (`.yaml` and a leading `recipes/` optional); a local
    file of that name wins; an unknown name lists the bundled ones."""
    monkeypatch.chdir(tmp_path)
    for name in ("tiny", "tiny.yaml", "recipes/tiny.yaml"):
        assert load_recipe(name).source == str(TINY)
    assert load_recipe("demo/teacher-cpu").name == "world-teacher-cpu"
    (tmp_path / "tiny.yaml").write_text(TINY.read_text().replace("name: tiny", "name: mine"))
    assert load_recipe("tiny.yaml").name == "mine" and load_recipe("tiny").name == "tiny"
    with pytest.raises(UserError, match=r"no bundled recipe has that name; bundled: .*demo/distill-cpu.yaml"):
        load_recipe("tinny")
    with pytest.raises(UserError, match="bundled"):
        load_recipe("../recipes/tiny")


def test_plain_training_names_its_model_model(tmp_path):
    """The world teacher's recipe trains `model:` without a teacher; `model:` refuses a teacher (distillation trains a
    `student:`), conversion, and `student:` beside it; run dirs keep the name (recipe.yaml, fingerprint keys)."""
    from gendistill.distill.recipe import recipe_to_dict
    from gendistill.distill.trainer import run_fingerprint

    for scale in ("cpu", "gpu"):
        recipe = load_recipe(RECIPES / "demo" / f"teacher-{scale}.yaml", ["model.seed=3"])
        assert recipe.trained == "model" and recipe.teacher is None and recipe.student["seed"] == 3
        assert all(s.objective == {"ce": 1.0} for s in recipe.stages)
    written = recipe_to_dict(recipe)
    assert "model" in written and "student" not in written
    assert load_recipe(written).student == recipe.student  # recipe.yaml reads back the same
    keys = run_fingerprint(recipe, None, None, tiny_tokenizer())["stages"][0]["keys"]
    assert "model.seed" in keys and not any(k.startswith("student") for k in keys)
    plain = yaml.safe_load(TINY.read_text().replace("${recipe_dir}", str(RECIPES)))
    plain.pop("teacher")
    plain.pop("student")
    plain["stages"] = [{"name": "ce", "objective": "ce", "data": "text", "steps": 1}]
    for model, needle in [({"config": {"model_type": "qwen3"}}, None),
                          ({"convert": {}}, "model: only the student can be built by conversion"),
                          ("some/dir", None)]:
        if needle is None:
            assert load_recipe({**plain, "model": model}).trained == "model"
        else:
            with pytest.raises(UserError, match=needle):
                load_recipe({**plain, "model": model})
    with pytest.raises(UserError, match="`model:` is plain training, without a teacher"):
        load_recipe({**plain, "model": "some/dir", "teacher": "other/dir"})
    with pytest.raises(UserError, match="give `student:` .* or `model:`"):
        load_recipe({**plain, "model": "some/dir", "student": "some/dir"})
    with pytest.raises(UserError, match="student: required: .* `model:`"):
        load_recipe(plain)


def test_every_bundled_file_is_package_data():
    """pyproject's package-data globs cover every file under gendistill/recipes/, so the wheel carries them all (CI
    installs the wheel and runs the demo from it; this catches a new file type or folder depth sooner)."""
    import fnmatch
    import tomllib

    globs = tomllib.loads((RECIPES.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "gendistill.recipes"]
    files = [p.relative_to(RECIPES).as_posix() for p in RECIPES.rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.name != "__init__.py"]
    assert len(files) > 15
    missed = [f for f in files if not any(fnmatch.fnmatch(f, g) and f.count("/") == g.count("/") for g in globs)]
    assert not missed, f"not in pyproject's package-data for gendistill.recipes: {missed}"


def test_paper_recipe_is_the_papers_four_stages():
    r = load_recipe(RECIPES / "paper.yaml")
    assert [s.name for s in r.stages] == ["attn_align", "hidden_align", "kd", "kd_instruct"]
    a, h, kd, inst = r.stages
    assert a.objective == {"attn_align": 1.0} and a.tokens == 30_000_000 and a.train == ["kda"]
    assert h.objective == {"hidden_align": 1.0} and h.tokens == 30_000_000
    assert kd.objective == {"kd": 1.0} and kd.divergence == "fkl" and kd.tokens == 500_000_000
    assert (kd.lr, kd.schedule, kd.warmup, kd.decay, kd.min_lr_ratio, kd.weight_decay, kd.batch_size) == \
        (2.5e-5, "wsd", 0.1, 0.1, 0.02, 0.1, 64)
    assert kd.train == ["kda", "mlp", "norms"]
    assert inst.loss_mask == "completion_only" and inst.tokens == 250_000_000 and inst.seq_len == 4096
    assert "attention" not in inst.train and r.data[inst.data].path == "HuggingFaceTB/smoltalk"
    assert r.student == {"convert": {"attention_layers": [0, 2, 6, 11, 13, 18, 21]}}


def test_wsd_and_cosine_schedules():
    r = load_recipe(RECIPES / "paper.yaml")
    kd = r.stages[2]
    n = total_steps(kd)
    f = [lr_factor(s, n, kd) for s in range(n)]
    warm = round(0.1 * n)
    assert f[0] == pytest.approx(1 / (warm + 1)) and f[warm - 1] == pytest.approx(warm / (warm + 1))
    assert all(x == 1.0 for x in f[warm:n - round(0.1 * n)])  # stable
    assert f[-1] == pytest.approx(0.02) and all(a >= b for a, b in zip(f[warm:], f[warm + 1:]))
    a = r.stages[0]
    g = [lr_factor(s, 100, a) for s in range(100)]
    assert g[5] == pytest.approx(1.0) and 0.1 < g[-1] < 0.11  # cosine from 1 to min_lr_ratio 0.1


def test_overrides_target_one_stage_every_stage_or_top_level():
    r = load_recipe(TINY, ["kd.lr=5e-4", "*.seq_len=16", "out_dir=/x/y", "data.text.shuffle=false",
                           "kd.objective={kd: 1.0, ce: 0.1}", "hidden_align.tokens=2k", "hidden_align.steps=null",
                           "kd.tokens=1.5M", "kd.steps=null"])
    kd = r.stage("kd")
    assert kd.lr == 5e-4 and kd.objective == {"kd": 1.0, "ce": 0.1}
    assert r.stage("attn_align").lr == 3e-3  # untouched
    assert all(s.seq_len == 16 for s in r.stages) and r.out_dir == "/x/y" and r.data["text"].shuffle is False
    # the one size rule (gendistill.io.parse_size): k = 1024, M/B/T decimal, as context lengths and budgets are written
    assert r.stage("hidden_align").tokens == 2048 and total_steps(r.stage("hidden_align")) == 2048 // (4 * 16)
    assert kd.tokens == 1_500_000
    with pytest.raises(UserError, match=r"stages\[2\] \(kd\).tokens: expected a positive whole count such as 300, 4k"):
        load_recipe(TINY, ["kd.tokens=1.5x", "kd.steps=null"])


@pytest.mark.parametrize("override,needle", [
    ("kd.lrr=1", "stages[2] (kd).lrr: unknown key (did you mean 'lr'?)"),
    ("kd.lr=-1", "stages[2] (kd).lr: must be > 0"),
    ("kd.lr=fast", "stages[2] (kd).lr: expected a number"),
    ("kd.divergence=kl", "stages[2] (kd).divergence: expected one of fkl, rkl, jsd"),
    ("kd.jsd_beta=1", "stages[2] (kd).jsd_beta: must be < 1"),
    ("kd.objective=distill", "stages[2] (kd).objective: expected one of attn_align, qk_align, hidden_align, kd, ce"),
    ("kd.objective={kd: 0}", "stages[2] (kd).objective: at least one term needs a positive weight"),
    ("kd.train=[kda, attn]", "stages[2] (kd).train: unknown parameter group 'attn'"),
    ("kd.schedule=linear", "stages[2] (kd).schedule: expected one of constant, cosine, wsd"),
    ("kd.loss_mask=assistant", "stages[2] (kd).loss_mask: expected one of all, completion_only"),
    ("kd.micro_batch_size=3", "stages[2] (kd).micro_batch_size: 3 does not divide batch_size 4"),
    ("kd.packing=pad", "stages[2] (kd).packing: expected one of concat, whole"),
    (("kd.packing=whole", "kd.count=scored", "kd.tokens=4k", "kd.steps=null"),
     "stages[2] (kd).count: `count: scored` is computed for `packing: concat` only"),
    ("kd.tokens=lots", "stages[2] (kd): give exactly one of `tokens`"),
    ("kd.data=web", "stages[2] (kd).data: no data source 'web'"),
    ("kd.eval=nowhere.module:fn", "kd.eval = nowhere.module:fn. Check that you trust it, then pass --allow-code"),
    ("defaults.sequence_length=8", "defaults.sequence_length: unknown key"),
    ("data.text.fromat=json", "data.text.fromat: unknown key (did you mean 'format'?)"),
    ("data.text.path=[]", "data.text.path: a list of local files/directories must be non-empty strings"),
    (("data.text.path=[a.jsonl, b.jsonl]", "data.text.format=hub"), "data.text.format: a `path` list names local"),
    ("teacher=null", "teacher: required: stages ['attn_align', 'hidden_align', 'kd', 'kd_instruct']"),
    ("student={convert: {}, config: {}}", "student: expected one of"),
    ("parallel=zero3", "parallel: expected one of auto, fsdp, ddp"),
    ("bogus=1", "--set bogus: 'bogus' is neither a stage (attn_align, hidden_align, kd, kd_instruct) nor a recipe"),
])
def test_bad_recipe_values_fail_naming_the_key_and_write_nothing(tmp_path, override, needle):
    out = tmp_path / "run"
    with pytest.raises(UserError) as err:
        run_recipe(TINY, [f"out_dir={out}", *([override] if isinstance(override, str) else override)])
    assert needle in str(err.value)
    assert not out.exists()


def test_bad_recipe_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text(yaml.safe_dump({"student": "x", "stages": [{"name": "a", "objective": "ce", "data": "d",
                                                               "steps": 1}, {"name": "a", "objective": "ce",
                                                                             "data": "d", "steps": 1}],
                                   "data": {"d": "x.jsonl"}}))
    with pytest.raises(UserError, match=r"stage names must be unique, repeated: \['a'\]"):
        load_recipe(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_recipe(TINY, ["kd.lr"])
    raw = yaml.safe_load(TINY.read_text().replace("${recipe_dir}", str(RECIPES)))
    raw["techer"] = raw.pop("teacher")
    with pytest.raises(UserError, match=r"^techer: unknown key \(did you mean 'teacher'\?\)"):
        run_recipe(raw, [f"out_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()


def test_chat_stage_on_text_data_fails_before_writing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError) as err:
        run_recipe(TINY, [f"out_dir={out}", "kd_instruct.data=text"])
    msg = str(err.value)
    assert "kd_instruct" in msg and "completion_only" in msg and "messages" in msg and "plain text" in msg
    assert not out.exists()


def test_group_or_layers_missing_from_the_student_fail_before_writing(tmp_path):
    out = tmp_path / "run"
    plain = "student={factory: 'gendistill.testing:tiny_qwen3', kwargs: {seed: 1}}"  # a Qwen3: no KDA layers
    with pytest.raises(UserError, match=r"parameter group\(s\) \['kda'\] match no parameter of the student"):
        run_recipe(TINY, [f"out_dir={out}", plain])
    with pytest.raises(UserError, match="has no KDA layers"):
        run_recipe(TINY, [f"out_dir={out}", plain, "*.train=all"])
    with pytest.raises(UserError, match=r"layers: \[9\] out of range"):
        run_recipe(TINY, [f"out_dir={out}", "attn_align.layers=[1, 9]"])
    with pytest.raises(UserError, match="could not read data source"):
        run_recipe(TINY, [f"out_dir={out}", f"data.text.path={tmp_path / 'nope.jsonl'}"])
    assert not out.exists()


def test_existing_output_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="--resume to continue it or --overwrite"):
        run_recipe(TINY, [f"out_dir={out}"])
    assert (out / "keep.txt").read_text() == "x"


def test_cli_check_errors_and_a_run(tmp_path, capsys):
    from gendistill.cli import main

    assert main(["distill", str(RECIPES / "paper.yaml"), "--check"]) == 0
    out = capsys.readouterr().out
    assert "3. kd: {'kd': 1.0} on pretrain (all); train ['kda', 'mlp', 'norms']; 3815 steps x 64 x 2048" in out
    assert "0. convert: the teacher -> Hybrid-KDA student {'attention_layers': [0, 2, 6, 11, 13, 18, 21]} -> " \
           "runs/paper/convert/model" in out
    assert main(["distill", str(TINY), "--set", "kd.lrr=1"]) == 2
    assert "gendistill distill: error: stages[2] (kd).lrr: unknown key (did you mean 'lr'?)" in capsys.readouterr().err
    out_dir = tmp_path / "run"
    args = ["distill", str(TINY), "--set", f"out_dir={out_dir}", "--set", "*.steps=1", "--no-progress"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["final_model"] == str(out_dir / "04-kd_instruct" / "model") and len(summary["stages"]) == 4
    assert main(args) == 2 and "--resume" in capsys.readouterr().err  # exists: resume or overwrite
    assert main(args + ["--resume"]) == 0  # every stage done: nothing to redo
    assert main(args + ["--overwrite"]) == 0
