"""The other libraries' internals that gendistill's fast paths drive, and the exact versions they were verified on.

Two fast paths reach past public APIs:
- `launch.Launcher` calls Triton's compiled-kernel launcher directly (`CompiledKernel.run`, the C `launch` function
  of Triton 3.6's CudaLauncher with its positional layout, `knobs.runtime` launch hooks);
- `segments.FlaKernels` launches six of fla's KDA kernels with fla 0.6.0's argument lists and buffers, past fla's
  stage wrappers.
Each is enabled only where the installed version is one it was verified on (the GPU tests, `pytest -m gpu`, run both
against their references there). Elsewhere the path steps aside for the public one (Triton's own launcher, fla's
stage functions: same results, more host time on short inputs) and `warnings.warn` names what was turned off, once
per process. Everything else gendistill uses from Triton, fla and transformers is public API.
"""
from __future__ import annotations

import functools
import importlib
import warnings

# feature -> (module, versions verified, what turning it off costs)
VERIFIED = {
    "direct_launch": ("triton", ("3.6.0",),
                      "Triton's own launcher is used: same results, ~25 ms more host time per 4K prefill"),
    "fla_kernels": ("fla", ("0.6.0",),
                    "fla's stage functions are used: same results, ~0.3 ms more host time per KDA layer"),
}


def installed_version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # not installed, or (triton) failing to initialise
        return None


@functools.cache
def supported(feature: str) -> bool:
    """Whether `feature`'s fast path may run with the installed library; warns once per process where it may not
    (a library that is not installed at all turns nothing off: the path could not run anyway)."""
    module, versions, cost = VERIFIED[feature]
    found = installed_version(module)
    if found is None:
        return False
    if found not in versions:
        warnings.warn(f"gendistill: {feature} turned off: it drives {module} internals verified on {module} "
                      f"{', '.join(versions)}, found {found}. {cost}.", RuntimeWarning, stacklevel=2)
        return False
    return True
