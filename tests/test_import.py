"""`import gendistill` is cheap and has no side effect but the Auto-class registration; `gendistill --help` imports
neither torch nor transformers (it answered in 7.7 s when the package imported them eagerly)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_help_imports_neither_torch_nor_transformers():
    done = run("""
        import contextlib, io, sys
        from gendistill import cli
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert cli.main(["--help"]) == 0
        assert "usage: gendistill" in out.getvalue()
        heavy = sorted(m for m in ("torch", "transformers", "triton", "numpy") if m in sys.modules)
        assert not heavy, heavy
    """)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    from gendistill import convert
    from gendistill.testing import tiny_qwen3

    path = tmp_path_factory.mktemp("import") / "student"
    convert(tiny_qwen3(layers=2), attention_layers=[0]).save_pretrained(path)  # no auto_map: local classes only
    return path


@pytest.mark.parametrize("transformers_first", [False, True])
def test_import_registers_the_auto_classes_and_leaves_the_environment_alone(student_dir, transformers_first):
    """Either import order registers gendistill's classes; os.environ is what it was before `import gendistill`, and
    registering adds nothing to it beyond what importing transformers' Qwen3 module does by itself."""
    done = run("""
        import os, sys
        first = sys.argv[2] == "True"
        if first:
            import transformers.models.qwen3.modeling_qwen3
        before = dict(os.environ)
        import gendistill
        assert dict(os.environ) == before
        assert ("torch" in sys.modules) == first  # nothing heavy is imported unless transformers already was
        if not first:
            import transformers.models.qwen3.modeling_qwen3  # may set variables of its own (torch inductor's)
            before = dict(os.environ)
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        assert type(model).__module__ == "gendistill.modeling", type(model)
        assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
        assert gendistill.convert.__module__ == "gendistill.convert" and callable(gendistill.convert)
    """, str(student_dir), str(transformers_first))
    assert done.returncode == 0, done.stderr[-2000:]
