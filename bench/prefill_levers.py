"""Which long-prefill levers pay on this GPU: each one alone, then the whole 128K prefill with each setting, in one
process.

    python bench/prefill_levers.py --out bench/results/h200/prefill_levers.json

1. One KDA segment of the 0.6B shape, 16K tokens (from the conv output [q | k | v] to fla's chunk_kda output): fla's
   chunks of 64 tokens (gendistill's choice) against 32.
2. TTFT and peak memory at 128K (no cache, last-token logits, as `gendistill bench`): the teacher; the student as it
   is; with segment and MLP-slice outputs copied into the whole output instead of written there by their GEMM.
Levers of earlier runs (their files keep the figures): the Triton head split and SwiGLU (runs 11-12, kept); a
torch.compile'd split (run 9), pinned value blocks in fla's scan (run 10), the conv folded into the split and a side
stream for the next segment's inputs (run 11), the chunk-state scan split into pieces scanned in parallel, fla's
intra-card backend and our own with fla's scan kernel (runs 13-14: no faster at the model level; the scan is bound
by the bytes it moves), 32K segments (run 14: no faster, 0.6 GiB more at its peak), the MLP's residual added in the
down projection's GEMM (run 15: 1341 against 1335 ms; PyTorch copies the residual into the output first), all
dropped.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import environment, print_table, write_result  # noqa: E402
from gendistill.bench import (build_shape, peak_since, random_ids, relative_error, release_memory,  # noqa: E402
                              start_peak, timed, weight_bytes)
import gendistill.fused as fused  # noqa: E402
import gendistill.kda as kda  # noqa: E402
import gendistill.modeling as modeling  # noqa: E402
from gendistill.kda import kda_heads_fused, use_backend  # noqa: E402

HEADS, KV_HEADS, DIM = 16, 8, 128
DEVICE = torch.device("cuda")
GiB = 2**30


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


def kda_segment(qkv, f, b, A_log, dt_bias, chunk_size=64):
    """What the KDA mixer runs on one segment from the conv output on (`kda_gated`'s fla call, with `chunk_size`)."""
    q, k, v = kda_heads_fused(qkv, HEADS, KV_HEADS, DIM, True)
    return kda._fla_ops()[0](q, k, v, f, b, A_log=A_log, dt_bias=dt_bias, output_final_state=True,
                             use_qk_l2norm_in_kernel=False, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True,
                             chunk_size=chunk_size)


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
        first = None
        for chunk_size in (64, 32):
            out = kda_segment(*inputs, chunk_size=chunk_size)
            first = out if first is None else first
            add("KDA segment 1x16K", f"fla chunks of {chunk_size}",
                device_ms(lambda: kda_segment(*inputs, chunk_size=chunk_size), repeats=10),
                rel_err_o=relative_error(out[0], first[0]), rel_err_state=relative_error(out[1], first[1]))
        inputs = out = first = None
        release_memory(DEVICE)

        teacher, student = (m.to(device="cuda", dtype=torch.bfloat16).eval() for m in build_shape("qwen3-0.6b", 0))
        ids = random_ids(teacher, 1, args.context, seed=0)
        name = f"TTFT {args.context // 1024}K"

        def measure(model, variant, first=None):
            prefill = lambda: model(ids, use_cache=False, logits_to_keep=1).logits
            logits = prefill().float()
            ms = device_ms(prefill, repeats=args.repeats, warmup=1)
            baseline = start_peak(DEVICE)
            prefill()
            peak = peak_since(DEVICE, baseline, weight_bytes(model)) / GiB
            release_memory(DEVICE)
            extra = {} if first is None else {"rel_err_vs_first": relative_error(logits, first)}
            add(name, variant, ms, peak_GiB=round(peak, 3), **extra)
            return logits

        measure(teacher, "teacher")
        teacher.cpu()
        release_memory(DEVICE)
        first = measure(student, "student (all levers)")
        linear_into = fused.linear_into

        def copied(x, weight, out=None):
            y = linear_into(x, weight)
            return y if out is None else out.copy_(y)

        fused.linear_into = modeling.linear_into = copied
        measure(student, "student, slices copied into the output", first)
        fused.linear_into = modeling.linear_into = linear_into
    print_table(rows, ["lever", "variant", "ms", "peak_GiB"])
    write_result(args.out, {"benchmark": "bench/prefill_levers.py", **environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
