"""kernels.launch's bookkeeping, with a stand-in for Triton's compiled kernel (CI has no GPU; the GPU benchmark
checks the direct launches against Triton's own, `bench.direct_launch_check`)."""
import warnings

import pytest
import torch
import triton.language as tl
from triton import knobs
from triton.runtime.jit import JITFunction

from gendistill import kernels
from gendistill.kernels import launch


def kernel_fn(x, out, n, width, scale, BLOCK: tl.constexpr, CHOSEN: tl.constexpr):
    pass


class Launcher:
    """Stands in for Triton 3.6's CudaLauncher: its Python __call__ allocates scratch space, then calls the C launch."""

    def __init__(self, launches, scratch):
        self.launches, self.global_scratch_size, self.profile_scratch_size = launches, scratch, 0
        self.launch_cooperative_grid, self.launch_pdl = False, True

    def __call__(self, *args):
        self.launches.append(("direct, through the launcher's Python", args))

    def launch(self, *args):
        self.launches.append(("direct", args))


class Compiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self, launches, scratch=0):
        self.run = Launcher(launches, scratch)


class Kernel:
    """Stands in for an autotuned triton kernel: `kernel[grid](**kwargs)` picks CHOSEN, calls grid(meta) and returns
    the compiled kernel; `.fn` is a real JITFunction (the signature the launcher reads)."""

    def __init__(self, returns_compiled=True, scratch=0):
        self.fn = JITFunction(kernel_fn, do_not_specialize=["n"])
        self.launches, self.returns_compiled, self.best_config, self.scratch = [], returns_compiled, None, scratch

    def __getitem__(self, grid):
        def run(**kwargs):
            meta = {**{k: v for k, v in kwargs.items() if k != "num_warps"}, "CHOSEN": 8}
            self.launches.append(("triton", grid(meta) if callable(grid) else grid))
            return Compiled(self.launches, self.scratch) if self.returns_compiled else None
        return run


@pytest.fixture(autouse=True)
def one_cuda_device(monkeypatch):
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)


