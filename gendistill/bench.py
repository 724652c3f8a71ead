"""`gendistill bench`: KV/state memory, time-to-first-token and decode speed of a teacher and its Hybrid-KDA student.

    gendistill bench --teacher DIR --student DIR --contexts 4k,16k,64k,128k [--decode-context 32k] [--out OUT]
    gendistill bench --shape qwen3-0.6b ...   (random weights, the real shape, no download; --shape tiny for CPU tests)

Order of work, and why:
1. Correctness first. On a short input, every KDA layer of the student must give the same output by the fast path
   (`fast_path`: fla on CUDA, the chunked PyTorch form elsewhere) as by the recurrent reference (uncached, in
   segments, cached + decode, left-padded batch), every fused module (gendistill.fused) the same as transformers',
   cached decoding must match the uncached forward on the logits (teacher and student), and with `--cuda-graphs`
   graph-replayed prefills (with `--decode-cache static` also decode steps) must match eager ones. If not, nothing is
   timed: the command exits 1 and writes only `correctness.json`. Tolerances and why they are per layer: see LAYER_RTOL.
2. Prefill per context, batch 1: TTFT to the first token's logits (`logits_to_keep=1`) without a cache (pure prefill,
   as the issue's reference numbers), with a `DynamicCache` being filled and (`--cuda-graphs`) replayed as a CUDA
   graph; peak device memory of each; the cache's bytes measured from its tensors beside `analytic_cache_bytes`.
3. Decode at `--decode-context` from a synthetic cache (random K/V and states of the exact shapes a prefill leaves:
   decode speed does not depend on their values), at batch 1, a few batches, and the largest batch that fits; a
   preallocated StaticCache by default (`--decode-cache dynamic`: transformers' DynamicCache, which copies all K/V
   at every step and so measures that copy as much as the models).
Method: same dtype and SDPA for both models, warm-up excluded, medians over repeats (prefills shorter than a second
are repeated until a second has been timed, at most 50 times: the host-bound ones vary with the host); CUDA events
with synchronisation on the GPU, perf_counter on CPU (CPU figures only make sense as ratios). Writes bench.json,
table.md and three PNGs.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, StaticCache
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin

import gendistill
from gendistill.fused import FUSED_CLASSES, FusedMLP, FusedRMSNorm
from gendistill.io import UserError, atomic_dir, atomic_write_json, atomic_write_text, check_output_dir
from gendistill.kda import fla_available, resolve_backend, use_backend
from gendistill.launch import triton_launches
from gendistill.modeling import KDAMixer

LINEAR = "linear_attention"
FUSED_TYPES = tuple(FUSED_CLASSES.values())
GiB, MiB = 2**30, 2**20

# Correctness. Why per layer and not on the logits: a random-weight model amplifies rounding ~20x from layer to layer
# (measured on the Qwen3-0.6B shape: 5e-3 relative noise on the KDA outputs gives 9.5e-2 on the logits, and the bf16
# model's chunk vs recurrent paths, which differ only in fp32 rounding before the bf16 cast, already differ by 5.2e-2),
# so a logits bound would either refuse a correct model or be too loose to catch a wrong one. Instead every KDA layer
# is run by the fast path and by the reference on the *same* input (captured from one forward), and the relative L2
# error ||fast - ref|| / ||ref|| of its output is bounded: 16-bit 5e-2 (fla computes in bf16 with fp32 accumulation,
# its own tests allow 5e-3 per op in fp16; bf16 has 3 fewer mantissa bits), fp32 5e-3 (fla's own fp32 bound: Triton
# uses TF32 for fp32 dots). A real bug (gate, state layout, lost conv or recurrent state, a wrong tail chunk) moves a
# layer's output by O(0.1-1). Override with --rtol. Whole-model cached decode vs uncached forward is checked on fp32
# copies with the pure-PyTorch reference path, where nothing amplifies beyond ~1e-5: bound 1e-3 on the logits.
LAYER_RTOL = {torch.float32: 5e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
DECODE_RTOL = 1e-3
# A prefill replayed as a CUDA graph is not bit-identical to the eager forward (decode steps are): the libraries pick
# other kernels under capture (the teacher's fp32 logits differ by 1.5e-6 on the H200) and fla's TF32 dots amplify that
# through 21 KDA layers (the student's by 2.0e-3). Bounded as one fp32 fast-path layer; stale or miswired replays are
# off by O(0.1-1).
GRAPH_PREFILL_RTOL = LAYER_RTOL[torch.float32]
DIRECT_LAUNCH_RTOL = 1e-6  # the same kernels on the same arguments: bit-identical expected
CHECK_PAD_TOKENS = 37  # left padding of one row in the padded-batch check
CHECK_TOKENS = 200  # > 64 so that fla's chunked prefill kernel runs (<= 64 tokens use its recurrent kernel), with a tail
CHECK_SEGMENT = 96  # prefill in segments 96 + 96 + 8: the state hand-off used beyond kda_prefill_chunk tokens
CHECK_DECODE_TOKENS = 4
# Largest decode batch: size it from the analytic bytes against free memory, then back off on OOM.
DECODE_MEMORY_FRACTION = 0.90  # of free memory; the rest absorbs allocator rounding and fragmentation
DECODE_RESERVE_BYTES = 2 * GiB  # cuBLAS/SDPA workspaces, the prefill leftovers the allocator keeps
BACKOFF = 0.85
TARGET_LONG, TARGET_SHORT = 131072, 4096  # 128K and 4K, where the issue sets its targets


class WrongModelError(RuntimeError):
    """The student's fast path (or a cached decode) disagrees with the reference: no speed may be reported."""

    def __init__(self, correctness: dict):
        failed = [c for c in correctness["checks"] if not c["passed"]]
        lines = [f"{c['name']}: relative error {c['rel_err']:.3g} > tolerance {c['rtol']:.3g}"
                 + (f" (worst: layer {c['worst_layer']})" if c.get("worst_layer") is not None else "") for c in failed]
        super().__init__("refusing to report speed for a model that disagrees with its reference:\n  "
                         + "\n  ".join(lines))
        self.correctness = correctness


# ---- cache bytes: analytic and measured --------------------------------------------------------------------------

def _dims(config) -> tuple[int, int, int]:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def _layer_types(config) -> list[str]:
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
    unknown = sorted(set(types) - {"full_attention", LINEAR})
    if unknown:
        raise UserError(f"the benchmark handles full and linear attention layers only, the model has {unknown}")
    return types


