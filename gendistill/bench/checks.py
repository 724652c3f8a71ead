"""Correctness gates: the student's fast path against its reference, before anything is timed.

On a short input, every KDA layer of the student must give the same output by the fast path (`fast_path`: fla on
CUDA, the chunked PyTorch form elsewhere) as by the recurrent reference (uncached, in segments, cached + decode,
left-padded batch), every fused module (gendistill.kernels) the same as transformers', cached decoding must match the
uncached forward on the logits (teacher and student), and with CUDA graphs graph-replayed prefills (and decode steps)
must match eager ones. `check_correctness` runs them all; `WrongModelError` stops a run whose student fails one.
"""
from __future__ import annotations

import copy

import torch
from transformers import DynamicCache

from gendistill.bench import measure
from gendistill.bench.measure import fast_path, random_ids, synthetic_cache
from gendistill import kernels
from gendistill.kda import use_backend
from gendistill.kernels.hybrid import FusedAttention, FusedKDAMixer
from gendistill.kernels.qwen3 import FusedMLP, FusedRMSNorm

FUSED_TYPES = (FusedRMSNorm, FusedMLP, FusedAttention)

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


class WrongModelError(RuntimeError):
    """The student's fast path (or a cached decode) disagrees with the reference: no speed may be reported."""

    def __init__(self, correctness: dict):
        failed = [c for c in correctness["checks"] if not c["passed"]]
        lines = [f"{c['name']}: relative error {c['rel_err']:.3g} > tolerance {c['rtol']:.3g}"
                 + (f" (worst: layer {c['worst_layer']})" if c.get("worst_layer") is not None else "") for c in failed]
        super().__init__("refusing to report speed for a model that disagrees with its reference:\n  "
                         + "\n  ".join(lines))
        self.correctness = correctness



def relative_error(fast: torch.Tensor, reference: torch.Tensor) -> float:
    fast, reference = fast.float(), reference.float()
    return ((fast - reference).norm() / reference.norm().clamp_min(1e-30)).item()


def _severity(error: float) -> tuple[bool, float]:
    return error != error, error  # a NaN above every number (max() would skip a NaN that is not first)


def worst(errors) -> float:
    return max(errors, key=_severity, default=0.0)


def kda_layer_checks(student, ids: torch.Tensor, rtol: float) -> list[dict]:
    """Each KDA layer on the input it sees in one fast forward: fast path vs reference for an uncached prefill, a
    prefill in segments, a cached prefill followed by single-token decode steps, and a batch whose second row is
    left-padded (its real tokens against that row alone, unpadded). Reports the worst layer."""
    mixers = [m for m in student.modules() if isinstance(m, FusedKDAMixer)]
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
    """The fused norms, sliced MLPs and attention's q/k norm and rotary kernel (gendistill.kernels) on the inputs they
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
    """The student's logits with kernels.launch's direct launches (the default) vs with Triton's own launcher and
    fla's own wrappers around KDA's kernels: the same kernels, so the same numbers."""
    with use_backend(fast_path(ids.device)):
        direct = student(ids, use_cache=False).logits
        with kernels.use(direct_launch=False):
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
            graph = measure.capture_graph(step, device)  # its two warm-up steps read tokens[:, 0]
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

    graph = measure.capture_graph(prefill, model.device)
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
