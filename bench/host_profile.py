"""Where the host's time goes in a short eager prefill, where the GPU waits on Python (the 4K TTFT target).

    python bench/host_profile.py --context 4096 --out bench/results/h200/host_profile.json     (bench/gpu.sh host)

Per model (teacher; student; the student with Triton's own launcher and fla's wrappers, kernels.launch): the
prefill's TTFT (CUDA events, as `gendistill bench`), the host's time to issue it (perf_counter, no synchronisation:
when it is close to the TTFT the GPU waits on the host), and a cProfile of it: host ms per forward by package (where
the Python frames live) and the functions with the most time of their own. Then the host cost of each call a KDA
layer makes, one op at a time (mean issue time over repeated calls on the layer's own 4K shapes, and its device time
beside it), and the same for a batch-1 decode step at 32K.
gendistill sets FLA_DISABLE_BACKEND_DISPATCH=1 unless it is set (read when fla is imported): run it with
FLA_DISABLE_BACKEND_DISPATCH=0 too to see what fla's backend dispatch costs.
"""
from __future__ import annotations

import argparse
import cProfile
import contextlib
import os
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import environment, print_table, write_result  # noqa: E402
from gendistill.bench.measure import random_ids, synthetic_cache, timed  # noqa: E402
from gendistill.testing import random_teacher_and_student  # noqa: E402
from gendistill import kda, kernels  # noqa: E402
from gendistill.kernels import heads, hybrid  # noqa: E402
from gendistill.kernels.segments import FlaKernels, FlaStages  # noqa: E402

DEVICE = torch.device("cuda")
PACKAGES = ("fla", "triton", "transformers", "gendistill", "torch")


def package(filename: str) -> str:
    parts = Path(filename).parts
    for name in PACKAGES:  # the innermost package directory on the path
        if name in parts:
            return name
    return "builtins/C" if filename.startswith("~") or filename.startswith("<") else "other"


def profile_forward(fn, calls: int) -> dict:
    """cProfile of `calls` calls of fn: own time per call by package, and the top functions."""
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats
    by_package, top = defaultdict(float), []
    for (filename, line, name), (_, ncalls, tottime, _, _) in stats.items():
        by_package[package(filename)] += tottime
        top.append({"function": f"{Path(filename).name}:{line}({name})", "package": package(filename),
                    "calls_per_forward": ncalls / calls, "own_ms_per_forward": 1e3 * tottime / calls})
    top.sort(key=lambda r: -r["own_ms_per_forward"])
    return {"own_ms_by_package": {k: round(1e3 * v / calls, 3) for k, v in sorted(by_package.items(),
                                                                                 key=lambda kv: -kv[1])},
            "top_functions": top[:30]}


def host_and_device_ms(fn, repeats: int) -> tuple[float, float]:
    """(host issue time, CUDA-event time) of one call, medians."""
    host, device = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        host.append(time.perf_counter() - start)
        device.append(timed(fn, DEVICE)[1])
    return 1e3 * statistics.median(host), 1e3 * statistics.median(device)


def per_call_host_us(fn, calls: int = 50) -> tuple[float, float]:
    """Mean host issue time of one call over `calls` back-to-back calls, and the device time per call."""
    fn()
    torch.cuda.synchronize()
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start_event.record()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    end_event.record()
    torch.cuda.synchronize()
    return 1e6 * host / calls, 1e3 * start_event.elapsed_time(end_event) / calls


