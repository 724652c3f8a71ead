"""Which long-prefill levers pay on this GPU: each one alone, then the whole 128K prefill with each setting, in one
process.

    python bench/prefill_levers.py --out bench/results/h200/prefill_levers.json     (needs CUDA + fla)

TTFT and peak memory at 128K (no cache, last-token logits, as `gendistill bench`): the teacher; the student as it is
(the short conv folded into the Triton head split, `gendistill/kda/heads.py`; each KDA segment's state scan on a side
stream beside the next segment's prepare kernels, `gendistill/kda/segments.py`; segments of 24K tokens; gendistill's
one-launch RMSNorms, `gendistill/norm.py`; direct Triton launches, `gendistill/launch.py`); with fla's RMSNorm and
gated output norm (the path before); with Triton's own launcher and fla's wrappers (the path before); with fla's
conv kernel then the split (the path before); the KDA stages in order on one stream; fla's whole chunk_kda per segment
(the path before); segments of 16K (the default before) and 32K.
Levers measured before and dropped, with what each was worth: docs/PERF_LOG.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import environment, print_table, write_result  # noqa: E402
from gendistill.bench.checks import relative_error  # noqa: E402
from gendistill.bench.measure import (peak_since, random_ids, release_memory, start_peak, timed,  # noqa: E402
                                      weight_bytes)
from gendistill.testing import random_teacher_and_student  # noqa: E402
import gendistill.fused as fused  # noqa: E402
import gendistill.kda as kda  # noqa: E402
import gendistill.kda.segments as segments  # noqa: E402
import gendistill.launch as launch  # noqa: E402
import gendistill.modeling as modeling  # noqa: E402
from gendistill.kda import use_backend  # noqa: E402

DEVICE = torch.device("cuda")
GiB = 2**30


def device_ms(fn, repeats: int, warmup: int = 2) -> float:
    """Median CUDA-event time of fn() in ms (`gendistill bench`'s timer), after `warmup` calls (autotuning)."""
    for _ in range(warmup):
        fn()
    return 1e3 * statistics.median(timed(fn, DEVICE)[1] for _ in range(repeats))


def set_segment(model, tokens: int) -> None:
    """KDA segments and MLP slices of `tokens` tokens."""
    model.config.kda_prefill_chunk = tokens
    for mixer in model.modules():
        if isinstance(mixer, modeling.KDAMixer):
            mixer.prefill_chunk = tokens


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
        pair = random_teacher_and_student("qwen3-0.6b", 0)
        teacher, student = (m.to(device="cuda", dtype=torch.bfloat16).eval() for m in pair)
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
        from fla.modules.norm.layernorm import rms_norm as fla_rms_norm

        def fla_norm(x, weight, eps, residual=None):  # the path before: fla's RMSNorm, its residual form
            if residual is None:
                return fla_rms_norm(x, weight, None, eps=eps)
            return fla_rms_norm(x, weight, None, residual=residual, prenorm=True, eps=eps)

        def fla_gated_norm(x, weight, eps, gate, activation):
            return kda._fla_norm()(x=x, g=gate, weight=weight, bias=None, activation=activation, eps=eps)

        norm, gated_norm = fused.rms_norm, fused.norm.rms_norm
        fused.rms_norm, fused.norm.rms_norm = fla_norm, fla_gated_norm
        measure(student, "student, fla's RMSNorm and gated norm", first)
        fused.rms_norm, fused.norm.rms_norm = norm, gated_norm
        with launch.triton_launches():
            measure(student, "student, Triton's launcher and fla's wrappers", first)
        heads_fused = modeling.kda_heads_fused

        def conv_then_split(qkv, H, Hkv, D, normalize, conv=None):  # the path before: fla's conv kernel, then the split
            if conv is not None:
                qkv, _ = kda.short_conv(qkv, conv.weight, conv.bias, conv.context, conv.activation)
            return heads_fused(qkv, H, Hkv, D, normalize)

        modeling.kda_heads_fused = conv_then_split
        measure(student, "student, fla's conv then the split", first)
        modeling.kda_heads_fused = heads_fused
        side_stream, fla_stages = segments._side_stream, segments._fla_stages
        segments._side_stream = lambda device: None
        measure(student, "student, stages in order on one stream", first)
        segments._fla_stages = lambda: None
        measure(student, "student, fla's chunk_kda per segment", first)
        segments._side_stream, segments._fla_stages = side_stream, fla_stages
        for tokens in (16384, 32768):
            set_segment(student, tokens)
            measure(student, f"student, segments of {tokens // 1024}K", first)
        set_segment(student, modeling.HybridKDAConfig.kda_prefill_chunk)
    print_table(rows, ["lever", "variant", "ms", "peak_GiB"])
    write_result(args.out, {"benchmark": "bench/prefill_levers.py", **environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
