"""Which long-prefill levers pay on this GPU: each one alone, then the whole 128K prefill with them added one by one.

    python bench/prefill_levers.py --out bench/results/h200/prefill_levers.json

1. KDA's inputs for one 16K segment of the 0.6B shape (qkv [1, 16384, 4096] after the short conv, through fla's
   chunk_kda): the eager split (fla copies the strided q and norms q and k in its own passes) against the
   torch.compile'd `kda_heads` that hands fla q and k already normalised.
2. SwiGLU on [16384, 3072]: eager SiLU(gate) * up against compiled.
3. fla's `chunk_gated_delta_rule_fwd_kernel_h_blockdim64` with its autotuner limited to BV = 32 or 64: its key has
   neither T nor the batch, so whichever shape comes first decides; at batch 1 BV = 64 runs 2 x 16 blocks on 132 SMs.
   Timed as chunk_kda at 1 x 16K (the 128K prefill's segments) and at 8 x 4K (a training-like batch).
4. TTFT at 128K (no cache, last-token logits, as `gendistill bench`): the teacher, then the student before the two
   compiled passes, with each, and with kernel_h's BV pinned.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gendistill.fused as fused  # noqa: E402
import gendistill.modeling as modeling  # noqa: E402
from bench.common import environment, print_table, write_result  # noqa: E402
from gendistill.bench import build_shape, random_ids, relative_error  # noqa: E402
from gendistill.kda import compiled, kda_gated, kda_heads, use_backend  # noqa: E402


def device_ms(fn, repeats: int, warmup: int = 2) -> float:
    """Median CUDA-event time of fn() in ms, after `warmup` calls (autotuning, compilation)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_h():
    from fla.ops.common import chunk_delta_h
    return chunk_delta_h.chunk_gated_delta_rule_fwd_kernel_h_blockdim64


def pin_bv(kernel, configs, bv: int | None) -> None:
    """Limit the autotuner to configs with this BV (None: all of them) and forget its earlier choices."""
    kernel.configs = [c for c in configs if bv is None or c.kwargs.get("BV") == bv]
    kernel.cache.clear()


def kda_inputs(batch: int, tokens: int, heads=16, kv_heads=8, dim=128, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, device="cuda", generator=gen, dtype=torch.bfloat16)
    qkv = rand(batch, tokens, (heads + 2 * kv_heads) * dim)
    f, b = rand(batch, tokens, heads, dim), rand(batch, tokens, heads)
    A_log = torch.rand(heads, device="cuda", generator=gen).log()
    return qkv, f, b, A_log, torch.randn(heads * dim, device="cuda", generator=gen)


def kda_segment(qkv, f, b, A_log, dt_bias, prenormalized: bool, heads=16, kv_heads=8, dim=128):
    split = compiled(kda_heads, qkv) if prenormalized else kda_heads
    q, k, v = split(qkv, heads, kv_heads, dim, prenormalized)
    return kda_gated(q, k, v, f, b, A_log, dt_bias, qk_normalized=prenormalized)[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", default=131072, type=int)
    p.add_argument("--repeats", default=3, type=int)
    p.add_argument("--out", default="bench/results/prefill_levers.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA and flash-linear-attention", file=sys.stderr)
        return 2
    rows = []

    def add(lever, variant, ms, **extra):
        rows.append({"lever": lever, "variant": variant, "ms": ms, **extra})
        print(f"{lever:>34}  {variant:<28} {ms:9.3f} ms  {extra or ''}", flush=True)

    kern = kernel_h()
    all_configs = list(kern.configs)
    with torch.no_grad(), use_backend("fla"):
        inputs = kda_inputs(1, 16384)
        reference = kda_segment(*inputs, prenormalized=False)
        error = relative_error(kda_segment(*inputs, prenormalized=True).float(), reference.float())
        for prenormalized in (False, True):
            ms = device_ms(lambda: kda_segment(*inputs, prenormalized=prenormalized), repeats=20)
            add("KDA segment 1x16K", "compiled split, q/k normed" if prenormalized else "eager split", ms,
                rel_err_vs_eager=error if prenormalized else 0.0)
        gate, up = (torch.randn(16384, 3072, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        eager = fused.swiglu(gate, up)
        error = relative_error(compiled(fused.swiglu, gate)(gate, up).float(), eager.float())
        add("SwiGLU 16Kx3072", "eager", device_ms(lambda: fused.swiglu(gate, up), repeats=20))
        add("SwiGLU 16Kx3072", "compiled", device_ms(lambda: compiled(fused.swiglu, gate)(gate, up), repeats=20),
            rel_err_vs_eager=error)
        for batch, tokens in ((1, 16384), (8, 4096)):
            inputs = kda_inputs(batch, tokens)
            for bv in (None, 32, 64):
                pin_bv(kern, all_configs, bv)
                ms = device_ms(lambda: kda_segment(*inputs, prenormalized=True), repeats=20)
                add(f"kernel_h BV, chunk_kda {batch}x{tokens // 1024}K", "autotuned" if bv is None else f"BV={bv}",
                    ms, chosen=str(kern.best_config) if hasattr(kern, "best_config") else None)
        pin_bv(kern, all_configs, None)
        del inputs, reference, gate, up, eager

        teacher, student = (m.to(device="cuda", dtype=torch.bfloat16).eval() for m in build_shape("qwen3-0.6b", 0))
        ids = random_ids(teacher, 1, args.context, seed=0)
        prefill = lambda model: model(ids, use_cache=False, logits_to_keep=1).logits
        name = f"TTFT {args.context // 1024}K"
        add(name, "teacher", device_ms(lambda: prefill(teacher), repeats=args.repeats, warmup=1))
        teacher.cpu()
        torch.cuda.empty_cache()
        real_fused_inference, real_compiled = modeling.fused_inference, fused.compiled
        variants = [("student, eager split+SwiGLU", False, False, None),
                    ("student, compiled split", True, False, None),
                    ("student, + compiled SwiGLU", True, True, None),
                    ("student, all, BV=32", True, True, 32),
                    ("student, all, BV=64", True, True, 64)]
        logits = {}
        for variant, split, swiglu, bv in variants:
            modeling.fused_inference = real_fused_inference if split else (lambda x: False)
            fused.compiled = real_compiled if swiglu else (lambda fn, x: fn)
            pin_bv(kern, all_configs, bv)
            logits[variant] = prefill(student).float()
            add(name, variant, device_ms(lambda: prefill(student), repeats=args.repeats, warmup=1),
                rel_err_vs_first=relative_error(logits[variant], logits[variants[0][0]]))
        modeling.fused_inference, fused.compiled = real_fused_inference, real_compiled
        pin_bv(kern, all_configs, None)
    print_table(rows, ["lever", "variant", "ms"])
    write_result(args.out, {"benchmark": "bench/prefill_levers.py", **environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