def analytic_cache_bytes(config, context: int, batch: int, dtype_bytes: int) -> int:
    """Bytes of the decoding cache after a prefill of `context` tokens. Attention layer: K and V, 2*Hkv*head_dim
    per token in the activation dtype. KDA layer, independent of context: the fp32 recurrent state H*head_dim^2*4 B
    and the short-conv state, (H + 2*Hkv)*head_dim channels (q at H heads, k/v at Hkv) * (conv_size - 1) steps."""
    heads, kv_heads, head_dim = _dims(config)
    total = 0
    for layer_type in _layer_types(config):
        if layer_type == LINEAR:
            conv_channels = (heads + 2 * kv_heads) * head_dim
            total += heads * head_dim * head_dim * 4 + conv_channels * (config.kda_conv_size - 1) * dtype_bytes
        else:
            total += 2 * kv_heads * head_dim * context * dtype_bytes
    return batch * total


def measured_cache_bytes(cache) -> int:
    """Bytes held by the cache's tensors: K/V of attention layers, conv and recurrent states of KDA layers."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            tensors = [*layer.conv_states.values(), *layer.recurrent_states.values()]
        else:
            tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def synthetic_cache(model, batch: int, context: int, max_len: int | None = None) -> Cache:
    """The cache a prefill of `context` tokens would leave, filled with random values through each layer's own
    update path (decode speed does not depend on the values; prefilling hundreds of 32K sequences would).
    `max_len`: a StaticCache preallocated to that many tokens (K/V written in place) instead of a DynamicCache
    (K/V concatenated, so copied, at every step)."""
    config = model.config
    dtype, device = model.dtype, model.device
    heads, kv_heads, head_dim = _dims(config)
    cache = DynamicCache(config=config) if max_len is None else StaticCache(config=config, max_cache_len=max_len)
    for layer, layer_type in zip(cache.layers, _layer_types(config)):
        if layer_type == LINEAR:
            width = config.kda_conv_size - 1
            layer.update_conv_state(torch.randn(batch, (heads + 2 * kv_heads) * head_dim, width, dtype=dtype,
                                                device=device), conv_kernel_size=width)
            layer.update_recurrent_state(0.1 * torch.randn(batch, heads, head_dim, head_dim, device=device))
        else:
            keys = torch.randn(batch, kv_heads, context, head_dim, dtype=dtype, device=device)
            layer.update(keys, torch.randn_like(keys))
            del keys
    return cache


def decode_bytes_per_sequence(config, context: int, dtype_bytes: int) -> int:
    """Cache bytes of one sequence plus what a decode step allocates on top: DynamicLayer's torch.cat copies one
    layer's K (then V) per step, a KDA layer returns a fresh fp32 state before it is copied into the cache, the
    logits are a vocabulary-sized row."""
    heads, kv_heads, head_dim = _dims(config)
    types = _layer_types(config)
    step = config.vocab_size * 4 * 2
    if any(t != LINEAR for t in types):
        step += 2 * kv_heads * head_dim * context * dtype_bytes
    if LINEAR in types:
        step += heads * head_dim * head_dim * 4
    return analytic_cache_bytes(config, context, 1, dtype_bytes) + step


def largest_batch_that_fits(config, context: int, dtype_bytes: int, free_bytes: int) -> int:
    budget = free_bytes * DECODE_MEMORY_FRACTION - DECODE_RESERVE_BYTES
    return max(0, int(budget // decode_bytes_per_sequence(config, context, dtype_bytes)))


# ---- timing and memory ---------------------------------------------------------------------------------------------

def timed(fn, device: torch.device):
    """Run fn once; return (its result, seconds). On CUDA: synchronise, events around the work, synchronise."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize(device)
        return result, start.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def release_memory(device: torch.device) -> None:
    """Give cached device memory back between measurements (on CPU there is nothing to give back)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def start_peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_since(device: torch.device, baseline: int | None, weight_bytes: int) -> int | None:
    """Peak bytes as if this model were alone on the card: its weights + what the call allocated at its peak (both
    models stay resident, so the absolute figure would include the other model's weights)."""
    if baseline is None:
        return None
    return weight_bytes + torch.cuda.max_memory_allocated(device) - baseline


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def random_ids(model, batch: int, tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, tokens), generator=generator).to(model.device)


# ---- 1. correctness --------------------------------------------------------------------------------------------------

def relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    fast, reference = fast.float(), reference.float()
    return ((fast - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def _severity(error: float) -> tuple[bool, float]:
    return error != error, error  # a NaN above every number (max() would skip a NaN that is not first)


def worst(errors) -> float:
    return max(errors, key=_severity, default=0.0)


def fast_path(device: torch.device) -> str:
    """The KDA path the benchmark times and checks: fla on CUDA; elsewhere the chunked PyTorch form (CPU inference
    would otherwise run the recurrent reference itself, and the check would compare the reference with itself)."""
    return "fla" if device.type == "cuda" and fla_available() else "chunk"


def kda_layer_checks(student, ids: torch.Tensor, rtol: float) -> list[dict]:
    """Each KDA layer on the input it sees in one fast forward: fast path vs reference for an uncached prefill, a
    prefill in segments, a cached prefill followed by single-token decode steps, and a batch whose second row is
    left-padded (its real tokens against that row alone, unpadded). Reports the worst layer."""
    mixers = [m for m in student.modules() if isinstance(m, KDAMixer)]
    inputs = {}

    def capture(module, args, kwargs):
        inputs[module] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hooks = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in mixers]
    try:
        with use_backend(fast_path(ids.device)):
            student(ids, use_cache=False, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    split = ids.shape[1] - CHECK_DECODE_TOKENS
    errors = {f"prefill of {ids.shape[1]} tokens": {}, f"prefill in segments of {CHECK_SEGMENT}": {},
              f"cached prefill of {split} + {CHECK_DECODE_TOKENS} decode steps": {}}
    pad = CHECK_PAD_TOKENS
    errors[f"batch with {pad} left-padding steps in one row vs each row alone"] = {}
    uncached, segmented, cached, padded = errors.values()
    for mixer in mixers:
        x = inputs[mixer]
        with use_backend("recurrent"):
            reference = mixer(x)[0]
        with use_backend(fast_path(ids.device)):
            uncached[mixer.layer_idx] = relative_error(mixer(x)[0], reference)
            whole_segment, mixer.prefill_chunk = mixer.prefill_chunk, CHECK_SEGMENT
            try:
                segmented[mixer.layer_idx] = relative_error(mixer(x)[0], reference)
            finally:
                mixer.prefill_chunk = whole_segment
            cache = DynamicCache(config=student.config)
            pieces = [mixer(x[:, :split], past_key_values=cache)[0]]
            pieces += [mixer(x[:, t:t + 1], past_key_values=cache)[0] for t in range(split, x.shape[1])]
            cached[mixer.layer_idx] = relative_error(torch.cat(pieces, dim=1), reference)
            junk = torch.randn_like(x[1:2, :pad])  # whatever sits under padding must not matter
            batch = torch.cat([x[:1], torch.cat([junk, x[1:2, :-pad]], dim=1)])
            mask = torch.ones(batch.shape[:2], dtype=torch.long, device=x.device)
            mask[1, :pad] = 0
            out = mixer(batch, attention_mask=mask)[0]
        with use_backend("recurrent"):
            alone = mixer(x[1:2, :-pad])[0]
        padded[mixer.layer_idx] = relative_error(torch.cat([out[0], out[1, pad:]]),
                                                 torch.cat([reference[0], alone[0]]))
    checks = []
    for what, per_layer in errors.items():
        layer = max(per_layer, key=lambda i: _severity(per_layer[i]), default=None)
        checks.append({"name": f"student KDA layers, fast path vs reference: {what}", "rtol": rtol,
                       "rel_err": per_layer.get(layer, 0.0), "worst_layer": layer,
                       "per_layer": {str(i): e for i, e in per_layer.items()}})
    return checks


def fused_module_checks(student, ids: torch.Tensor, rtol: float) -> list[dict]:
    """The fused norms, sliced MLPs and attention's q/k norm and rotary kernel (gendistill.fused) on the inputs they
    see in one reference forward (so that each check stands alone): fused path vs the transformers modules (the
    reference); also the norm's residual-add form."""
    modules = [m for m in student.modules() if isinstance(m, FUSED_TYPES)]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda module, args, kwargs: inputs.setdefault(module, (args, kwargs)),
                                         with_kwargs=True) for m in modules]
    try:
        with use_backend("recurrent"):
            student(ids, use_cache=False, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    errors = {"RMSNorm": [], "RMSNorm with the residual add": [], "MLP in slices of 64 tokens": [],
              "attention (q/k norms and rotary in one kernel)": []}

    def compare(what, fast_fn):
        with use_backend(fast_path(ids.device)):
            fast = fast_fn()
        with use_backend("recurrent"):  # every fused module falls back to transformers' own forward
            reference = fast_fn()
        fast, reference = (t if isinstance(t, tuple) else (t,) for t in (fast, reference))
        errors[what].append(worst(relative_error(f, r) for f, r in zip(fast, reference)))

    for module, (args, kwargs) in inputs.items():
        if isinstance(module, FusedRMSNorm):
            x = args[0]
            compare("RMSNorm", lambda: module(x))
            compare("RMSNorm with the residual add", lambda: module.add_and_norm(x, x.flip(-2)))
        elif isinstance(module, FusedMLP):
            x = args[0]
            chunk, module.config.kda_prefill_chunk = module.config.kda_prefill_chunk, 64
            try:
                compare("MLP in slices of 64 tokens", lambda: module(x))
            finally:
                module.config.kda_prefill_chunk = chunk
        else:
            compare("attention (q/k norms and rotary in one kernel)", lambda: module(*args, **kwargs)[0])
    return [{"name": f"student {what}, fused path vs transformers", "rtol": rtol, "rel_err": worst(e)}
            for what, e in errors.items()]


def direct_launch_check(student, ids: torch.Tensor) -> dict:
    """The student's logits with gendistill.launch's direct launches (the default) vs with Triton's own launcher and
    fla's own wrappers around KDA's kernels: the same kernels, so the same numbers."""
    with use_backend(fast_path(ids.device)):
        direct = student(ids, use_cache=False).logits
        with triton_launches():
            reference = student(ids, use_cache=False).logits
    return {"name": "student: logits with direct Triton launches vs Triton's launcher and fla's wrappers",
            "rtol": DIRECT_LAUNCH_RTOL, "rel_err": relative_error(direct, reference)}


def cached_decode_error(model, ids: torch.Tensor, steps: int) -> float:
    """Prefill all but `steps` tokens into a cache, feed the rest one at a time; compare those logits (and the
    prefill's last) with one uncached forward over everything."""
    full = model(ids, use_cache=False).logits[:, -(steps + 1):]
    cache = DynamicCache(config=model.config)
    pieces = [model(ids[:, :-steps], past_key_values=cache, use_cache=True, logits_to_keep=1).logits]
    for t in range(ids.shape[1] - steps, ids.shape[1]):
        pieces.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    return relative_error(torch.cat(pieces, dim=1), full)


def graph_decode_error(model, batch: int, context: int, steps: int, seed: int) -> float:
    """Decode steps replayed from a CUDA graph vs the same steps run eagerly, from identical synthetic StaticCaches
    and the same input tokens: relative error of the logits (the graph path must be the same computation)."""
    device = model.device
    tokens = random_ids(model, batch, steps + 2, seed)
    logits = {}

    def run(graphed: bool) -> torch.Tensor:
        torch.manual_seed(seed)
        cache = synthetic_cache(model, batch, context, max_len=context + steps + 4)
        token = tokens[:, :1].clone()

        def step():
            logits["last"] = model(token, past_key_values=cache, use_cache=True).logits
        if graphed:
            graph = capture_graph(step, device)  # its two warm-up steps read tokens[:, 0]
            replay = graph.replay
        else:
            step()
            step()
            replay = step
        outs = []
        for t in range(1, steps + 1):
            token.copy_(tokens[:, t:t + 1])
            replay()
            outs.append(logits["last"].clone())
        return torch.cat(outs, dim=1)

    eager = run(graphed=False)
    return relative_error(run(graphed=True), eager)


def graph_prefill_error(model, ids: torch.Tensor, seed: int) -> float:
    """An uncached prefill replayed from a CUDA graph vs the eager forward, logits of every position. The graph is
    captured on other tokens and replayed after `ids` are copied into its input, so a graph frozen at capture fails."""
    static = random_ids(model, ids.shape[0], ids.shape[1], seed + 1)
    out = {}

    def prefill():
        out["logits"] = model(static, use_cache=False).logits

    graph = capture_graph(prefill, model.device)
    static.copy_(ids)
    graph.replay()
    return relative_error(out["logits"], model(ids, use_cache=False).logits)


def graph_checks(name: str, model, ids: torch.Tensor, seed: int, decode: bool) -> list[dict]:
    """Replayed CUDA graphs vs eager calls on an fp32 copy, by the fast path: prefill and, if `decode`, StaticCache
    decode steps. A failing decode graph is re-checked with the PyTorch KDA path, to tell fla's kernels from the
    wiring."""
    with use_backend(fast_path(ids.device)):
        error = graph_prefill_error(model, ids, seed)
    checks = [{"name": f"{name}: prefill of {ids.shape[1]} tokens replayed as a CUDA graph vs eager, logits "
                       "(fp32 copy)", "rtol": GRAPH_PREFILL_RTOL, "rel_err": error}]
    if not decode:
        return checks
    with use_backend(fast_path(ids.device)):
        error = graph_decode_error(model, ids.shape[0], ids.shape[1], CHECK_DECODE_TOKENS, seed)
    decode_check = {"name": f"{name}: {CHECK_DECODE_TOKENS} decode steps replayed as a CUDA graph vs run eagerly, "
                            "logits (fp32 copy, StaticCache)", "rtol": DECODE_RTOL, "rel_err": error}
    if not error <= DECODE_RTOL and fast_path(ids.device) != "recurrent":
        with use_backend("recurrent"):
            decode_check["rel_err_pytorch_kda_path"] = graph_decode_error(model, ids.shape[0], ids.shape[1],
                                                                          CHECK_DECODE_TOKENS, seed)
    return checks + [decode_check]


def check_correctness(teacher, student, rtol: float | None = None, seed: int = 0, graphs: bool = False,
                      decode_graphs: bool = False) -> dict:
    """All checks (`graphs`: of replayed prefill graphs, `decode_graphs`: and decode graphs); `passed` is False if any
    error exceeds its tolerance (NaN included)."""
    ids = random_ids(student, 2, CHECK_TOKENS, seed)
    layer_rtol = LAYER_RTOL.get(student.dtype, 5e-2) if rtol is None else rtol
    checks = kda_layer_checks(student, ids, layer_rtol) + fused_module_checks(student, ids, layer_rtol)
    if ids.is_cuda:
        checks.append(direct_launch_check(student, ids))
    for name, model in (("teacher", teacher), ("student", student)):
        fp32_copy = copy.deepcopy(model).float()  # one at a time: a second copy of each model is alive only here
        with use_backend("recurrent"):
            error = cached_decode_error(fp32_copy, ids, CHECK_DECODE_TOKENS)
        checks.append({"name": f"{name}: cached decode of {CHECK_DECODE_TOKENS} tokens vs uncached forward, logits "
                               "(fp32 copy, reference KDA path)", "rtol": DECODE_RTOL, "rel_err": error})
        if graphs:  # fp32 as above, but the fast path: the graph must replay what the eager calls compute
            checks += graph_checks(name, fp32_copy, ids, seed, decode=decode_graphs)
        del fp32_copy
    for check in checks:
        check["passed"] = bool(check["rel_err"] <= check["rtol"])  # NaN fails
    return {"metric": "||fast - reference||_2 / ||reference||_2", "inputs": f"2 x {CHECK_TOKENS} random tokens",
            "passed": all(c["passed"] for c in checks), "checks": checks}


# ---- 2. prefill ------------------------------------------------------------------------------------------------------

def capture_graph(fn, device: torch.device) -> torch.cuda.CUDAGraph:
    """`fn` captured as one CUDA graph, after two runs on a side stream (fla autotunes there, allocators settle)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


# Short calls are timed more often than `repeats`, until MIN_TIMED_SECONDS have been timed (at most MAX_REPEATS): a
# host-bound 4K prefill (~30 ms) varies with the host's hiccups (a teacher's median of 3 once read 41.5 against 26.5 ms
# on the H200), and more calls cost little there. Calls of a second or more keep `repeats`.
MIN_TIMED_SECONDS, MAX_REPEATS = 1.0, 50


def timed_repeats(fn, device: torch.device, repeats: int, weights: int = 0, keep=None):
    """Yields (seconds, peak bytes: `weights` + what the call allocated at its peak; None on CPU) per timed call of
    fn: at least `repeats` calls, more for short ones (MIN_TIMED_SECONDS, MAX_REPEATS). `keep(result)` sees each
    call's result, which is dropped before the next call (or another model's, interleaved) allocates."""
    calls = total = 0
    while calls < repeats or (calls < MAX_REPEATS and total < MIN_TIMED_SECONDS):
        baseline = start_peak(device)
        result, seconds = timed(fn, device)
        calls, total = calls + 1, total + seconds
        if keep is not None:
            keep(result)
        del result
        yield seconds, peak_since(device, baseline, weights)


def interleaved(timers: dict) -> tuple[dict, set]:
    """Advances each generator of `timers` {name: timed_repeats(...)} in turn, one call each, until all are done:
    (each name's list of what it yielded, the names that ran out of memory)."""
    results, out_of_memory, active = {name: [] for name in timers}, set(), dict(timers)
    while active:
        for name in list(active):
            try:
                results[name].append(next(active[name]))
            except StopIteration:
                del active[name]
            except torch.OutOfMemoryError:
                out_of_memory.add(name)
                del active[name]
    return results, out_of_memory


def measure_prefill_graph(model, ids: torch.Tensor, repeats: int) -> dict:
    """TTFT of the uncached prefill replayed as a CUDA graph: the same kernels without the host's launch overhead
    (what a server capturing its prefill shapes would see; a 4K prefill of 28 layers is launch-bound)."""
    device, graph, record = model.device, None, {}
    try:
        graph = capture_graph(lambda: model(ids, use_cache=False, logits_to_keep=1).logits, device)
        graph.replay()
        times = [seconds for seconds, _ in timed_repeats(graph.replay, device, repeats)]
        record = {"ttft_graph_ms": 1e3 * statistics.median(times), "ttft_graph_ms_all": [1e3 * t for t in times]}
    except torch.OutOfMemoryError:
        record = {"error_graph": "out of memory"}
    except RuntimeError as err:  # something in the forward cannot be captured (a host sync)
        record = {"error_graph": f"CUDA graph capture failed: {str(err).splitlines()[0]}"}
    graph = None
    release_memory(device)
    return record


def measure_prefill(models: dict, context: int, repeats: int, warmup: int, seed: int, graphs: bool = False) -> dict:
    """{name: record} of each model's prefill of `context` tokens: TTFT without and with a cache (and replayed as a CUDA
    graph), peak memory, cache bytes. The models' timed calls alternate (teacher, student, teacher, ...): a short
    prefill is paced by the host, whose speed drifts in phases of seconds (one model's same 4K call took 27 and 34 ms
    in consecutive phases on an H200's host, runs 26 and 28), and interleaved calls meet the same phases."""
    device = next(iter(models.values())).device
    ids = {name: random_ids(model, 1, context, seed) for name, model in models.items()}
    records = {name: {"cache_bytes_analytic": analytic_cache_bytes(model.config, context, 1, model.dtype.itemsize)}
               for name, model in models.items()}
    for variant, use_cache in (("no_cache", False), ("cache", True)):
        def prefill(model, ids):
            cache = DynamicCache(config=model.config) if use_cache else None
            return model(ids, past_key_values=cache, use_cache=use_cache, logits_to_keep=1).logits, cache

        def keep(name):
            def measured(result):
                if result[1] is not None:
                    records[name]["cache_bytes_measured"] = measured_cache_bytes(result[1])
            return measured

        timers, out_of_memory = {}, set()
        for name, model in models.items():
            call = functools.partial(prefill, model, ids[name])
            try:
                for _ in range(warmup):
                    call()
                timers[name] = timed_repeats(call, device, repeats, weight_bytes(model), keep(name))
            except torch.OutOfMemoryError:
                out_of_memory.add(name)
            if name in out_of_memory:
                release_memory(device)
        measured, ran_out = interleaved(timers)
        release_memory(device)  # outside `except`: the traceback no longer pins the activations
        for name, record in records.items():
            if name in out_of_memory | ran_out:
                record[f"error_{variant}"] = "out of memory"
                continue
            times, peaks = zip(*measured[name])
            record[f"ttft_{variant}_ms"] = 1e3 * statistics.median(times)
            record[f"ttft_{variant}_ms_all"] = [1e3 * t for t in times]
            record[f"peak_{variant}_bytes"] = None if peaks[0] is None else max(peaks)
    if graphs:  # replays are not paced by the host: one model after the other
        for name, model in models.items():
            records[name].update(measure_prefill_graph(model, ids[name], repeats))
    return records


# ---- 3. decode -------------------------------------------------------------------------------------------------------

def measure_decode_point(model, batch: int, context: int, steps: int, repeats: int, warmup: int, seed: int,
                         static_len: int | None = None, graphs: bool = False):
    """Greedy decode `steps` tokens per repeat from a synthetic cache of `context` tokens (a StaticCache of
    `static_len` tokens if given; with `graphs`, each step a replay of one captured CUDA graph that also feeds the
    argmax back); None on OOM, {"error": ...} if the capture fails."""
    device = model.device
    result, out_of_memory, cache = None, False, None
    baseline = start_peak(device)  # before the cache: the decode peak includes it
    try:
        cache = synthetic_cache(model, batch, context, max_len=static_len)
        token = random_ids(model, batch, 1, seed)

        def step():
            token.copy_(model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1))

        replay = capture_graph(step, device).replay if graphs else step

        def decode():
            for _ in range(steps):
                replay()

        for _ in range(warmup):
            decode()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # not the transient of building the cache
        times = [timed(decode, device)[1] for _ in range(repeats)]
        median = statistics.median(times)
        result = {"batch": batch, "ms_per_step": 1e3 * median / steps, "tokens_per_s": batch * steps / median,
                  "ms_per_step_all": [1e3 * t / steps for t in times],
                  "peak_bytes": peak_since(device, baseline, weight_bytes(model))}
    except torch.OutOfMemoryError:
        out_of_memory = True
    except RuntimeError as err:  # only the graph capture raises here: something in the step cannot be captured
        if not graphs:
            raise
        result = {"batch": batch, "error": f"CUDA graph capture failed: {str(err).splitlines()[0]}"}
    cache = replay = None  # drop them (the closures share these variables) before giving the memory back
    release_memory(device)
    return None if out_of_memory else result


