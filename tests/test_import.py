"""`import gendistill` is cheap and has no side effect but the Auto-class registration; `gendistill --help` imports
neither torch nor transformers (it answered in 7.7 s when the package imported them eagerly). The module graph has
no import cycles and no private names imported across modules."""
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


# ---- the module graph: no import cycles, no private names across modules --------------------------------------------


def module_graph(root: Path, package: str) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """{module: modules it imports (at module level or inside functions)} over every .py file of `package` under
    `root`, and the (importer, module, name) of every `from module import _name` across modules. `from pkg import
    sub` counts as importing the submodule pkg.sub; `from pkg import name` as importing pkg itself."""
    import ast

    files = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[str, set[str]] = {name: set() for name in files}
    private = []
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, one level up per extra dot
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                targets = [(f"{base}.{a.name}", None) if f"{base}.{a.name}" in files else (base, a.name)
                           for a in node.names]
            for target, imported in targets:
                while target not in files and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in files and target != name:
                    edges[name].add(target)
                    if imported and imported.startswith("_") and not imported.startswith("__"):
                        private.append((name, target, imported))
    return edges, private


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle [a, b, ..., a], or None (depth-first search, iterative)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(edges):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(edges[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges.get(nxt, ()))))
    return None


def test_the_checks_find_a_planted_cycle_and_private_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import c\n")
    (pkg / "a.py").write_text("import os\nfrom pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from .sub.c import _helper\n")  # lazy and relative, still an edge
    (pkg / "sub" / "c.py").write_text("from pkg.a import thing\n_helper = 1\n")
    edges, private = module_graph(tmp_path, "pkg")
    assert edges["pkg.a"] == {"pkg.b"} and edges["pkg.b"] == {"pkg.sub.c"} and edges["pkg.sub"] == {"pkg.sub.c"}
    assert find_cycle(edges) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    assert private == [("pkg.b", "pkg.sub.c", "_helper")]
    (pkg / "sub" / "c.py").write_text("_helper = 1\n")
    assert find_cycle(module_graph(tmp_path, "pkg")[0]) is None


def test_gendistill_has_no_import_cycles_and_no_private_imports_across_modules():
    """Dependencies run one way (a newcomer reads a module knowing what it stands on), and what a module shares is
    public. Lazy imports inside functions count too: they hide a cycle from the interpreter, not from the reader."""
    edges, private = module_graph(REPO, "gendistill")
    assert len(edges) > 40 and "gendistill.distill.trainer" in edges["gendistill.ablate"]
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges))}"
    assert not private, f"private names imported across modules (make them public or move them): {private}"
