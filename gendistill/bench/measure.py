"""Measurement: time to first token (forward and `generate`), decode speed, peak device memory, cache bytes.

Method: same dtype and SDPA for both models, warm-up excluded, medians over repeats (calls shorter than a second are
repeated until a second has been timed, at most 50 times: host-bound calls vary with the host); CUDA events with
synchronisation on the GPU, perf_counter on CPU (CPU figures only make sense as ratios). Peak memory is reported as
if the model were alone on the card: its weights + what the call allocated at its peak.
"""
from __future__ import annotations

import functools
import gc
import statistics
import time

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import Cache, LinearAttentionCacheLayerMixin

from gendistill.io import UserError
from gendistill.kda import fla_available
from gendistill.modeling import cache_bytes

LINEAR = "linear_attention"
GiB, MiB = 2**30, 2**20
# Largest decode batch: size it from the analytic bytes against free memory, then back off on OOM.
DECODE_MEMORY_FRACTION = 0.90  # of free memory; the rest absorbs allocator rounding and fragmentation
DECODE_RESERVE_BYTES = 2 * GiB  # cuBLAS/SDPA workspaces, the prefill leftovers the allocator keeps
BACKOFF = 0.85
# Short calls are timed more often than `repeats`, until MIN_TIMED_SECONDS have been timed (at most MAX_REPEATS): a
# host-bound 4K prefill (~30 ms) varies with the host's hiccups by tens of percent, and more calls cost little there.
# Calls of a second or more keep `repeats`.
MIN_TIMED_SECONDS, MAX_REPEATS = 1.0, 50


def fast_path(device: torch.device) -> str:
    """The KDA path the benchmark times and checks: fla on CUDA; elsewhere the chunked PyTorch form (CPU inference
    would otherwise run the recurrent reference itself, and the checks would compare the reference with itself)."""
    return "fla" if device.type == "cuda" and fla_available() else "chunk"


# ---- shapes and cache bytes ------------------------------------------------------------------------------------------

def dims(config) -> tuple[int, int, int]:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def layer_types(config) -> list[str]:
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
    unknown = sorted(set(types) - {"full_attention", LINEAR})
    if unknown:
        raise UserError(f"the benchmark handles full and linear attention layers only, the model has {unknown}")
    return types


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
    heads, kv_heads, head_dim = dims(config)
    cache = DynamicCache(config=config) if max_len is None else StaticCache(config=config, max_cache_len=max_len)
    for layer, layer_type in zip(cache.layers, layer_types(config)):
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


def decode_bytes_per_sequence(config, context: int, dtype: torch.dtype) -> int:
    """Cache bytes of one sequence plus what a decode step allocates on top: DynamicLayer's torch.cat copies one
    layer's K (then V) per step, a KDA layer returns a fresh fp32 state before it is copied into the cache, the
    logits are a vocabulary-sized row."""
    heads, kv_heads, head_dim = dims(config)
    types = layer_types(config)
    step = config.vocab_size * 4 * 2
    if any(t != LINEAR for t in types):
        step += 2 * kv_heads * head_dim * context * dtype.itemsize
    if LINEAR in types:
        step += heads * head_dim * head_dim * 4
    return cache_bytes(config, context, 1, dtype) + step


def largest_batch_that_fits(config, context: int, dtype: torch.dtype, free_bytes: int) -> int:
    budget = free_bytes * DECODE_MEMORY_FRACTION - DECODE_RESERVE_BYTES
    return max(0, int(budget // decode_bytes_per_sequence(config, context, dtype)))


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


# ---- prefill ---------------------------------------------------------------------------------------------------------

def first_token(model, ids: torch.Tensor, variant: str):
    """One time-to-first-token call: (its output, the cache it filled or None).
    no_cache: the forward to the last token's logits, nothing kept (pure prefill); cache: the same filling a
    DynamicCache; generate: `model.generate(ids, max_new_tokens=1)`, greedy, what a user calls (it builds its own
    cache and masks, and must cost about what the forward does)."""
    if variant == "generate":
        pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                              pad_token_id=pad), None
    cache = DynamicCache(config=model.config) if variant == "cache" else None
    return model(ids, past_key_values=cache, use_cache=cache is not None, logits_to_keep=1).logits, cache


def measure_prefill_graph(model, ids: torch.Tensor, repeats: int) -> dict:
    """TTFT of the uncached prefill replayed as a CUDA graph: the same kernels without the host's launch overhead
    (what a server capturing its prefill shapes would see; a short prefill of many layers is launch-bound)."""
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


def measure_prefill(models: dict, context: int, repeats: int, warmup: int, seed: int, graphs: bool = False,
                    generate: bool = False) -> dict:
    """{name: record} of each model's prefill of `context` tokens: TTFT without and with a cache (`generate`: also
    through `model.generate`; `graphs`: also replayed as a CUDA graph), peak memory of each, cache bytes. The models'
    timed calls alternate (teacher, student, teacher, ...): a short prefill is paced by the host, whose speed drifts
    in phases of seconds, and interleaved calls meet the same phases."""
    device = next(iter(models.values())).device
    ids = {name: random_ids(model, 1, context, seed) for name, model in models.items()}
    records = {name: {"cache_bytes_analytic": cache_bytes(model.config, context, 1, model.dtype)}
               for name, model in models.items()}
    for variant in ("no_cache", "cache") + (("generate",) if generate else ()):
        def keep(name):
            def measured(result):
                if result[1] is not None:
                    records[name]["cache_bytes_measured"] = measured_cache_bytes(result[1])
            return measured

        timers, out_of_memory = {}, set()
        for name, model in models.items():
            call = functools.partial(first_token, model, ids[name], variant)
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


# ---- decode ----------------------------------------------------------------------------------------------------------

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
        fits = largest_batch_that_fits(model.config, final_context, model.dtype, free_bytes)
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
