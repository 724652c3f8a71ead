"""Which long-prefill levers pay on this GPU: each one alone, then the whole 128K prefill with them.

    python bench/prefill_levers.py --out bench/results/h200/prefill_levers.json

1. KDA's inputs for one 16K segment of the 0.6B shape (qkv [1, 16384, 4096] after the short conv, through fla's
   chunk_kda): the PyTorch split (fla then copies the strided q and L2-normalises q and k in passes of its own)
   against `kda_heads_fused`, one Triton pass that hands fla q and k already normalised.
2. fla's chunk-state kernel (`chunk_gated_delta_rule_fwd_kernel_h_blockdim64`) with its autotuner limited to value
   blocks of 32 or 64 (`kda.pin_state_block`): its key has neither T nor the batch, so the first shape decides; at
   batch 1 BV = 64 runs 2 x 16 blocks on 132 SMs. Timed as chunk_kda at 1 x 16K (the 128K prefill's segments) and
   at 8 x 4K (a training-like batch).
3. TTFT at 128K (no cache, last-token logits, as `gendistill bench`): the teacher, then the student with the PyTorch
   split, with the Triton split, and with the state kernel's BV pinned to each width.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gendistill.modeling as modeling  # noqa: E402
from bench.common import environment, print_table, write_result  # noqa: E402
from gendistill.bench import build_shape, random_ids, relative_error  # noqa: E402
from gendistill.kda import kda_gated, kda_heads, kda_heads_fused, pin_state_block, use_backend  # noqa: E402


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


def kda_inputs(batch: int, tokens: int, heads=16, kv_heads=8, dim=128, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, device="cuda", generator=gen, dtype=torch.bfloat16)
    qkv = rand(batch, tokens, (heads + 2 * kv_heads) * dim)
    f, b = rand(batch, tokens, heads, dim), rand(batch, tokens, heads)
    A_log = torch.rand(heads, device="cuda", generator=gen).log()
    return qkv, f, b, A_log, torch.randn(heads * dim, device="cuda", generator=gen)


def kda_segment(qkv, f, b, A_log, dt_bias, prenormalized: bool, heads=16, kv_heads=8, dim=128):
    q, k, v = (kda_heads_fused if prenormalized else kda_heads)(qkv, heads, kv_heads, dim, prenormalized)
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

    with torch.no_grad(), use_backend("fla"):
        inputs = kda_inputs(1, 16384)
        reference = kda_segment(*inputs, prenormalized=False)
        error = relative_error(kda_segment(*inputs, prenormalized=True), reference)
        for prenormalized in (False, True):
            ms = device_ms(lambda: kda_segment(*inputs, prenormalized=prenormalized), repeats=20)
            add("KDA segment 1x16K", "Triton split, q/k normed" if prenormalized else "PyTorch split", ms,
                rel_err_vs_pytorch_split=error if prenormalized else 0.0)
        for batch, tokens in ((1, 16384), (8, 4096)):
            inputs = kda_inputs(batch, tokens)
            for block_v in (None, 32, 64):
                pin_state_block(block_v)
                ms = device_ms(lambda: kda_segment(*inputs, prenormalized=True), repeats=20)
                add(f"chunk_kda {batch}x{tokens // 1024}K, state kernel", "autotuned" if block_v is None
                    else f"BV={block_v}", ms)
        pin_state_block(None)
        del inputs, reference

        teacher, student = (m.to(device="cuda", dtype=torch.bfloat16).eval() for m in build_shape("qwen3-0.6b", 0))
        ids = random_ids(teacher, 1, args.context, seed=0)
        prefill = lambda model: model(ids, use_cache=False, logits_to_keep=1).logits
        name = f"TTFT {args.context // 1024}K"
        add(name, "teacher", device_ms(lambda: prefill(teacher), repeats=args.repeats, warmup=1))
        teacher.cpu()
        torch.cuda.empty_cache()
        real_backend = modeling.resolve_backend
        variants = [("student, PyTorch split", False, None), ("student, Triton split", True, None),
                    ("student, Triton split, BV=32", True, 32), ("student, Triton split, BV=64", True, 64)]
        first = None
        for variant, triton_split, block_v in variants:
            # the mixer takes the Triton split where it resolves the fla path; elsewhere fla normalises q/k itself
            modeling.resolve_backend = real_backend if triton_split else (lambda x, n: "split in PyTorch")
            pin_state_block(block_v)
            logits = prefill(student).float()
            first = logits if first is None else first
            add(name, variant, device_ms(lambda: prefill(student), repeats=args.repeats, warmup=1),
                rel_err_vs_first=relative_error(logits, first))
        modeling.resolve_backend = real_backend
        pin_state_block(None)
    print_table(rows, ["lever", "variant", "ms"])
    write_result(args.out, {"benchmark": "bench/prefill_levers.py", **environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