def call(launcher, x, n=100, width=64, out=None, **kw):
    out = torch.empty(n) if out is None else out
    launcher(lambda m: (-(-m["n"] // m["CHOSEN"]), m["width"]), x=x, out=out, n=n, width=width, scale=0.5,
             BLOCK=32, num_warps=4, **kw)
    return out


def kinds(kernel):
    return [k for k, _ in kernel.launches]


@pytest.mark.parametrize("scratch", [0, 256])
def test_later_calls_go_straight_to_the_compiled_kernel_with_triton_s_choices(scratch):
    """After Triton's launch, the compiled kernel's C launch function with the arguments Triton's launcher would pass
    (through the launcher's Python where the kernel needs scratch space it allocates)."""
    kernel = Kernel(scratch=scratch)
    run = launch.Launcher(kernel)
    x = torch.zeros(100)
    call(run, x)
    out = call(run, x, n=200)  # n is do_not_specialize: same compiled kernel, a new grid from the chosen CHOSEN
    if scratch:
        assert kinds(kernel) == ["triton", "direct, through the launcher's Python"]
        *head, args = kernel.launches[1][1][:9], kernel.launches[1][1][9:]
        assert head[0] == (25, 64, 1, 1234, "function", "metadata", None, None, None)
    else:
        assert kinds(kernel) == ["triton", "direct"]
        *head, args = kernel.launches[1][1][:13], kernel.launches[1][1][13:]
        # grid, stream, function, cooperative grid, PDL, two scratch buffers, metadata, launch metadata, hooks
        assert head[0] == (25, 64, 1, 1234, "function", False, True, None, None, "metadata", None, None, None)
    assert list(args[:5]) == [x, out, 200, 64, 0.5] and list(args[5:]) == [32, 8]  # signature order, constexprs


@pytest.mark.parametrize("change", ["dtype", "alignment", "none", "specialized int", "num_warps", "int64 length"])
def test_what_triton_would_compile_or_tune_differently_takes_triton_s_path(change):
    kernel = Kernel()
    run = launch.Launcher(kernel)
    x = torch.zeros(100)
    call(run, x)
    call(run, x)
    if change == "dtype":
        call(run, x.double())
    elif change == "alignment":
        call(run, torch.zeros(101)[1:])  # 4 bytes off a 16-byte boundary
    elif change == "none":
        call(run, None)
    elif change == "specialized int":
        call(run, x, width=65)
    elif change == "num_warps":
        run(lambda m: (1,), x=x, out=torch.empty(100), n=100, width=64, scale=0.5, BLOCK=32, num_warps=8)
    else:
        run(lambda m: (1,), x=x, out=torch.empty(1), n=2**31, width=64, scale=0.5, BLOCK=32, num_warps=4)
    assert kinds(kernel) == ["triton", "direct", "triton"]


def test_triton_s_path_whenever_the_fast_one_would_skip_something(monkeypatch):
    x = torch.zeros(100)
    interpreted = Kernel(returns_compiled=False)  # TRITON_INTERPRET: no compiled kernel comes back
    run = launch.Launcher(interpreted)
    for _ in range(3):
        call(run, x)
    assert kinds(interpreted) == ["triton"] * 3

    hooked = Kernel()
    hooked.best_config = type("Config", (), {"pre_hook": staticmethod(lambda args: None)})()
    run = launch.Launcher(hooked)
    call(run, x)
    call(run, x)
    assert kinds(hooked) == ["triton"] * 2

    kernel = Kernel()
    run = launch.Launcher(kernel)
    call(run, x)
    with kernels.use(direct_launch=False):
        call(run, x)
    profiler = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_exit_hook.add(profiler)  # as proton adds its hooks
    try:
        call(run, x)
    finally:
        knobs.runtime.launch_exit_hook.remove(profiler)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", profiler)  # a hook set the older way
    call(run, x)
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", None)
    call(run, x)
    assert kinds(kernel) == ["triton", "triton", "triton", "triton", "direct"]


def test_the_cache_starts_over_when_full(monkeypatch):
    monkeypatch.setattr(launch, "MAX_SPECIALIZATIONS", 2)
    kernel = Kernel()
    run = launch.Launcher(kernel)
    x = torch.zeros(100)
    for width in (16, 32, 48, 16):
        call(run, x, width=width)
    assert kinds(kernel) == ["triton"] * 4 and len(run.compiled) == 2


def test_an_unverified_triton_turns_direct_launches_off_with_one_warning(monkeypatch):
    """The launcher drives Triton 3.6's internals: with any other Triton every call takes Triton's own path, and one
    warning (per process) names what was turned off and the versions involved."""
    from gendistill.kernels import compat

    monkeypatch.setattr(compat, "installed_version", lambda module: "9.9.9" if module == "triton" else "0.6.0")
    compat.supported.cache_clear()
    try:
        kernel = Kernel()
        run = launch.Launcher(kernel)
        x = torch.zeros(100)
        with pytest.warns(RuntimeWarning, match=r"direct_launch turned off.*triton 3\.6\.0, found 9\.9\.9"):
            call(run, x)
            call(run, x)
        assert kinds(kernel) == ["triton", "triton"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process: no second warning
            call(run, x)
        assert compat.supported("fla_kernels")  # the other gate is independent
    finally:
        compat.supported.cache_clear()


def test_the_verified_versions_are_what_the_gpu_extra_pins():
    """The `gpu` extra installs exactly the fla release the direct fla-kernel path was verified on."""
    import tomllib
    from pathlib import Path

    from gendistill.kernels import compat

    extra = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    pins = extra["project"]["optional-dependencies"]["gpu"]
    assert all(f"{name}=={compat.VERIFIED['fla_kernels'][1][-1]}" in pins for name in ("fla-core", "flash-linear-attention"))
