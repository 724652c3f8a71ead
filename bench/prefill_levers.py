"""Which long-prefill levers pay on this GPU: each one alone, then the whole 128K prefill with each setting, in one
process.

    python bench/prefill_levers.py --out bench/results/h200/prefill_levers.json

1. One KDA segment of the 0.6B shape (from the conv output [q | k | v] to fla's chunk_kda output), 16K and 32K
   tokens: fla's chunk-state scan in one piece against 2, 4 and 8 pieces scanned in parallel (kda/split_scan.py).
2. TTFT and peak memory at 128K (no cache, last-token logits, as `gendistill bench`): the teacher; the student with
   the scan in 1, 2, 4 and 8 pieces, KDA segments of 16K and 32K tokens (`kda_prefill_chunk`).
Levers of earlier runs (their files keep the figures): the Triton head split and SwiGLU (runs 11-12, kept); a
torch.compile'd split (run 9), pinned value blocks in fla's scan (run 10), the conv folded into the split and a side
stream for the next segment's inputs (run 11), fla's own intra-card split of the scan (run 13: its pre-scan kernel
alone took 158 ms at 128K, against 75 ms for the whole single scan), all dropped.
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
import gendistill.kda as kda  # noqa: E402
from gendistill.kda import kda_gated, kda_heads_fused, use_backend  # noqa: E402
from gendistill.modeling import KDAMixer  # noqa: E402

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


def kda_segment(qkv, f, b, A_log, dt_bias):
    q, k, v = kda_heads_fused(qkv, HEADS, KV_HEADS, DIM, True)
    return kda_gated(q, k, v, f, b, A_log, dt_bias, qk_normalized=True, output_final_state=True)


def set_segments(model, tokens: int) -> None:
    model.config.kda_prefill_chunk = tokens  # FusedMLP reads the config
    for m in model.modules():
        if isinstance(m, KDAMixer):
            m.prefill_chunk = tokens


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
        for tokens in (16384, 32768):
            inputs = segment_inputs(tokens)
            name = f"KDA segment 1x{tokens // 1024}K"
            first = None
            for count in (1, 2, 4, 8):
                kda.SPLIT_SCAN_PIECES = count
                out = kda_segment(*inputs)
                first = out if first is None else first
                add(name, f"scan in {count} piece{'s' if count > 1 else ''}",
                    device_ms(lambda: kda_segment(*inputs), repeats=10),
                    rel_err_o=relative_error(out[0], first[0]), rel_err_state=relative_error(out[1], first[1]))
            del inputs, out, first
        kda.SPLIT_SCAN_PIECES = None
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
        first = None
        for tokens, count in [(16384, 1), (16384, 2), (16384, 4), (16384, 8), (32768, 4), (32768, 8), (16384, None)]:
            set_segments(student, tokens)
            kda.SPLIT_SCAN_PIECES = count
            variant = (f"student, KDA segments {tokens // 1024}K, scan in "
                       f"{'the default' if count is None else count} piece{'s' if count != 1 else ''}")
            logits = measure(student, variant, first)
            first = logits if first is None else first
        kda.SPLIT_SCAN_PIECES = None
    print_table(rows, ["lever", "variant", "ms", "peak_GiB"])
    write_result(args.out, {"benchmark": "bench/prefill_levers.py", **environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
