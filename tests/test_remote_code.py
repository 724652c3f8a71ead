"""Student directories load without gendistill (`trust_remote_code=True`, the hub convention for custom
architectures) and describe themselves (README.md); gendistill's own loads keep gendistill's classes."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import get_imports

from gendistill import cli, hub
from gendistill import modeling
from gendistill.testing import tiny_qwen3

# Run in a fresh interpreter: -I ignores PYTHONPATH and the working directory (the repository), and the finder below
# stands in for an environment where gendistill is not installed at all (this venv has it installed, editable).
LOADER = textwrap.dedent('''
    import sys

    class NoGendistill:
        def find_spec(self, name, path=None, target=None):
            if name == "gendistill" or name.startswith("gendistill."):
                raise ModuleNotFoundError(f"No module named {name!r}")

    sys.meta_path.insert(0, NoGendistill())
    try:
        import gendistill
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("gendistill is importable: the test would prove nothing")
    import torch
    from transformers import AutoModelForCausalLM

    student_dir, inputs, out = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(student_dir, trust_remote_code=True, dtype=torch.float32).eval()
    assert not any(name.startswith("gendistill") for name in sys.modules), "gendistill got imported"
    x, rows, mask = torch.load(inputs, weights_only=True)
    with torch.no_grad():
        result = {"class": type(model).__module__ + "." + type(model).__name__, "logits": model(x).logits,
                  "padded": model(rows, attention_mask=mask).logits,
                  "generated": model.generate(x, max_new_tokens=5, do_sample=False)}
    torch.save(result, out)
''')


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    tiny_qwen3(layers=3).save_pretrained(root / "teacher")
    assert cli.main(["convert", "--teacher", str(root / "teacher"), "--out", str(root / "student"),
                     "--attention-layers", "1"]) == 0
    return root / "student"


@pytest.fixture(scope="module")
def mixer_student_dir(tmp_path_factory):
    """A pure-linear student with every linear mixer (mixer_types): no attention layer, so generate() needs the
    shipped LinearStateCache, and every shipped mixer runs."""
    from gendistill.convert import convert

    directory = tmp_path_factory.mktemp("mixers") / "student"
    student = convert(tiny_qwen3(layers=4), attention_layers=[], mixer=["gdn", "gla", "mamba2", "kda"])
    student.save_pretrained(directory)
    hub.write_student_files(directory, student)
    return directory


def test_the_shipped_files_are_gendistills_reference_files(student_dir):
    """Byte for byte the package's own reference model and KDA ops, closed under their relative imports, importing
    nothing beyond torch, transformers and the standard library (transformers checks exactly this list)."""
    sources = hub.shipped_sources()
    assert {name: (student_dir / name).read_text() for name in hub.SHIPPED} == sources
    assert sources["modeling_hybrid_kda.py"] == Path(modeling.reference.__file__).read_text()
    for name, text in sources.items():
        assert {f"{m}.py" for m in hub.relative_imports(text)} <= set(hub.SHIPPED), name
        third_party = set(get_imports(student_dir / name)) - set(sys.stdlib_module_names)
        assert third_party <= {"torch", "transformers"}, (name, third_party)
    config = json.loads((student_dir / "config.json").read_text())
    assert config["auto_map"] == hub.AUTO_MAP and config["model_type"] == "hybrid_kda"


def test_loads_with_trust_remote_code_where_gendistill_is_not_installed(student_dir, tmp_path):
    remote_equals_local(student_dir, tmp_path)


def test_other_mixers_load_with_trust_remote_code_where_gendistill_is_not_installed(mixer_student_dir, tmp_path):
    remote_equals_local(mixer_student_dir, tmp_path)


def remote_equals_local(student_dir, tmp_path):
    """The shipped code, loaded where gendistill is not importable, computes what gendistill's classes compute:
    logits, left-padded logits, greedy generate."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(3, 384, (2, 21), generator=gen)
    rows, mask = x.clone(), torch.ones_like(x)
    rows[1, :6], mask[1, :6] = 0, 0
    torch.save((x, rows, mask), tmp_path / "inputs.pt")
    (tmp_path / "load.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    done = subprocess.run([sys.executable, "-I", str(tmp_path / "load.py"), str(student_dir),
                           str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt", weights_only=True)
    assert remote["class"].startswith("transformers_modules.") and remote["class"].endswith(".HybridKDAForCausalLM")

    ours = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()  # gendistill imported
    assert type(ours) is modeling.HybridKDAForCausalLM  # local classes win without trust_remote_code
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], ours(x).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(remote["padded"], ours(rows, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(remote["generated"], ours.generate(x, max_new_tokens=5, do_sample=False))


def test_model_card_and_provenance_follow_the_stages(student_dir, tmp_path):
    card = (student_dir / "README.md").read_text()
    assert "base_model:" in card and "teacher" in card and "attention layers [1]" in card
    assert "trust_remote_code=True" in card and "not distilled yet" in card
    # a distill stage saving the next model: its provenance continues the converted student's
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    stage_dir = tmp_path / "stage"
    student.save_pretrained(stage_dir)
    summary = {"stage": "kd", "steps": 10, "tokens": 40960, "trainable": ["kda"], "final": {"loss": 1.25},
               "eval": {"accuracy": 0.5, "n": 100}}
    hub.write_student_files(stage_dir, student, stage=summary)
    provenance = json.loads((stage_dir / "gendistill.json").read_text())
    assert provenance["teacher"].endswith("teacher") and provenance["stages"] == [summary]
    card = (stage_dir / "README.md").read_text()
    assert "| kd | 10 | 40,960 | kda | 1.25 |" in card and "40,960 training tokens" in card
    assert "## Evaluation" in card and "- accuracy: 0.5" in card
    assert json.loads((stage_dir / "config.json").read_text())["auto_map"] == hub.AUTO_MAP
