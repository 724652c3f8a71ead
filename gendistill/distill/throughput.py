"""Model FLOPs per token of a distillation step, MFU against the GPU's peak, and wall-time estimates of a recipe.

FLOPs per token (what the step must compute, not what the kernels happen to do: recomputation under gradient
checkpointing is not counted, and neither are norms, activations, the short convs or the softmax of the loss):

    student   2 N_run            forward of every linear the stage runs (weights N: in x out per nn.Linear)
            + 2 N_input_grad     backward to the inputs of the linears whose input depends on a trained parameter
            + 2 N_trained        backward to the trained weights
    teacher   2 N_teacher_run    forward of the teacher layers the stage reads (all of them and the head for kd)
    attention 2 H d T_avg per softmax layer forward, x3 where it trains (x1 in the teacher): causal attention over a
              sequence of T tokens attends to (T + 1) / 2 positions on average (packed documents are not subtracted:
              the kernel computes the whole causal window)
    KDA       6 H dk dv per KDA layer forward (q.S, k.S and the rank-1 state update of the recurrent form), x3 where
              it trains
    head      the lm_head GEMMs run on the scored tokens only (chunked loss): x scored_fraction

`flops_per_token` returns every part and the total; `mfu` divides tokens/s x FLOPs/token by the peak.
"""
from __future__ import annotations

from torch import nn

# Dense (no structured sparsity) bf16 tensor-core peak, TFLOP/s per GPU, from NVIDIA's datasheets. Matched against
# torch.cuda.get_device_name in order (the first substring found wins, so the specific names come first).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),   # SXM (NVIDIA H100 80GB HBM3)
    ("H200", 989.0),
    ("GH200", 989.0),
    ("H800", 989.0),
    ("H20", 148.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
)
X_READERS = {"q_proj", "k_proj", "v_proj", "f_a_proj", "b_proj", "g_a_proj", "gate_proj", "up_proj"}


def peak_tflops(device_name: str | None) -> float | None:
    """Dense bf16 peak TFLOP/s of a GPU by its name, or None when unknown (then no MFU is reported)."""
    for key, tflops in PEAK_BF16_TFLOPS if device_name else ():
        if key.lower() in device_name.lower():
            return tflops
    return None


def _linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def _size(linear: nn.Linear) -> int:
    return linear.in_features * linear.out_features


def _mixer_kind(layer: nn.Module) -> str:
    mixer = layer.self_attn
    return "kda" if hasattr(mixer, "A_log") else "attention"