def measure_decode(model, context: int, batches: list[int] | None, max_batch: int, steps: int, repeats: int,
                   warmup: int, seed: int, static: bool = False, graphs: bool = False) -> dict:
    device = model.device
    # The cache grows by one token per step over warm-up and repeats (and a graph capture's two warm-up steps);
    # size the batch for the longest it gets.
    final_context = context + (warmup + repeats) * steps + 2
    static_len = final_context if static else None
    if device.type == "cuda":
        release_memory(device)
        free_bytes, _ = torch.cuda.mem_get_info(device)
        fits = largest_batch_that_fits(model.config, final_context, model.dtype.itemsize, free_bytes)
        largest = max(1, min(max_batch, fits))  # even if the estimate says 0, batch 1 is worth a try
    else:
        largest = max_batch  # no device memory to fill on CPU: the cap is the largest batch
    record = {"context": context, "steps_per_repeat": steps, "analytic_batch": largest,
              "cache": ("StaticCache" if static else "DynamicCache") + (", CUDA graphs" if graphs else "")}
    largest_point = None
    while largest >= 1 and largest_point is None:
        largest_point = measure_decode_point(model, largest, context, steps, repeats, warmup, seed, static_len,
                                             graphs)
        if largest_point is None:
            largest = min(largest - 1, int(largest * BACKOFF))
    if largest_point is None or "error" in largest_point:
        record["error"] = largest_point["error"] if largest_point else "out of memory even at batch 1"
        return record
    # Default curve: every power of two below the largest batch, but at most 4 of them (each point costs a cache
    # build and the steps at up to ~100 GB of KV on a big card).
    wanted = batches if batches is not None else [2**i for i in range(largest.bit_length())][::2][:4]
    points = [largest_point]
    for batch in sorted({1, *wanted}):
        if batch < largest:
            point = measure_decode_point(model, batch, context, steps, repeats, warmup, seed, static_len, graphs)
            if point is not None and "error" not in point:
                points.append(point)
    points.sort(key=lambda p: p["batch"])
    record.update(largest_batch=largest, points=points, tokens_per_s_at_largest=largest_point["tokens_per_s"],
                  ms_per_token_batch_1=points[0]["ms_per_step"] if points[0]["batch"] == 1 else None)
    return record


