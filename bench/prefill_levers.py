"""Which long-prefill levers pay on this GPU: each one alone, then the whole 128K prefill with them added one by one.

    python bench/prefill_levers.py --out bench/results/h200/prefill_levers.json

1. One 16K segment of a KDA layer of the 0.6B shape, from the conv output ([q | k | v]) to fla's chunk_kda output:
   the PyTorch split (fla then copies the strided q and L2-normalises q and k in passes of its own) against
   `kda_heads_fused`, the Triton split that hands fla q and k normalised.
2. SwiGLU on [16384, 3072]: eager SiLU(gate) * up against the Triton pass (`gendistill.fused.swiglu`).
3. TTFT at 128K (no cache, last-token logits, as `gendistill bench`): the teacher; the student as of run 9 (PyTorch
   split, eager SwiGLU), then with the Triton split, then with the Triton SwiGLU too (the code as it is).
Levers tried and dropped (their runs' files keep the figures): pinning the value blocks of fla's chunk-state kernel
(run 10, commit 4e8bf0d: no gain at 1 x 16K, 17 % slower at 8 x 4K); the short conv folded into the Triton split and
the next segment's inputs on a side stream (run 11, commit 2d1a0a1: the folded conv pass took 45 ms against 34 for
fla's conv plus the split; the side stream gained nothing).
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
from gendistill.bench import build_shape, random_ids, relative_error, timed  # noqa: E402
from gendistill.kda import kda_gated, kda_heads, kda_heads_fused, use_backend  # noqa: E402

HEADS, KV_HEADS, DIM = 16, 8, 128
DEVICE = torch.device("cuda")


def device_ms(fn, repeats: int, warmup: int = 2) -> float:
    """Median CUDA-event time of fn() in ms (`gendistill bench`'s timer), after `warmup` calls (autotuning)."""
    for _ in range(warmup):
        fn()
    return 1e3 * statistics.median(timed(fn, DEVICE)[1] for _ in range(repeats))


def segment_inputs(tokens: int, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, device="cuda", generator=gen, dtype=torch.bfloat16)
    qkv = rand(1, tokens, (HEADS + 2 * KV_HEADS) * DIM)
    f, b = rand(1, tokens, HEADS, DIM), rand(1, tokens, HEADS)
    A_log = torch.rand(HEADS, device="cuda", generator=gen).log()
    return qkv, f, b, A_log, torch.randn(HEADS * DIM, device="cuda", generator=gen)


def kda_segment(triton_split: bool, qkv, f, b, A_log, dt_bias):
    q, k, v = (kda_heads_fused if triton_split else kda_heads)(qkv, HEADS, KV_HEADS, DIM, triton_split)
    return kda_gated(q, k, v, f, b, A_log, dt_bias, qk_normalized=triton_split)[0]


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
        reference = kda_segment(False, *inputs)
        for triton_split in (False, True):
            error = relative_error(kda_segment(triton_split, *inputs), reference)
            add("KDA segment 1x16K", "Triton split" if triton_split else "PyTorch split",
                device_ms(lambda: kda_segment(triton_split, *inputs), repeats=20), rel_err_vs_first=error)
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
        real = modeling.resolve_backend, fused.swiglu
        levers = [("student as of run 9", 0), ("+ Triton split", 1), ("+ Triton SwiGLU (all levers)", 2)]
        first = None
        for variant, on in levers:
            # off: the mixer doesn't see the fla path for its split (fla normalises q/k), eager SwiGLU
            modeling.resolve_backend = real[0] if on >= 1 else (lambda x, n: "split in PyTorch")
            fused.swiglu = real[1] if on >= 2 else (lambda g, u: F.silu(g) * u)
            logits = prefill(student).float()
            first = logits if first is None else first
            add(name, variant, device_ms(lambda: prefill(student), repeats=args.repeats, warmup=1),
                rel_err_vs_first=relative_error(logits, first))
        modeling.resolve_backend, fused.swiglu = real
    print_table(rows, ["lever", "variant", "ms"])
    write_result(args.out, {"benchmark": "bench/prefill_levers.py", **environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
