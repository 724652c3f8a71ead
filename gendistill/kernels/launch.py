"""Triton launches at a fraction of Triton's host cost, for inference on short inputs, where the GPU waits on the host.

`kernel[grid](...)` costs the host 25-70 µs a launch (measured on an H200's host: Triton's binder and cache lookup,
the autotuner's and heuristics' bookkeeping, fla's Python wrappers around its kernels), and a 4K prefill of the
student issues ~260 of them. `Launcher(kernel)(grid, **kwargs)` sends the first call of each specialization through
Triton (compiling, autotuning: the reference path), keeps the compiled kernel and the meta-parameters Triton chose for
it, and sends later calls with the same specialization straight to the compiled kernel's C launch function. Host time
on an H200's host (`bench/host_profile.py`): a gendistill RMSNorm call 34 against 46 µs, fla's KDA scan stage
29 against 85 µs (with fla's wrapper), a student 4K prefill 25.0 against 38.9 ms.

The specialization key holds what Triton compiles or chooses a config on: each tensor's dtype and 16-byte alignment,
which arguments are None, the value of every other argument (ints exactly, except those the kernel marks
`do_not_specialize`: their 32/64-bit width only), and the current device. That covers the autotuner's keys and
heuristics that look at arguments' None-ness or sizes given as ints (every kernel routed here; heuristics reading the
data of a tensor argument or a `do_not_specialize` int would not be covered: don't route such kernels here).
Triton's path is taken for every call when the first one returned no compiled kernel (TRITON_INTERPRET, the CPU
tests), a launch hook is set (profilers), a config has a pre-hook, inside `policy.use(direct_launch=False)`, or where
the installed Triton is not a version this was verified on (`compat`: it drives Triton 3.6's launcher internals).

Kept over CUDA graphs (docs/PERF_LOG.md, "Direct launches or CUDA graphs"): graphs need fixed shapes and static
buffers, which `generate()`, serving and the evaluation engine do not have; direct launches make every eager call
cheaper on the host, at every shape.
"""
from __future__ import annotations

import types

import torch

from gendistill.kernels import policy

INT32 = range(-2**31, 2**31)
MAX_SPECIALIZATIONS = 256  # per kernel; beyond, the cache starts over


class Launcher:
    """`launcher(grid, **kwargs)` launches `kernel` (a triton.jit function, possibly under triton.autotune /
    heuristics) as `kernel[grid](**kwargs)` does: `grid` a tuple, or a function of meta (the call's arguments and the
    meta-parameters Triton chose) as Triton takes it."""

    def __init__(self, kernel):
        from triton import knobs

        self.kernel, self.hooks = kernel, knobs.runtime
        jit = kernel
        while not isinstance(getattr(jit, "fn", None), types.FunctionType):  # autotune/heuristics wrap it as .fn
            jit = jit.fn
        self.arg_names = list(jit.arg_names)
        self.compiles = hasattr(jit, "params")  # a JITFunction; TRITON_INTERPRET's stand-in takes Triton's path
        self.unspecialized = {p.name for p in getattr(jit, "params", []) if p.do_not_specialize}
        self.compiled = {}  # key -> what `_record` returns: how to launch the compiled kernel, or None (Triton's path)

    def key(self, device: int, kwargs: dict) -> tuple:
        unspecialized = self.unspecialized
        return (device, *[
            (v.dtype, v.data_ptr() & 15 == 0) if isinstance(v, torch.Tensor)
            else (v in INT32) if k in unspecialized and type(v) is int
            else v
            for k, v in kwargs.items()])

    def __call__(self, grid, **kwargs) -> None:
        if not (self.compiles and policy.direct_launch()):
            self.kernel[grid](**kwargs)
            return
        device = torch._C._cuda_getDevice()
        key = self.key(device, kwargs)
        hit = self.compiled.get(key, False)
        if hit is None or _hooked(self.hooks.launch_enter_hook) or _hooked(self.hooks.launch_exit_hook):
            self.kernel[grid](**kwargs)
        elif hit is False:
            if len(self.compiled) >= MAX_SPECIALIZATIONS:
                self.compiled.clear()
            self.compiled[key] = self._record(grid, kwargs)
        else:
            launch, between, chosen = hit
            if callable(grid):
                grid = grid({**chosen, **kwargs})
            launch(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                   torch._C._cuda_getCurrentRawStream(device), *between,
                   *[kwargs[name] if name in kwargs else chosen[name] for name in self.arg_names])

    def _record(self, grid, kwargs: dict):
        """Triton's own launch; returns what later calls need (the launch function, the arguments it takes between
        the stream and the kernel's own, the meta-parameters Triton chose), or None where they must take Triton's
        path too."""
        chosen = {}

        def record(meta):  # the last call is the launch (an autotuner calls it for each config it times first)
            chosen.clear()
            chosen.update(meta)
            return grid(meta) if callable(grid) else grid

        compiled = self.kernel[record](**kwargs)
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata")) or _has_pre_hooks(self.kernel):
            return None
        launcher = compiled.run
        chosen = {k: v for k, v in chosen.items() if k not in kwargs}
        if getattr(launcher, "global_scratch_size", 1) == 0 and getattr(launcher, "profile_scratch_size", 1) == 0:
            # Triton 3.6's CudaLauncher: its C function, past the Python that only allocates scratch space
            return launcher.launch, (compiled.function, launcher.launch_cooperative_grid, launcher.launch_pdl, None,
                                     None, compiled.packed_metadata, None, None, None), chosen
        return launcher, (compiled.function, compiled.packed_metadata, None, None, None), chosen


def _hooked(hook) -> bool:
    """Whether a launch hook is set (Triton 3.6 keeps them in a HookChain, empty unless a profiler adds one)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _has_pre_hooks(kernel) -> bool:
    """Whether launching `kernel` runs Python besides the launch: a chosen config's pre-hook, a JIT pre-run hook."""
    while kernel is not None:
        config = getattr(kernel, "best_config", None)
        if getattr(config, "pre_hook", None) is not None or getattr(kernel, "pre_run_hooks", None):
            return True
        kernel = getattr(kernel, "fn", None)
    return False