# ---- targets (issue 6) -----------------------------------------------------------------------------------------------

def _target(name: str, measured: float | None, op: str, bound: float, detail: str) -> dict:
    if measured is None:
        return {"name": name, "target": f"{op} {bound:g}", "measured": None, "passed": None,
                "margin": None, "detail": "not measured (context not in --contexts, or it ran out of memory)"}
    passed = measured >= bound if op == ">=" else measured <= bound
    # margin > 0: better than the target by that fraction; < 0: missed by that fraction
    margin = measured / bound - 1 if op == ">=" else 1 - measured / bound
    return {"name": name, "target": f"{op} {bound:g}", "measured": measured, "passed": bool(passed),
            "margin": margin, "detail": detail}


def compare_with_targets(prefill: list[dict], decode: dict) -> list[dict]:
    rows = {r["context"]: r for r in prefill}

    def ratio(context, key, numerator="teacher"):
        row = rows.get(context)
        denominator = "student" if numerator == "teacher" else "teacher"
        if row is None or row["teacher"].get(key) is None or row["student"].get(key) is None:
            return None, ""
        a, b = row[numerator][key], row[denominator][key]
        return a / b, f"{numerator} {_fmt_value(key, a)} / {denominator} {_fmt_value(key, b)}"

    targets = []
    for context, bound in ((TARGET_LONG, 3.1), (TARGET_SHORT, 1.0)):
        value, detail = ratio(context, "ttft_no_cache_ms")
        targets.append(_target(f"TTFT teacher/student at {_fmt_context(context)} (no cache)", value, ">=", bound,
                               detail))
        row = rows.get(context)
        if row is not None and row["student"].get("ttft_graph_ms"):  # --cuda-graphs
            # The student replayed as a graph against the teacher's faster way (eager or graph): SDPA inside a
            # graph can be slower than eagerly (seen on the H200), and a teacher slowed down would flatter the ratio.
            student_ms = row["student"]["ttft_graph_ms"]
            teacher_ms, how = min((row["teacher"].get(k) or float("inf"), k)
                                  for k in ("ttft_no_cache_ms", "ttft_graph_ms"))
            targets.append(_target(
                f"TTFT teacher/student at {_fmt_context(context)} (student as a CUDA graph, teacher at its best)",
                teacher_ms / student_ms, ">=", bound, f"teacher {_fmt_value('ms', teacher_ms)} "
                f"({'graph' if how == 'ttft_graph_ms' else 'eager'}) / student {_fmt_value('ms', student_ms)} (graph)"))
    value, detail = ratio(TARGET_LONG, "peak_no_cache_bytes", numerator="student")
    targets.append(_target("prefill peak memory student/teacher at 128K (no cache)", value, "<=", 1.0, detail))
    value, detail = ratio(TARGET_LONG, "cache_bytes_measured", numerator="student")
    targets.append(_target("KV + state bytes student/teacher at 128K (measured)", value, "<=", 0.26, detail))
    teacher_tps = decode["teacher"].get("tokens_per_s_at_largest")
    student_tps = decode["student"].get("tokens_per_s_at_largest")
    value = student_tps / teacher_tps if teacher_tps and student_tps else None
    detail = (f"student {student_tps:.4g} tok/s at batch {decode['student']['largest_batch']} / teacher "
              f"{teacher_tps:.4g} tok/s at batch {decode['teacher']['largest_batch']}") if value else ""
    cache = decode["teacher"].get("cache")
    targets.append(_target(f"decode throughput student/teacher at {_fmt_context(decode['teacher']['context'])}, "
                           "largest batch each" + (f" ({cache})" if cache else ""), value, ">=", 3.0, detail))
    return targets