def kda_layer_ops(student, ids) -> list[dict]:
    """Each call one KDA layer makes on a 4K prefill, alone."""
    mixer = next(m for m in student.modules() if isinstance(m, hybrid.FusedKDAMixer))
    x = student.model.embed_tokens(ids)
    params = mixer._merged_params()
    kda_in, gate_low, _, _ = mixer._inputs(x, None, None, None, params, True, False)
    q, k, v, f, b = kda_in
    stages, kernels = FlaStages(mixer.A_log, mixer.dt_bias), FlaKernels(mixer.A_log, mixer.dt_bias)
    prepared = stages.prepare(q, k, v, f, b)
    scanned, _ = stages.scan(prepared, None)
    o = stages.output(scanned)
    prepared_k = kernels.prepare(q, k, v, f, b)
    scanned_k, _ = kernels.scan(prepared_k, None)
    fla_chunk = kda._fla_ops()[0]
    qkv = F.linear(x, params[0])
    conv = heads.Conv(params[1], params[2], None, mixer.conv_activation)
    B, T = x.shape[:2]
    o4 = o.reshape(B, T, -1, mixer.head_dim)
    norm = student.model.layers[1].post_attention_layernorm
    ops = {
        "merged weights (4 torch.cat)": mixer._merged_params,
        "F.linear [q|k|v]": lambda: F.linear(x, params[0]),
        "kda_heads_fused with the conv (Triton)": lambda: heads.kda_heads_fused(qkv, mixer.num_heads,
                                                                             mixer.num_kv_heads, mixer.head_dim,
                                                                             True, conv),
        "next_conv_context": lambda: kda.next_conv_context(None, qkv, 4),
        "F.linear [f_a|g_a|b]": lambda: F.linear(x, params[3]),
        "f_b_proj": lambda: mixer.f_b_proj(gate_low),
        "fla chunk_kda (whole, autograd wrapper)": lambda: fla_chunk(
            q, k, v, f, b, A_log=mixer.A_log, dt_bias=mixer.dt_bias, use_qk_l2norm_in_kernel=False,
            use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, output_final_state=True),
        "FlaStages.prepare": lambda: stages.prepare(q, k, v, f, b),
        "  kda_gate_chunk_cumsum": lambda: stages.gate_cumsum(g=f, A_log=mixer.A_log, dt_bias=mixer.dt_bias,
                                                              scale=stages.rcp_ln2, chunk_size=64),
        "  chunk_kda_fwd_intra": lambda: stages.intra(q=q, k=k, v=v, gk=prepared[1], beta=b.float().sigmoid(),
                                                      scale=0.088, chunk_size=64),
        "FlaStages.scan": lambda: stages.scan(prepared, None),
        "FlaStages.output": lambda: stages.output(scanned),
        "FlaKernels.prepare (kernels.launch)": lambda: kernels.prepare(q, k, v, f, b),
        "FlaKernels.scan": lambda: kernels.scan(prepared_k, None),
        "FlaKernels.output": lambda: kernels.output(scanned_k),
        "gated_rms_norm (kernels.norm)": lambda: hybrid.gated_output_norm(o4, o4, mixer.o_norm.weight, 1e-6),
        "fla's rms_norm_gated (before)": lambda: kda._fla_norm()(x=o4, g=o4, weight=mixer.o_norm.weight, bias=None,
                                                                 activation="sigmoid", eps=1e-6),
        "RMSNorm with the residual (kernels.norm)": lambda: norm.add_and_norm(x, x),
        "RMSNorm with the residual (gendistill.norm, Triton's launcher)": lambda: with_triton_launcher(
            lambda: norm.add_and_norm(x, x)),
        "RMSNorm with the residual (transformers)": lambda: (lambda h: (h, Qwen3RMSNorm.forward(norm, h)))(x + x),
        "o_proj": lambda: mixer.o_proj(o.reshape(B, T, -1)),
        "whole KDAMixer": lambda: mixer(x),
        "whole decoder layer (KDA)": lambda: student.model.layers[1](x, position_embeddings=None),
    }
    rows = []
    for name, fn in ops.items():
        host_us, device_us = per_call_host_us(fn)
        rows.append({"op": name, "host_us": host_us, "device_us": device_us})
        print(f"{name:>42}  host {host_us:8.1f} us  device {device_us:8.1f} us", flush=True)
    return rows


def with_triton_launcher(fn):
    with kernels.use(direct_launch=False):
        return fn()


