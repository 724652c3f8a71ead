"""gendistill: Qwen3 -> Hybrid-KDA conversion and GenDistill distillation, judged by what the student generates.

`import gendistill` is cheap and changes nothing in the process but this: gendistill's `HybridKDAConfig` /
`HybridKDAForCausalLM` get registered with transformers' Auto classes, so that `AutoModelForCausalLM.from_pretrained`
loads students (without trust_remote_code). The registration needs torch and transformers, which take seconds to
import, so it happens when transformers is imported: at once if it already is, else right after the process imports
it (a one-shot import hook). `gendistill --help` imports neither. The package's names (`convert`,
`HybridKDAConfig`, `HybridKDAForCausalLM`) are imported on first use (PEP 562).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {"HybridKDAConfig": "gendistill.configuration_hybrid_kda", "HybridKDAForCausalLM": "gendistill.modeling"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # `import gendistill; gendistill.kda...` as before
    raise AttributeError(f"module 'gendistill' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_EXPORTS, "convert"})


class _Package(types.ModuleType):
    """`gendistill.convert` is the function (the documented API), although a submodule has the same name: importing
    the submodule binds it on the package, which this property ignores (the submodule stays in sys.modules, where
    `from gendistill.convert import ...` finds it)."""

    @property
    def convert(self):
        from gendistill.convert import convert
        return convert

    @convert.setter
    def convert(self, submodule):
        pass


sys.modules[__name__].__class__ = _Package


def _register() -> None:
    """Import gendistill.modeling, which registers the Auto classes, unless a gendistill module is itself importing
    transformers half-way through its own import (modeling would import it back, half-initialised): that module's
    users reach modeling through their own imports (loading.load_model, convert, the trainer, the CLI verbs)."""
    if any(getattr(getattr(m, "__spec__", None), "_initializing", False)
           for name, m in list(sys.modules.items()) if name.startswith("gendistill.")):
        return
    importlib.import_module("gendistill.modeling")


class _RegisterAfterImport(importlib.abc.Loader):
    """transformers' own loader, then the registration."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader  # transformers sees its own loader
        self.loader.exec_module(module)
        _register()


class _TransformersImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: on the first import of transformers it removes itself and wraps the real loader."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterImport(spec.loader)
        return spec


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(finder, _TransformersImportHook) for finder in sys.meta_path):
    sys.meta_path.insert(0, _TransformersImportHook())