# ---- the whole run -----------------------------------------------------------------------------------------------------

def describe_model(model) -> dict:
    types = _layer_types(model.config)
    return {"class": type(model).__name__, "layers": len(types),
            "attention_layers": [i for i, t in enumerate(types) if t != LINEAR],
            "parameters": sum(p.numel() for p in model.parameters()), "weight_bytes": weight_bytes(model),
            "dtype": str(model.dtype).removeprefix("torch."),
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


def environment(device: torch.device) -> dict:
    def version(*names):
        for name in names:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                return importlib.metadata.version(name)
        return None

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "transformers": version("transformers"),
           "triton": version("triton"), "fla": version("flash-linear-attention", "fla-core"),
           "gendistill": gendistill.__version__, "device": device.type, "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                   PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
    return env


def run_bench(teacher, student, contexts: list[int], decode_context: int = 32768, batches: list[int] | None = None,
              max_batch: int | None = None, repeats: int = 5, warmup: int = 1, decode_steps: int = 16,
              rtol: float | None = None, seed: int = 0, on_progress=None, decode_cache: str = "static",
              graphs: bool = False) -> dict:
    """Check the student, then measure both models. Raises WrongModelError before timing anything if the student's
    fast path or a cached decode disagrees with its reference. `batches`: decode batch sizes for the throughput
    curve (default powers of two below the largest that fits); `max_batch`: cap of the largest-batch search.
    `on_progress(partial_result)` is called after every measurement, so a run cut short keeps what it measured."""
    device, dtype = student.device, student.dtype
    if teacher.device != device or teacher.dtype != dtype:
        raise UserError(f"teacher ({teacher.device}, {teacher.dtype}) and student ({device}, {dtype}) must share "
                        "device and dtype")
    max_batch = max_batch or (1024 if device.type == "cuda" else 4)
    graph_decode = graphs and decode_cache == "static"  # a DynamicCache reallocates K/V every step: not capturable
    models = {"teacher": teacher, "student": student}
    probe = torch.empty(1, device=device)
    with use_backend(fast_path(device)):
        kda_paths = {"prefill": resolve_backend(probe, CHECK_TOKENS), "decode": resolve_backend(probe, 1)}
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device, torch.no_grad():
        correctness = check_correctness(teacher, student, rtol, seed, graphs=graphs, decode_graphs=graph_decode)
        release_memory(device)
        if not correctness["passed"]:
            raise WrongModelError(correctness)
        print(f"correctness passed (KDA path: {kda_paths}); worst relative errors: " + ", ".join(
            f"{c['rel_err']:.2g} <= {c['rtol']:g}" for c in correctness["checks"]), flush=True)
        if device.type == "cuda" and kda_paths["prefill"] != "fla":
            print("warning: flash-linear-attention is not in use, the student runs the PyTorch chunk path", flush=True)
        with use_backend(fast_path(device)):
            prefill = []
            for context in contexts:
                prefill.append({"context": context, **measure_prefill(models, context, repeats, warmup, seed,
                                                                      graphs)})
                if on_progress:
                    on_progress({"correctness": correctness, "prefill": prefill})
                print(f"prefill {_fmt_context(context)}: " + ", ".join(
                    f"{name} {_fmt_value('ttft_no_cache_ms', prefill[-1][name].get('ttft_no_cache_ms'))}"
                    for name in models), flush=True)
            decode = {}
            for name, model in models.items():
                decode[name] = measure_decode(model, decode_context, batches, max_batch, decode_steps, repeats,
                                              warmup, seed, static=decode_cache == "static", graphs=graph_decode)
                if on_progress:
                    on_progress({"correctness": correctness, "prefill": prefill, "decode": decode})
                print(f"decode {name} at {_fmt_context(decode_context)}: " + (decode[name].get("error") or ", ".join(
                    f"batch {p['batch']} {p['tokens_per_s']:.4g} tok/s" for p in decode[name]["points"])), flush=True)
    return {
        "settings": {"dtype": str(dtype).removeprefix("torch."), "attention": "sdpa", "kda_backend": kda_paths,
                     "timer": "cuda events + synchronize" if device.type == "cuda" else "time.perf_counter (CPU: "
                     "only ratios are meaningful)", "repeats": repeats, "warmup": warmup, "statistic": "median",
                     "prefill_min_timed_seconds": MIN_TIMED_SECONDS, "prefill_max_repeats": MAX_REPEATS,
                     "prefill_batch": 1, "prefill_cuda_graphs": graphs, "decode_cuda_graphs": graph_decode,
                     "decode_context": decode_context, "decode_steps_per_repeat": decode_steps,
                     "decode_cache": f"{decode_cache}: synthetic (random values, exact shapes), " + (
                         "StaticCache preallocated, K/V written in place" if decode_cache == "static" else
                         "DynamicCache, K/V concatenated (copied) at every step"),
                     "peak_memory": "this model's weights + max_memory_allocated over the call's baseline",
                     "largest_batch": f"analytic bytes vs {DECODE_MEMORY_FRACTION:.0%} of free memory minus "
                     f"{DECODE_RESERVE_BYTES / GiB:g} GiB, backing off x{BACKOFF} on OOM, capped at {max_batch}"},
        "environment": environment(device),
        "models": {name: describe_model(model) for name, model in models.items()},
        "correctness": correctness,
        "prefill": prefill,
        "decode": decode,
        "targets": compare_with_targets(prefill, decode),
    }


# ---- output: table, plots ------------------------------------------------------------------------------------------

def _fmt_context(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 else str(tokens)


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / 1024:.1f} KiB"


def _fmt_value(key: str, value) -> str:
    if value is None:
        return "-"
    if key.endswith("bytes") or key.startswith("cache_bytes"):
        return _fmt_bytes(value)
    return f"{value:.4g} ms" if key.endswith("ms") else f"{value:.4g}"


def format_table(result: dict) -> str:
    s = result["settings"]
    lines = [f"## Prefill (batch 1, {s['dtype']}, {s['attention']}, KDA {s['kda_backend']['prefill']}; median of "
             f"{s['repeats']} or more (calls under {s.get('prefill_min_timed_seconds', 0):g} s: repeated until that "
             f"long is timed, at most {s.get('prefill_max_repeats', s['repeats'])}); TTFT = prefill to the first "
             "token's logits)", "",
             "| context | model | TTFT no cache | TTFT with cache | TTFT CUDA graph | teacher/student | peak no cache "
             "| peak with cache | KV+state measured | KV+state analytic |", "|" + "---|" * 10]
    for row in result["prefill"]:
        for name in ("teacher", "student"):
            r = row[name]
            speedup = "-"
            if name == "student" and r.get("ttft_no_cache_ms") and row["teacher"].get("ttft_no_cache_ms"):
                speedup = f"{row['teacher']['ttft_no_cache_ms'] / r['ttft_no_cache_ms']:.2f}x"
                if r.get("ttft_cache_ms") and row["teacher"].get("ttft_cache_ms"):
                    speedup += f" ({row['teacher']['ttft_cache_ms'] / r['ttft_cache_ms']:.2f}x cached)"
                if r.get("ttft_graph_ms") and row["teacher"].get("ttft_graph_ms"):
                    speedup += f" ({row['teacher']['ttft_graph_ms'] / r['ttft_graph_ms']:.2f}x graph)"
            graph = r.get("error_graph") or _fmt_value("ms", r.get("ttft_graph_ms"))
            lines.append(f"| {_fmt_context(row['context'])} | {name} | {_fmt_value('ms', r.get('ttft_no_cache_ms'))} "
                         f"| {_fmt_value('ms', r.get('ttft_cache_ms'))} | {graph} | {speedup} "
                         f"| {_fmt_bytes(r.get('peak_no_cache_bytes'))} | {_fmt_bytes(r.get('peak_cache_bytes'))} "
                         f"| {_fmt_bytes(r.get('cache_bytes_measured'))} | {_fmt_bytes(r['cache_bytes_analytic'])} |")
    lines += ["", f"## Decode at {_fmt_context(s['decode_context'])} context (greedy, {s['decode_steps_per_repeat']} "
              "steps per repeat, synthetic cache)", "",
              "| model | ms/token at batch 1 | largest batch | ms/step there | tokens/s there | points (batch: tokens/s) |",
              "|" + "---|" * 6]
    for name, d in result["decode"].items():
        if "error" in d:
            lines.append(f"| {name} | {d['error']} | | | | |")
            continue
        largest = next(p for p in d["points"] if p["batch"] == d["largest_batch"])
        points = ", ".join(f"{p['batch']}: {p['tokens_per_s']:.4g}" for p in d["points"])
        lines.append(f"| {name} | {_fmt_value('ms', d['ms_per_token_batch_1'])} | {d['largest_batch']} "
                     f"| {largest['ms_per_step']:.4g} | {largest['tokens_per_s']:.4g} | {points} |")
    lines += ["", "## Targets (issue 6)", "", "| target | bound | measured | pass | margin | detail |", "|" + "---|" * 6]
    for t in result["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["passed"]]
        margin = "-" if t["margin"] is None else f"{t['margin']:+.1%}"
        measured = "-" if t["measured"] is None else f"{t['measured']:.3g}"
        lines.append(f"| {t['name']} | {t['target']} | {measured} | {verdict} | {margin} | {t['detail']} |")
    return "\n".join(lines) + "\n"


def write_plots(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter, NullFormatter

    colors = {"teacher": "tab:blue", "student": "tab:orange"}
    contexts = [row["context"] for row in result["prefill"]]
    largest = max([r[n].get(k) or 0 for r in result["prefill"] for n in colors
                   for k in ("cache_bytes_analytic", "peak_cache_bytes", "peak_no_cache_bytes")] + [1])
    unit, unit_name = next((u, n) for u, n in ((GiB, "GiB"), (MiB, "MiB"), (1024, "KiB"), (1, "bytes")) if largest >= u)

    def series(name, key, scale=1.0):
        pairs = [(row["context"], row[name].get(key)) for row in result["prefill"] if row[name].get(key) is not None]
        return [c for c, _ in pairs], [v / scale for _, v in pairs]

    def plot(ax, xy, *style, **kw):
        if xy[0]:  # nothing measured (e.g. device memory on CPU): no line, no legend entry
            ax.plot(*xy, *style, **kw)

    def finish(ax, title, ylabel, ylog, xlabel="context (tokens)", xticks=None):
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, xscale="log", yscale="log" if ylog else "linear")
        # LogFormatter: plain numbers, minor ticks labelled when the range is narrow, no mathtext (slow to typeset)
        for axis in (ax.xaxis, ax.yaxis) if ylog else (ax.xaxis,):
            axis.set_major_formatter(LogFormatter())
            axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ticks = contexts if xticks is None else xticks
        ax.set_xticks(ticks, [_fmt_context(t) if xticks is None else str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)

    def save(fig, name):
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        return name

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    for name, color in colors.items():
        plot(ax, series(name, "ttft_no_cache_ms"), "o-", color=color, label=f"{name}, no cache")
        plot(ax, series(name, "ttft_cache_ms"), "s--", color=color, alpha=0.6, label=f"{name}, with cache")
    finish(ax, "Time to first token (batch 1)", "TTFT (ms)", ylog=True)
    files = [save(fig, "ttft_vs_context.png")]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for name, color in colors.items():
        plot(left, series(name, "cache_bytes_measured", unit), "o-", color=color, label=f"{name}, measured")
        plot(left, series(name, "cache_bytes_analytic", unit), "k:", alpha=0.5)
        plot(right, series(name, "peak_no_cache_bytes", unit), "o-", color=color, label=f"{name}, no cache")
        plot(right, series(name, "peak_cache_bytes", unit), "s--", color=color, alpha=0.6, label=f"{name}, with cache")
    finish(left, "KV cache + KDA state after prefill (dotted: analytic)", unit_name, ylog=False)
    finish(right, "Peak device memory during prefill" + ("" if right.lines else " (CUDA only)"), unit_name,
           ylog=False)
    files.append(save(fig, "memory_vs_context.png"))

    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    batches = set()
    for name, color in colors.items():
        d = result["decode"][name]
        if "points" in d:
            batches.update(p["batch"] for p in d["points"])
            ax.plot([p["batch"] for p in d["points"]], [p["tokens_per_s"] for p in d["points"]], "o-", color=color,
                    label=f"{name} (largest batch {d['largest_batch']})")
    finish(ax, f"Decode throughput at {_fmt_context(result['settings']['decode_context'])} context", "tokens / s",
           ylog=True, xlabel="batch", xticks=sorted(b for b in batches if b & (b - 1) == 0))  # powers of two
    files.append(save(fig, "decode_throughput_vs_batch.png"))
    return files


# ---- CLI ---------------------------------------------------------------------------------------------------------------

def parse_tokens(text: str) -> int:
    """'4k' -> 4096, '128K' -> 131072, '300' -> 300."""
    text = text.strip().lower()
    try:
        value = int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
    except ValueError:
        raise UserError(f"cannot read {text!r} as a token count (e.g. 4k, 32k, 131072)") from None
    if value < 1:
        raise UserError(f"token counts must be positive, got {text!r}")
    return value


def parse_list(text: str | None) -> list[int] | None:
    return None if text is None else [parse_tokens(t) for t in text.split(",") if t.strip()]


def build_shape(shape: str, seed: int):
    """Teacher with random weights in a known shape, and its student from `convert` (on CPU, fp32)."""
    from transformers import Qwen3ForCausalLM

    from gendistill.convert import convert
    from gendistill.testing import qwen3_0_6b_config, tiny_qwen3

    if shape == "tiny":
        teacher = tiny_qwen3(seed=seed, layers=4)
    else:
        torch.manual_seed(seed)
        config = qwen3_0_6b_config()
        config._attn_implementation = "sdpa"
        teacher = Qwen3ForCausalLM(config).eval()
    return teacher, convert(teacher, seed=seed)


def load_model(path: str, dtype: torch.dtype):
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as err:
        raise UserError(f"could not load a model from {path!r}: {err}") from err


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="KV/state memory, time-to-first-token and decode speed of a "
                                "teacher and its Hybrid-KDA student; refuses to time a student whose fast path is wrong.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--shape", choices=["qwen3-0.6b", "tiny"], help="random weights in this shape (no download); "
                        "the student is `convert` of the teacher")
    source.add_argument("--teacher", help="teacher checkpoint directory (with --student)")
    p.add_argument("--student", help="Hybrid-KDA student checkpoint directory (with --teacher)")
    p.add_argument("--contexts", default="4k,16k,64k,128k", help="prefill context lengths (default %(default)s)")
    p.add_argument("--decode-context", default="32k", help="context of the decode measurements (default %(default)s)")
    p.add_argument("--batch", help="decode batch sizes for the throughput curve, e.g. 1,8,32 (default: powers of two "
                   "below the largest batch that fits; batch 1 and the largest are always measured)")
    p.add_argument("--max-batch", type=int, help="cap of the largest decode batch (default 1024 on CUDA; on CPU, "
                   "where nothing is sized from memory, 4)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement, median reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement (fla autotunes here)")
    p.add_argument("--decode-steps", type=int, default=16, help="decode steps per timed repeat")
    p.add_argument("--decode-cache", choices=["dynamic", "static"], default="static",
                   help="cache class for decode: a preallocated StaticCache (K/V written in place, as serving engines "
                   "do) or DynamicCache (generate's default, which copies all K/V at every step; default "
                   "%(default)s)")
    p.add_argument("--cuda-graphs", action="store_true", help="also time each uncached prefill replayed as a CUDA "
                   "graph, and with --decode-cache static decode every step as one, both models (the kernels without "
                   "the host's launch overhead; checked against the eager steps first; CUDA only)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    p.add_argument("--rtol", type=float, help="tolerance on each KDA layer's relative L2 error, fast path vs "
                   "reference (default 5e-3 for float32, 5e-2 for 16-bit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="output directory (default bench/results/<shape or 'custom'>)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def main(args) -> int:
    if (args.teacher is None) != (args.student is None):
        raise UserError("--teacher and --student go together (or use --shape)")
    if min(args.repeats, args.decode_steps) < 1 or args.warmup < 0:
        raise UserError("--repeats and --decode-steps must be >= 1, --warmup >= 0")
    contexts, batches = parse_list(args.contexts), parse_list(args.batch)
    decode_context = parse_tokens(args.decode_context)
    out = check_output_dir(args.out or Path("bench/results") / (args.shape or "custom"), args.overwrite)
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available")
    if args.cuda_graphs and device.type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA device (the device is {device}); drop the flag on this machine")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)

    if args.shape:
        teacher, student = (m.to(device=device, dtype=dtype).eval() for m in build_shape(args.shape, args.seed))
    else:
        from gendistill.modeling import HybridKDAForCausalLM

        # loaded in `dtype` already; only moved, so buffers kept in fp32 (RoPE frequencies) stay fp32
        teacher, student = (load_model(path, dtype).to(device).eval() for path in (args.teacher, args.student))
        if not isinstance(student, HybridKDAForCausalLM):
            raise UserError(f"--student {args.student} is a {type(student).__name__}, not a HybridKDAForCausalLM")
    for model in (teacher, student):
        model.config._attn_implementation = "sdpa"  # same attention backend for both, whatever was saved

    command = shlex.join(["gendistill", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else shlex.join(sys.argv)
    partial = out.with_name(out.name + ".partial.json")  # what a run cut short (time limit, crash) had measured

    def save_partial(measured: dict) -> None:
        atomic_write_json(partial, {"status": "partial", "command": command, "environment": environment(device),
                                    **measured})

    try:
        result = run_bench(teacher, student, contexts, decode_context=decode_context, batches=batches,
                           max_batch=args.max_batch, repeats=args.repeats, warmup=args.warmup,
                           decode_steps=args.decode_steps, rtol=args.rtol, seed=args.seed, on_progress=save_partial,
                           decode_cache=args.decode_cache, graphs=args.cuda_graphs)
    except WrongModelError as err:
        with atomic_dir(out, overwrite=args.overwrite) as tmp:
            atomic_write_json(Path(tmp) / "correctness.json", {
                "status": "refused", "command": command, "arguments": vars(args),
                "environment": environment(device), "correctness": err.correctness})
        print(f"gendistill bench: {err}\nno speed figures written; see {out / 'correctness.json'}", file=sys.stderr)
        return 1
    result = {"status": "ok", "command": command, "arguments": vars(args), **result}
    table = format_table(result)
    with atomic_dir(out, overwrite=args.overwrite) as tmp:
        atomic_write_json(Path(tmp) / "bench.json", result)
        atomic_write_text(Path(tmp) / "table.md", table)
        plots = write_plots(result, Path(tmp))
    partial.unlink(missing_ok=True)
    print(table)
    print(f"wrote {out}/: bench.json, table.md, {', '.join(plots)}")
    return 0
