"""gendistill's Triton kernels compile for an H100/H200 (sm_90) on this CPU machine: Triton's interpreter, which runs
them in the other tests, accepts code its GPU compiler rejects (a branch yielding different types, a non-constexpr
where one is needed). Compiled as the GPU compiles them (bf16 tensors, the Qwen3-0.6B shapes' constexprs), in a
process of its own: under TRITON_INTERPRET (conftest.py) even triton.language's helpers are interpreted functions."""
import json
import os
import subprocess
import sys

BF16 = "*bf16"
KERNELS = {  # name: (module, kernel factory, argument types, constexprs)
    "rms_norm": ("gendistill.kernels.norm", "_kernel", dict(x=BF16, residual=BF16, gate=BF16, weight=BF16, out=BF16,
                                                    residual_out=BF16, rows="i32", width="i32", eps="fp32"),
                 dict(HAS_RESIDUAL=True, GATE=1, ROWS=4, BLOCK=1024)),
    "qk_norm_rotary": ("gendistill.kernels.norm", "_qk_kernel", dict(q=BF16, k=BF16, q_weight=BF16, k_weight=BF16, cos=BF16,
                                                             sin=BF16, q_out=BF16, k_out=BF16, T="i32", eps="fp32"),
                       dict(HQ=16, HK=8, D=128, COS_PER_ROW=True, ROWS=16)),
    "swiglu": ("gendistill.kernels.qwen3", "_swiglu_kernel", dict(gate=BF16, up=BF16, out=BF16, rows="i32", width="i32"),
               dict(ROWS=4, BLOCK=1024)),
    "kda_heads with the conv": ("gendistill.kernels.heads", "_kernel",
                                dict(x=BF16, q=BF16, k=BF16, v=BF16, conv_w=BF16, conv_b=BF16, ctx=BF16, T="i32",
                                     eps="fp32"),
                                dict(H=16, HKV=8, D=128, W=4, CONV=True, HAS_BIAS=True, HAS_CTX=True, SILU=False,
                                     NORMALIZE=True, ROWS=64)),
}


def compile_all() -> dict:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, (module, factory, signature, constexprs) in KERNELS.items():
        jit = getattr(importlib.import_module(module), factory)().kernel
        try:
            assert list({**signature, **constexprs}) == jit.arg_names, "every argument typed, in order"
            source = ASTSource(fn=jit, signature={**signature, **{k: "constexpr" for k in constexprs}},
                               constexprs=constexprs)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
            results[name] = ".entry" in compiled.asm["ptx"] and len(compiled.asm["cubin"]) > 0
        except Exception as e:  # reported by the test, with the compiler's message
            results[name] = f"{type(e).__name__}: {e}"
    return results


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results == {name: True for name in KERNELS}


if __name__ == "__main__":
    print(json.dumps(compile_all()))