def _attention_flops(layer: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token of one causal softmax attention (QK^T and AV over (T + 1) / 2 positions)."""
    cfg = layer.self_attn.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * 2 * heads * head_dim * (seq_len + 1) / 2


def _kda_flops(layer: nn.Module) -> float:
    mixer = layer.self_attn
    return 6 * mixer.num_heads * mixer.head_dim * mixer.head_dim


def flops_per_token(student: nn.Module, teacher: nn.Module | None, objective, align_layers=(), seq_len: int = 2048,
                    scored_fraction: float = 1.0) -> dict:
    """Model FLOPs per (packed) token of one training step of a stage with `objective` (terms) on `student`, whose
    trained parameters are those with requires_grad, reading `teacher`. See the module docstring for what counts."""
    terms = set(objective)
    layers = list(student.model.layers)
    parts = {"student_forward": 0.0, "student_input_grads": 0.0, "student_weight_grads": 0.0, "teacher_forward": 0.0,
             "attention": 0.0, "kda": 0.0}

    def run(layer, mixer_only: bool, input_grads: str):
        """Add one student layer. input_grads: "all" (the layer's input depends on trained parameters) or "inner"
        (its input is the teacher's, a constant: only the linears reading inner activations backpropagate)."""
        for name, linear in _linears(layer.self_attn if mixer_only else layer):
            n = _size(linear)
            parts["student_forward"] += 2 * n
            if input_grads == "all" or name.rsplit(".", 1)[-1] not in X_READERS:
                parts["student_input_grads"] += 2 * n
            if linear.weight.requires_grad:
                parts["student_weight_grads"] += 2 * n
        key = _mixer_kind(layer)
        parts[key] += 3 * (_attention_flops(layer, seq_len) if key == "attention" else _kda_flops(layer))

    if terms & {"kd", "ce"}:
        for layer in layers:
            run(layer, False, "all")
        head = student.lm_head
        parts["student_forward"] += 2 * _size(head) * scored_fraction
        parts["student_input_grads"] += 2 * _size(head) * scored_fraction
        if head.weight.requires_grad:
            parts["student_weight_grads"] += 2 * _size(head) * scored_fraction
    for term, mixer_only in (("attn_align", True), ("hidden_align", False)):
        if term in terms:
            for i in align_layers:
                run(layers[i], mixer_only, "inner")
    if "qk_align" in terms:
        for i in align_layers:
            for name in ("q_proj", "k_proj"):
                linear = getattr(layers[i].self_attn, name)
                parts["student_forward"] += 2 * _size(linear)
                parts["student_weight_grads"] += 2 * _size(linear) if linear.weight.requires_grad else 0

    if teacher is not None and terms & {"kd", "attn_align", "hidden_align", "qk_align"}:
        t_layers = list(teacher.model.layers)
        last = len(t_layers) - 1 if "kd" in terms else max(align_layers, default=-1)
        for layer in t_layers[:last + 1]:
            parts["teacher_forward"] += sum(2 * _size(m) for _, m in _linears(layer))
            parts["attention"] += _attention_flops(layer, seq_len)
        if "kd" in terms:
            parts["teacher_forward"] += 2 * _size(teacher.lm_head) * scored_fraction
    parts["total"] = sum(parts.values())
    return parts


FORMULA = ("FLOPs/token = 2 N_student_run + 2 N_student_input_grads + 2 N_student_trained + 2 N_teacher_run "
           "+ attention (2 H d (T+1)/2 per softmax layer forward, x3 where the student trains it) "
           "+ KDA (6 H dk dv per layer forward, x3 in the student); lm_head terms x scored fraction; "
           "N = in x out of every nn.Linear that runs; norms, convs, activations and loss softmax not counted")


def mfu(tokens_per_s: float, flops: float, device_name: str | None) -> float | None:
    """Model FLOPs utilisation of one device: tokens/s x FLOPs/token over its dense bf16 peak (None if unknown)."""
    peak = peak_tflops(device_name)
    return None if peak is None else tokens_per_s * flops / (peak * 1e12)


# ----------------------------------------------------------------------------------------------------------------
# what a recipe will cost: seconds per step per stage, from a committed table or a short calibration

def random_corpus(directory, vocab: int, tokens: int, chat: bool = False, seed: int = 0):
    """A TokenCorpus of random tokens in documents of realistic lengths (geometric, mean ~1500), so packing and the
    per-document resets are exercised as real data exercises them; `chat`: alternating prompt/answer spans (about
    half the tokens are assistant tokens, as completion-only stages score them)."""
    import numpy as np

    from gendistill.distill.data import write_corpus

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.geometric(1 / 1500, size=tokens // 200 + 1), 16, None)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), tokens)) + 1]
    data = rng.integers(3, vocab, size=int(lengths.sum()))
    if chat:  # spans of 8-256 tokens, alternately prompt (0) and answer (1)
        spans = rng.integers(8, 257, size=len(data) // 8 + 2)
        flags = np.repeat(np.arange(len(spans)) % 2, spans)[: len(data)].astype(np.uint8)
    else:
        flags = np.ones(len(data), dtype=np.uint8)
    return write_corpus(directory, data, flags, lengths, {"kind": "chat" if chat else "text"})


def model_key(teacher, student) -> dict:
    """The shape that decides speed: what a table row must match."""
    c = student.config
    return {"vocab": c.vocab_size, "hidden": c.hidden_size, "layers": c.num_hidden_layers,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
            "head_dim": getattr(c, "head_dim", None), "intermediate": c.intermediate_size,
            "attention_layers": list(getattr(c, "attention_layers", None) or []),
            "teacher_layers": None if teacher is None else teacher.config.num_hidden_layers}


def stage_key(stage, model: dict, gpu: str, world: int, micro: int) -> dict:
    """A stage's speed-relevant settings: a table row measured with the same key gives its tokens/s."""
    from gendistill.distill.recipe import THROUGHPUT_KEYS

    return {"gpu": gpu, "world": world, "model": model, "objective": sorted(stage.objective),
            "loss_mask": stage.loss_mask, "seq_len": stage.seq_len, "micro_batch_size": micro,
            "train": stage.train, "freeze": stage.freeze, "layers": stage.layers,
            "gradient_checkpointing": stage.gradient_checkpointing, "kd_topk": stage.kd_topk,
            **{k: getattr(stage, k) for k in THROUGHPUT_KEYS}}


def table_lookup(path, key: dict) -> dict | None:
    """The row of a bench/kd_step.py result file measured with exactly `key`, or None."""
    import json
    from pathlib import Path

    try:
        rows = json.loads(Path(path).read_text()).get("rows", [])
    except (OSError, ValueError):
        return None
    canonical = json.loads(json.dumps(key, default=str))
    return next((r for r in rows if r.get("key") == canonical and r.get("tokens_per_s")), None)


def calibrate_stage(stage, student, teacher, env, directory, steps: int = 2, warmup: int = 1) -> dict:
    """Seconds per micro-batch step of `stage` with its own settings on random tokens: `warmup` + `steps` optimiser
    steps of one micro-batch per process (batch_size = micro x world), nothing saved. The first step (kernel
    compilation, autotuning, torch.compile) is reported apart."""
    import copy
    import dataclasses
    import json
    import statistics
    from pathlib import Path

    from gendistill.distill import parallel
    from gendistill.distill.trainer import micro_batch, train_stage

    micro = micro_batch(stage, env.world)
    probe = dataclasses.replace(stage, steps=warmup + steps, tokens=None, count="packed", schedule="constant",
                                warmup=0.0, batch_size=micro * env.world, checkpoint_every=0, eval=None, log_every=1,
                                teacher_cache=None)
    directory = Path(directory)
    corpus_dir = directory / f"corpus-{stage.name}"
    if env.is_main:
        random_corpus(corpus_dir, student.config.vocab_size, (warmup + steps + 1) * probe.batch_size * stage.seq_len
                      + 1, chat=stage.loss_mask == "completion_only")
    parallel.barrier(env)
    from gendistill.distill.data import TokenCorpus

    train_stage(probe, copy.deepcopy(student), teacher=teacher if stage.needs_teacher else None,
                data=TokenCorpus(corpus_dir), out_dir=directory / stage.name, progress=False, tensorboard=False,
                save=False, env=env)
    records = [json.loads(line) for line in (directory / stage.name / "metrics.jsonl").read_text().splitlines()]
    return {"micro_step_s": statistics.median(r["step_time_s"] for r in records[warmup:]),
            "first_step_s": records[0]["step_time_s"], "micro_batch_size": micro}


def estimate_stages(recipe, teacher, student, env, device_name: str, table=None, calibrate: bool = True,
                    workdir=None) -> list[dict]:
    """Per stage: seconds per optimiser step and the stage's wall time on this device (and world size): from `table`
    (a bench/kd_step.py result) where a row matches the stage exactly, else measured (`calibrate_stage`)."""
    import tempfile

    from gendistill.distill.trainer import micro_batch, total_steps

    model = model_key(teacher, student)
    out, measured = [], {}
    with tempfile.TemporaryDirectory(prefix="gendistill-estimate.", dir=workdir) as tmp:
        for stage in recipe.stages:
            micro = micro_batch(stage, env.world)
            per_process = stage.batch_size // env.world // micro  # micro-batches per step on each process
            key = stage_key(stage, model, device_name, env.world, micro)
            row = table_lookup(table, key) if table else None
            entry = {"stage": stage.name, "steps": total_steps(stage), "micro_batches_per_step": per_process,
                     "scored_budget": stage.count == "scored"}
            if row is not None:
                micro_s = micro * stage.seq_len / row["tokens_per_s"]
                entry.update(source=f"table {table}", micro_step_s=micro_s, first_step_s=row.get("first_step_s"))
            elif calibrate:
                signature = repr(sorted((k, repr(v)) for k, v in key.items()))
                if signature not in measured:
                    measured[signature] = calibrate_stage(stage, student, teacher, env, tmp)
                entry.update(source="calibrated", **measured[signature])
            else:
                entry.update(source=None, micro_step_s=None)
            if entry.get("micro_step_s") is not None:
                entry["step_s"] = entry["micro_step_s"] * per_process
                entry["seconds"] = entry["step_s"] * entry["steps"]
                entry["tokens_per_s"] = stage.batch_size * stage.seq_len / entry["step_s"]
            out.append(entry)
    return out


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
