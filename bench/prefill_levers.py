"""Which long-prefill levers pay on this GPU: each one alone, then the whole 128K prefill with them added one by one.

    python bench/prefill_levers.py --out bench/results/h200/prefill_levers.json

1. One 16K segment of a KDA layer of the 0.6B shape, from the [q | k | v] projection (before the short conv) to
   fla's chunk_kda output: fla's conv, the PyTorch split (fla then copies the strided q and L2-normalises q and k in
   passes of its own); fla's conv and `kda_heads_fused`, the Triton split that hands fla q and k normalised; the
   Triton pass with the conv folded in.
2. SwiGLU on [16384, 3072]: eager SiLU(gate) * up against the Triton pass (`gendistill.fused.swiglu`).
3. TTFT at 128K (no cache, last-token logits, as `gendistill bench`): the teacher; the student as of run 9 (fla's
   conv, PyTorch split, segments in order, eager SwiGLU), then with the Triton conv + split, with the next segment's
   inputs on a side stream, with the Triton SwiGLU (all levers: the code as it is).
(Run 10 of this script, at commit 4e8bf0d, also pinned the value blocks of fla's chunk-state kernel to 32 or 64: no
gain at batch 1 x 16K, 17 % slower at 8 x 4K; that knob is gone.)
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gendistill.fused as fused  # noqa: E402
import gendistill.modeling as modeling  # noqa: E402
from bench.common import environment, print_table, write_result  # noqa: E402
from gendistill.bench import build_shape, random_ids, relative_error  # noqa: E402
from gendistill.kda import Conv, kda_gated, kda_heads, kda_heads_fused, short_conv, use_backend  # noqa: E402

HEADS, KV_HEADS, DIM, WIDTH = 16, 8, 128, 4


def device_ms(fn, repeats: int, warmup: int = 2) -> float:
    """Median CUDA-event time of fn() in ms, after `warmup` calls (autotuning)."""
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


def segment_inputs(tokens: int, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, device="cuda", generator=gen, dtype=torch.bfloat16)
    C = (HEADS + 2 * KV_HEADS) * DIM
    x, weight, context = rand(1, tokens, C), rand(C, 1, WIDTH) / 2, rand(1, C, WIDTH - 1)
    f, b = rand(1, tokens, HEADS, DIM), rand(1, tokens, HEADS)
    A_log = torch.rand(HEADS, device="cuda", generator=gen).log()
    return x, weight, context, f, b, A_log, torch.randn(HEADS * DIM, device="cuda", generator=gen)


def kda_segment(variant: str, x, weight, context, f, b, A_log, dt_bias):
    if variant == "Triton conv + split":
        q, k, v = kda_heads_fused(x, HEADS, KV_HEADS, DIM, True, Conv(weight, None, context, "identity"))
    else:
        y, _ = short_conv(x, weight, None, context)
        triton_split = variant == "fla conv, Triton split"
        q, k, v = (kda_heads_fused if triton_split else kda_heads)(y, HEADS, KV_HEADS, DIM, triton_split)
    return kda_gated(q, k, v, f, b, A_log, dt_bias, qk_normalized=variant != "fla conv, PyTorch split")[0]


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
        print(f"{lever:>22}  {variant:<44} {ms:9.3f} ms  {extra or ''}", flush=True)

    with torch.no_grad(), use_backend("fla"):
        inputs = segment_inputs(16384)
        variants = ("fla conv, PyTorch split", "fla conv, Triton split", "Triton conv + split")
        reference = kda_segment(variants[0], *inputs)
        for variant in variants:
            error = relative_error(kda_segment(variant, *inputs), reference)
            add("KDA segment 1x16K", variant, device_ms(lambda: kda_segment(variant, *inputs), repeats=20),
                rel_err_vs_first=error)
        gate, up = (torch.randn(16384, 3072, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        eager = F.silu(gate) * up
        add("SwiGLU 16Kx3072", "eager", device_ms(lambda: F.silu(gate) * up, repeats=20))
        add("SwiGLU 16Kx3072", "Triton", device_ms(lambda: fused.swiglu(gate, up), repeats=20),
            rel_err_vs_eager=relative_error(fused.swiglu(gate, up), eager))
        del inputs, reference, gate, up, eager

        teacher, student = (m.to(device="cuda", dtype=torch.bfloat16).eval() for m in build_shape("qwen3-0.6b", 0))
        ids = random_ids(teacher, 1, args.context, seed=0)
        prefill = lambda model: model(ids, use_cache=False, logits_to_keep=1).logits
        name = f"TTFT {args.context // 1024}K"
        add(name, "teacher", device_ms(lambda: prefill(teacher), repeats=args.repeats, warmup=1))
        teacher.cpu()
        torch.cuda.empty_cache()
        real = modeling.resolve_backend, modeling._side_stream, fused.swiglu
        levers = [("student as of run 9", 0), ("+ Triton conv + split", 1), ("+ next segment on a side stream", 2),
                  ("+ Triton SwiGLU (all levers)", 3)]
        first = None
        for variant, on in levers:
            # off: the mixer doesn't see the fla path for its split (fla convolves and normalises), no side stream,
            # eager SwiGLU
            modeling.resolve_backend = real[0] if on >= 1 else (lambda x, n: "split in PyTorch")
            modeling._side_stream = real[1] if on >= 2 else (lambda x: None)
            fused.swiglu = real[2] if on >= 3 else (lambda g, u: F.silu(g) * u)
            logits = prefill(student).float()
            first = logits if first is None else first
            add(name, variant, device_ms(lambda: prefill(student), repeats=args.repeats, warmup=1),
                rel_err_vs_first=relative_error(logits, first))
        modeling.resolve_backend, modeling._side_stream, fused.swiglu = real
    print_table(rows, ["lever", "variant", "ms"])
    write_result(args.out, {"benchmark": "bench/prefill_levers.py", **environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