def decode_profile(name: str, model, context: int, steps: int) -> dict:
    """Greedy decode steps at batch 1 from a StaticCache of `context` tokens (as `gendistill bench` decodes): ms per
    step by CUDA events and by the host's issue time, then a cProfile of as many steps."""
    cache = synthetic_cache(model, 1, context, max_len=context + 4 * steps + 8)
    token = random_ids(model, 1, 1, seed=0)

    def step():
        token.copy_(model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1))

    for _ in range(steps):  # warm-up
        step()
    hosts, devices = zip(*(host_and_device_ms(step, 1) for _ in range(steps)))
    row = {"model": name, "context": context, "ms_per_step": statistics.median(devices),
           "host_issue_ms": statistics.median(hosts)}
    print(f"decode {name:>10} at {context}: {row['ms_per_step']:7.2f} ms/step, host issue {row['host_issue_ms']:7.2f} ms",
          flush=True)
    row["profile"] = profile_forward(step, calls=steps)
    print(row["profile"]["own_ms_by_package"], flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", default=4096, type=int)
    p.add_argument("--repeats", default=15, type=int)
    p.add_argument("--decode-context", default=32768, type=int, help="batch-1 decode from this context (0: none)")
    p.add_argument("--out", default="bench/results/host_profile.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA and flash-linear-attention", file=sys.stderr)
        return 2
    rows, profiles = [], {}
    with torch.no_grad():
        pair = random_teacher_and_student("qwen3-0.6b", 0)
        teacher, student = (m.to(device="cuda", dtype=torch.bfloat16).eval() for m in pair)
        ids = random_ids(teacher, 1, args.context, seed=0)
        variants = {
            "teacher": (teacher, contextlib.nullcontext),
            "student": (student, contextlib.nullcontext),
            "student, Triton's launcher and fla's wrappers (before)": (student, lambda: kernels.use(direct_launch=False)),
        }
        for model, regime in variants.values():  # autotuning, allocator
            with regime():
                for _ in range(3):
                    model(ids, use_cache=False, logits_to_keep=1)
        times = {name: ([], []) for name in variants}
        for _ in range(args.repeats):  # interleaved: the host's drift hits every variant alike
            for name, (model, regime) in variants.items():
                with regime():
                    host_ms, ttft_ms = host_and_device_ms(lambda: model(ids, use_cache=False, logits_to_keep=1), 1)
                times[name][0].append(host_ms)
                times[name][1].append(ttft_ms)
        for name, (model, regime) in variants.items():
            host, ttft = (statistics.median(t) for t in times[name])
            rows.append({"model": name, "ttft_ms": ttft, "host_issue_ms": host, "ttft_ms_all": times[name][1]})
            print(f"{name:>62}  TTFT {ttft:8.2f} ms  host issue {host:8.2f} ms", flush=True)
            with regime():
                profiles[name] = profile_forward(lambda: model(ids, use_cache=False, logits_to_keep=1), calls=5)
            print(profiles[name]["own_ms_by_package"], flush=True)
        ops = kda_layer_ops(student, ids)
        decode = [decode_profile(name, model, args.decode_context, steps=16)
                  for name, model in (("teacher", teacher), ("student", student))] if args.decode_context else []
    print_table(rows, ["model", "ttft_ms", "host_issue_ms"])
    for row in decode:
        print(f"== decode {row['model']}: own host ms per step by package {row['profile']['own_ms_by_package']}")
        print_table(row["profile"]["top_functions"][:25], ["function", "calls_per_forward", "own_ms_per_forward"])
    for name, prof in profiles.items():
        print(f"== {name}: own host ms per forward by package {prof['own_ms_by_package']}")
        print_table(prof["top_functions"][:20], ["function", "calls_per_forward", "own_ms_per_forward"])
    write_result(args.out, {"benchmark": "bench/host_profile.py", **environment(), "context": args.context,
                            "FLA_DISABLE_BACKEND_DISPATCH": os.environ.get("FLA_DISABLE_BACKEND_DISPATCH"),
                            "prefill": rows, "profiles": profiles, "kda_layer_ops": ops, "decode": decode})
    return 0


if __name__ == "__main__":
    sys.exit(main())
