"""The GenDistill loop: `run_recipe` runs a recipe's stages in order; `train_stage` trains one stage.

One step of a stage, for every micro-batch this process owns:
    teacher pass (no grad; hooks capture what the terms need) -> StudentObjective(batch, teacher_out) -> backward
then clip, optimiser and scheduler step, one metrics line, maybe a checkpoint. The global batch (`batch_size`
sequences) is fixed; micro-batch j of step s is always the same sequences and process r owns micro-batches
r, r + world, ..., so the loss curve does not depend on the number of processes.

Outputs of a run (`out_dir`; every path inside is relative, so the directory can be moved or copied):
    recipe.yaml                       the resolved recipe
    run.json                          the run record: a fingerprint of everything each stage depends on (resolved
                                      recipe, teacher/student weight and tokenizer hashes, data file hashes), the
                                      history of starts/resumes, the conversion step, and when done the summary
    convert/model/, convert/convert.json
                                      the conversion step (a `student: {convert: ...}` recipe): the initial student
                                      converted from the teacher (HF format + tokenizer) and its record
    NN-<stage>/model/                 the finished stage's student (HF format, safetensors) + tokenizer
    NN-<stage>/metrics.jsonl          one line per logged step
    NN-<stage>/checkpoints/step-N/    resumable state (latest `keep_checkpoints`), with state.pt's sha256
    NN-<stage>/stage.json             summary with the model files' sha256; its presence marks the stage as done
    .gendistill, .gendistill.lock     the marker (`--overwrite` deletes only marked directories) and the run's lock
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml
from torch.profiler import record_function  # names the step's phases in a profile (bench/profiling.py)

from gendistill.distill import checkpoint, parallel
from gendistill.distill.data import (DataSource, PackedStream, TokenCorpus, build_corpus, local_files, source_paths,
                                     cached_corpus_dir, detect_kind)
from gendistill.distill.losses import (ALIGN_TERMS, LINEAR, HeadLoss, StudentObjective, TeacherCapture,
                                       teacher_topk)
from gendistill.distill.recipe import (Recipe, Stage, load_data_source, load_recipe, load_stage, recipe_to_dict,
                                       resolve_callable)
from gendistill.hub import write_student_files
from gendistill.io import (DirLock, UserError, atomic_dir, atomic_write_json, atomic_write_text, check_deletable,
                           check_model_ref, contents, is_marked, mark_dir, remove_tree, sha256_file)


class TrainingDiverged(UserError):
    """A loss term or the gradient norm became NaN/Inf; the run stops, the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------------------------------
# models and tokenizer from recipe specs

def load_model(spec: dict, *, teacher=None, role: str = "model"):
    """Build a model from a recipe spec: {path, dtype} | {config, seed} | {factory, kwargs} | {convert} (student).
    A checkpoint is read by `gendistill.loading.load_model`, like every other command's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import gendistill.modeling  # noqa: F401  (registers HybridKDA with the Auto classes, for `config:` specs)
    from gendistill.loading import load_model as load_checkpoint

    try:
        if "path" in spec:
            return load_checkpoint(spec["path"], dtype=spec.get("dtype", "auto"), role=role)
        if "config" in spec:
            config = dict(spec["config"] or {})
            if "model_type" not in config:
                raise UserError(f"{role}.config needs a model_type (e.g. qwen3)")
            torch.manual_seed(int(spec.get("seed", 0)))
            return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
        if "factory" in spec:
            return resolve_callable(spec["factory"], f"{role}.factory")(**(spec.get("kwargs") or {}))
        if "convert" in spec:
            from gendistill.convert import convert

            return convert(teacher, **(spec["convert"] or {}))
    except UserError:
        raise
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise UserError(f"could not build the {role} from {spec}: {type(err).__name__}: {err}") from err
    raise UserError(f"{role}: unsupported spec {spec}")


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    spec = recipe.tokenizer
    if spec is None:
        spec = next((s for s in (recipe.teacher, recipe.student) if s and "path" in s), None)
        if spec is None:
            raise UserError("tokenizer: required when neither the teacher nor the student is a directory/hub id")
    if "factory" in spec:
        return resolve_callable(spec["factory"], "tokenizer.factory")(**(spec.get("kwargs") or {}))
    check_model_ref(spec["path"], "tokenizer", need_tokenizer=True, need_config=False)
    try:
        return AutoTokenizer.from_pretrained(spec["path"])
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the tokenizer from {spec['path']!r}: {err}") from err


# ----------------------------------------------------------------------------------------------------------------
# stage setup helpers

def trainable_groups(student, groups: str | list[str], freeze=()) -> dict[str, int]:
    """Freeze everything outside `groups` ("all" or a list) and everything in `freeze`; return the trained parameter
    counts per group (`modeling.PARAMETER_GROUPS`). A parameter is in its group and in any overlapping group
    (`modeling.block_groups`: attention_block). A listed group the student does not have (e.g. kda in a plain Qwen3)
    or a selection that trains nothing is a UserError."""
    from gendistill.modeling import PARAMETER_GROUPS, block_groups, parameter_group

    present, trained = set(), {g: 0 for g in PARAMETER_GROUPS}
    for name, param in student.named_parameters():
        group = parameter_group(student, name)
        member = (group, *block_groups(student, name))
        trains = (groups == "all" or any(g in groups for g in member)) and not any(g in freeze for g in member)
        param.requires_grad_(trains)
        present.update(member)
        trained[group] += param.numel() if trains else 0
    empty = [g for g in (list(groups) if groups != "all" else []) + list(freeze) if g not in present]
    if empty:
        raise UserError(f"parameter group(s) {empty} match no parameter of the student ({type(student).__name__}); "
                        f"non-empty groups: {sorted(present)}")
    if not any(trained.values()):
        raise UserError(f"train {groups} minus freeze {list(freeze)} leaves no parameter of the student to train")
    return {g: n for g, n in trained.items() if n}


def _all_groups(student) -> list[str]:
    from gendistill.modeling import parameter_group

    return sorted({parameter_group(student, n) for n, _ in student.named_parameters()})


def align_layers(stage: Stage, student) -> list[int]:
    if not any(t in stage.objective for t in ALIGN_TERMS):
        return []
    types = list(getattr(student.config, "layer_types", None) or [])
    n = student.config.num_hidden_layers
    if stage.layers == "linear":
        layers = [i for i, t in enumerate(types) if t == LINEAR]
        if not layers:
            raise UserError(f"stage {stage.name}: `layers: linear` but the student ({type(student).__name__}) has no "
                            "KDA layers; convert it first or list the layers to align")
    elif stage.layers == "all":
        layers = list(range(n))
    else:
        bad = [i for i in stage.layers if i >= n]
        if bad:
            raise UserError(f"stage {stage.name}.layers: {bad} out of range (the student has {n} layers)")
        layers = sorted(set(stage.layers))
    not_kda = [i for i in layers if i >= len(types) or types[i] != LINEAR]
    if "qk_align" in stage.objective and not_kda:
        raise UserError(f"stage {stage.name}: qk_align aligns KDA layers' q/k with the teacher's; layers {not_kda} of "
                        "the student are not KDA (use `layers: linear`)")
    return layers


def lr_factor(step: int, total: int, stage: Stage) -> float:
    """Multiplier of `lr` for update `step` (0-based) of `total`: linear warmup, then constant / cosine / wsd."""
    warm = int(round(stage.warmup * total))
    if step < warm:  # 1/(w+1), ..., w/(w+1), then 1: no wasted zero-lr step
        return (step + 1) / (warm + 1)
    low = stage.min_lr_ratio
    if stage.schedule == "constant":
        return 1.0
    if stage.schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, int(round(stage.decay * total))) if stage.decay > 0 else 0  # wsd: stable, then linear
    start = total - decay_steps                                                      # decay to `low` at the end
    if step < start or decay_steps == 0:
        return 1.0
    return 1.0 - (1 - low) * min(1.0, (step - start + 1) / decay_steps)


def total_steps(stage: Stage) -> int:
    """Steps from `steps` or a packed-token budget; for a `count: scored` budget a lower bound (`stage_steps` is
    exact: it needs the data)."""
    return stage.steps or max(1, math.ceil(stage.tokens / (stage.batch_size * stage.seq_len)))


def stage_steps(stage: Stage, corpus: TokenCorpus) -> int:
    """The stage's optimiser steps on `corpus`; with `count: scored`, the fewest steps whose loss-masked tokens reach
    the `tokens` budget. Exact, since the packed stream is a pure function of the corpus, seq_len and stage seed."""
    if stage.count != "scored":
        return total_steps(stage)
    position = scored_position(stage_stream(stage, corpus), stage.tokens)
    return max(1, math.ceil(position / (stage.batch_size * stage.seq_len)))


def stage_stream(stage: Stage, corpus: TokenCorpus) -> PackedStream:
    """The packed stream a stage reads: its documents' order is seeded by the stage (seed and name)."""
    return PackedStream(corpus, stage.seq_len, _stream_seed(stage), stage.loss_mask,
                        shuffle=corpus.meta["source"].get("shuffle", True), packing=stage.packing)


def scored_position(stream: PackedStream, budget: int) -> int:
    """The stream position at which the scored tokens reach `budget`. Window k reads positions kL..kL+L and scores
    position p (as the target of p-1) unless p opens a document or, completion_only, p is a prompt token; windows
    0..N-1 thus score exactly the positions 1..NL. Per-document counts, then one search in the last epoch."""
    corpus, first = stream.corpus, stream.corpus.offsets[:-1]
    if stream.completion_only:
        per_doc = np.add.reduceat(corpus.assistant, first, dtype=np.int64) - corpus.assistant[first]
    else:
        per_doc = stream.lengths - 1
    per_epoch = int(per_doc.sum())
    if per_epoch == 0:
        why = "no assistant token after a document start" if stream.completion_only else "one-token documents"
        raise UserError(f"data source {corpus.meta['source'].get('path')!r} has no token to score ({why})")
    epoch, rest = divmod(int(budget), per_epoch)
    if rest == 0:
        epoch, rest = epoch - 1, per_epoch
    order, starts = stream._epoch(epoch)
    cumulative = np.cumsum(per_doc[order])
    d = int(np.searchsorted(cumulative, rest))  # the document holding the budget's last scored token
    k = rest - (int(cumulative[d - 1]) if d else 0)  # its k-th scored token (k >= 1)
    doc = int(order[d])
    within = k
    if stream.completion_only:
        lo, hi = int(corpus.offsets[doc]), int(corpus.offsets[doc + 1])
        within = int(np.flatnonzero(corpus.assistant[lo + 1:hi])[k - 1]) + 1
    return epoch * corpus.num_tokens + int(starts[d]) + within


def sized_corpus(source: DataSource, tokenizer, cache_dir, stages: list[Stage], env: parallel.Env) -> TokenCorpus:
    """The tokenised source, long enough for every stage in `stages` without wrapping into a second epoch early.
    A scored budget's length in packed tokens is known only from the data: tokenise, count, grow if short."""
    need = max(total_steps(s) * s.batch_size * s.seq_len + 1 for s in stages)
    for _ in range(8):
        corpus = prepare_corpus(source, tokenizer, cache_dir, need, env)
        exact = max(stage_steps(s, corpus) * s.batch_size * s.seq_len + 1 for s in stages)
        if corpus.meta["exhausted"] or corpus.num_tokens >= exact:
            return corpus
        need = math.ceil(exact * 1.1)  # the scored share of a longer prefix differs a little
    return corpus


def micro_batch(stage: Stage, world: int) -> int:
    if stage.batch_size % world:
        raise UserError(f"stage {stage.name}.batch_size: {stage.batch_size} sequences cannot be split over {world} "
                        "processes")
    m = stage.micro_batch_size or max(k for k in range(1, 9) if (stage.batch_size // world) % k == 0)
    if stage.batch_size % (m * world):
        raise UserError(f"stage {stage.name}.micro_batch_size: {m} x {world} processes does not divide batch_size "
                        f"{stage.batch_size}")
    return m


def build_objective(stage: Stage, student, teacher, layers: list[int]):
    """(StudentObjective, TeacherCapture or None) for a stage: what the loop calls for every micro-batch."""
    capture = None
    if stage.needs_teacher:
        capture = TeacherCapture(teacher, mixer_layers=layers if "attn_align" in stage.objective else (),
                                 block_layers=layers if "hidden_align" in stage.objective else (),
                                 need_hidden="kd" in stage.objective,
                                 qk_layers=layers if "qk_align" in stage.objective else (),
                                 inference_mode=stage.teacher_inference_mode)
    head = HeadLoss(weights={t: w for t, w in stage.objective.items() if t in ("kd", "ce")},
                    divergence=stage.divergence, beta=stage.jsd_beta, temperature=stage.temperature,
                    chunk_tokens=stage.chunk_tokens, kernel=stage.kd_kernel)
    return StudentObjective(student, stage.objective, layers, head), capture


def compile_blocks(stage: Stage, student, teacher) -> Callable[[], None]:
    """`stage.compile`: torch.compile the forward of every decoder layer of the student and (if the stage runs it)
    the teacher, in place, and of the student's token mixers where the alignment terms call them directly. Regional
    compilation: one compiled graph serves every layer of a kind, so compile time does not grow with depth, and the
    model-level code (masks, packed-document boundaries, which syncs with the device) stays eager. fla's kernels are
    `torch.compiler.disable`d: graphs break around them. Returns the function that undoes it (the teacher outlives
    the stage)."""
    if not stage.compile:
        return lambda: None
    backend = "inductor" if stage.compile is True else stage.compile
    mixers = any(t in stage.objective for t in ("attn_align", "qk_align"))
    patched = []
    for model, with_mixers in ((student, mixers), (teacher if stage.needs_teacher else None, False)):
        for layer in model.model.layers if model is not None else ():
            for module in (layer, layer.self_attn) if with_mixers else (layer,):
                module.forward = torch.compile(module.forward, backend=backend)
                patched.append(module)

    def restore():
        for module in patched:
            del module.forward  # the instance attribute: the class's forward again
    return restore


def _teacher_pass(stage: Stage, capture: TeacherCapture | None, topk_cache, step: int, batches: list[dict],
                  indices: list[int], device) -> list[dict]:
    """What the objective reads from the teacher for `batches` (micro-batches `indices` of step `step`): one
    forward for all of them (`teacher_batch_size`), or none when the sparse teacher is cached and the objective
    needs nothing else from it."""
    if capture is None:
        return [{} for _ in batches]
    cached = [topk_cache.load(step, j, device) if topk_cache is not None else None for j in indices]
    only_kd = set(stage.objective) & {"attn_align", "qk_align", "hidden_align"} == set()
    run = [i for i, c in enumerate(cached) if c is None or not only_kd]
    outs = [{"topk": c} if c is not None else {} for c in cached]
    for i, out in zip(run, capture.run_many([batches[i] for i in run]) if run else []):
        if stage.kd_topk and cached[i] is None:
            mask = batches[i]["loss_mask"]
            topk = teacher_topk(out["hidden"][mask], out["head"], stage.kd_topk, stage.temperature,
                                stage.chunk_tokens)
            if topk_cache is not None:
                topk_cache.save(step, indices[i], topk)
            out = {**out, "topk": topk}
        outs[i] = {**out, **outs[i]}
    for out, batch, j in zip(outs, batches, indices):
        if "topk" in out and len(out["topk"].ids) != int(batch["loss_mask"].sum()):
            raise UserError(f"stage {stage.name}: the teacher cache holds {len(out['topk'].ids)} tokens for step "
                            f"{step + 1}, micro-batch {j}, which scores {int(batch['loss_mask'].sum())}; delete "
                            f"{topk_cache.directory}")
    return outs


def topk_cache_for(stage: Stage, teacher, corpus: TokenCorpus, micro: int, precision, env: parallel.Env):
    """The stage's TopKCache (`teacher_cache` with `kd_topk`), keyed by everything the cached numbers depend on."""
    if not (stage.kd_topk and stage.teacher_cache):
        return None
    from gendistill.distill.teacher_cache import TopKCache, corpus_sha256

    fingerprint = {"teacher.weights.sha256": weights_sha256(teacher), "teacher.dtype": str(precision),
                   "corpus.sha256": corpus_sha256(corpus), "seq_len": stage.seq_len, "stream_seed": _stream_seed(stage),
                   "shuffle": corpus.meta["source"].get("shuffle", True), "loss_mask": stage.loss_mask,
                   "batch_size": stage.batch_size, "micro_batch_size": micro, "kd_topk": stage.kd_topk,
                   "temperature": stage.temperature}
    cache = TopKCache(stage.teacher_cache, fingerprint, write_manifest=env.is_main)
    parallel.barrier(env)
    return cache


@torch.no_grad()
def stage_loss(stage: Stage, student, teacher, batch: dict) -> dict[str, float]:
    """A stage's objective on one batch, without an update (held-out checks): {"loss": total, term: value}."""
    objective, capture = build_objective(stage, student, teacher, align_layers(stage, student))
    try:
        norms = {"tokens": float(batch["loss_mask"].sum()), "world": 1,
                 "align": float(batch["token_mask"].sum()) * max(1, len(objective.align_layers))}
        loss, terms = objective(batch, capture.run(batch) if capture else {}, norms)
    finally:
        if capture is not None:
            capture.close()
    return {"loss": float(loss), **{k: float(v) for k, v in terms.items()}}


def _decay_split(named_params, no_decay):
    from gendistill.modeling import no_weight_decay

    decay, skip = [], []
    for name, param in named_params:
        excluded = no_weight_decay(name) if no_decay == "auto" else any(s in name for s in no_decay)
        (skip if excluded else decay).append(param)
    return decay, skip


def _stream_seed(stage: Stage) -> int:
    return zlib.crc32(f"{stage.seed}:{stage.name}".encode())


class _Logger:
    """metrics.jsonl (+ TensorBoard if installed, + tqdm) on the main process only."""

    def __init__(self, stage_dir: Path, stage: Stage, start: int, total: int, enabled: bool, progress: bool,
                 tensorboard: bool, banner: str):
        self.enabled, self.path = enabled, stage_dir / "metrics.jsonl"
        self.bar = self.tb = None
        if not enabled:
            return
        if progress:
            print(banner, file=sys.stderr, flush=True)
        if self.path.exists():  # drop lines logged after the checkpoint we resume from
            kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= start]
            atomic_write_text(self.path, "".join(l + "\n" for l in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(stage_dir / "tb"), purge_step=start + 1)
            except Exception:  # tensorboard not installed
                self.tb = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=start, desc=stage.name, unit="step", dynamic_ncols=True)

    def log(self, record: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step",):
                    self.tb.add_scalar(f"{record['stage']}/{key}", value, record["step"])

    def progress(self, record: dict):
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------------------------
# one stage

def train_stage(stage: Stage | dict, student, *, teacher=None, tokenizer=None, data=None, out_dir: str | Path,
                resume: bool = False, cache_dir: str | Path | None = None, parallel_strategy: str = "auto",
                progress: bool = True, tensorboard: bool = True, on_step: Callable | None = None,
                env: parallel.Env | None = None, save: bool = True) -> dict:
    """Train `student` (in place) for one stage and write `out_dir` (model/, metrics.jsonl, checkpoints/, stage.json).

    stage: a Stage or a stage mapping as in a recipe (its `data` key is ignored: `data` says what to train on).
    data: a DataSource / path / source mapping (tokenised and cached under `cache_dir`) or a TokenCorpus.
    on_step(stage_name, step, record): called after each step (after its checkpoint, if any); may raise to stop.
    save=False writes no checkpoint and no model dir (benchmarks): only metrics.jsonl and stage.json.
    Returns the stage summary (also written to stage.json).
    """
    env = env or parallel.setup()
    out_dir = Path(out_dir)
    if isinstance(stage, dict):
        stage = load_stage(stage)
    if data is None:
        raise UserError(f"stage {stage.name}: no data given")
    if stage.needs_teacher and teacher is None:
        raise UserError(f"stage {stage.name}: objective {sorted(stage.objective)} needs a teacher")
    if isinstance(data, TokenCorpus):
        corpus = data
    else:
        if tokenizer is None:
            raise UserError(f"stage {stage.name}: a tokenizer is needed to tokenise the data")
        source = data if isinstance(data, DataSource) else load_data_source(data, f"stage {stage.name}.data")
        corpus = sized_corpus(source, tokenizer, cache_dir or out_dir / "token_cache", [stage], env)
    if stage.loss_mask == "completion_only" and corpus.kind != "chat":
        raise UserError(f"stage {stage.name}: loss_mask completion_only needs chat data (records with `messages`); "
                        f"the data source {corpus.meta['source']['path']!r} holds plain text")
    stage_groups = trainable_groups(student, stage.train, stage.freeze)
    layers = align_layers(stage, student)
    steps, micro = stage_steps(stage, corpus), micro_batch(stage, env.world)
    if teacher is not None and stage.needs_teacher and teacher.config.vocab_size != student.config.vocab_size:
        raise UserError(f"stage {stage.name}: teacher vocabulary ({teacher.config.vocab_size}) differs from the "
                        f"student's ({student.config.vocab_size})")
    return _train(stage, student, teacher, tokenizer, corpus, out_dir, resume, parallel_strategy, progress,
                  tensorboard, on_step, env, stage_groups, layers, steps, micro, save)


def prepare_corpus(source: DataSource, tokenizer, cache_dir, min_tokens: int, env: parallel.Env) -> TokenCorpus:
    """Tokenise on the main process, then everyone memory-maps the cache. The others wait by watching the cache
    rather than in a collective, so a long tokenisation cannot hit the process group's timeout (if the main process
    fails, torchrun stops them)."""
    kind = detect_kind(source) if source.kind == "auto" else source.kind
    directory = cached_corpus_dir(source, kind, tokenizer, cache_dir)
    if env.is_main:
        build_corpus(source, kind, tokenizer, cache_dir, min_tokens)
    else:
        while not _cache_ready(directory, min_tokens):
            time.sleep(1.0)
    parallel.barrier(env)
    return TokenCorpus(directory)


def _cache_ready(directory: Path, min_tokens: int) -> bool:
    try:
        corpus = TokenCorpus(directory)
    except (OSError, ValueError):  # not there yet, or being replaced
        return False
    return corpus.meta["exhausted"] or corpus.num_tokens >= min_tokens


def _train(stage, student, teacher, tokenizer, corpus, out_dir, resume, strategy, progress, tensorboard, on_step,
           env, groups, layers, steps, micro, save) -> dict:
    device = env.device
    use_bf16 = stage.precision == "bf16" or (stage.precision == "auto" and device.type == "cuda")
    torch.manual_seed(stage.seed)

    student.to(device=device, dtype=torch.float32).train()
    if stage.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if stage.needs_teacher:
        teacher.to(device=device, dtype=torch.bfloat16 if use_bf16 else torch.float32).eval().requires_grad_(False)
    if stage.kd_kernel != "chunked" and device.type != "cuda":
        raise UserError(f"stage {stage.name}: kd_kernel {stage.kd_kernel} runs Liger-Kernel's Triton kernels, which "
                        f"need a CUDA GPU (this process runs on {device.type}); use kd_kernel: chunked")
    objective, capture = build_objective(stage, student, teacher, layers)
    model = parallel.wrap(objective, env, strategy, find_unused=bool(layers))
    topk_cache = topk_cache_for(stage, teacher, corpus, micro, torch.bfloat16 if use_bf16 else torch.float32, env)
    if stage.teacher_batch_size is not None and stage.teacher_batch_size % micro:
        raise UserError(f"stage {stage.name}.teacher_batch_size: {stage.teacher_batch_size} is not a multiple of the "
                        f"micro-batch size {micro}")
    per_teacher = (stage.teacher_batch_size or micro) // micro  # micro-batches per teacher forward

    named = [(n.removeprefix("student."), p) for n, p in parallel.unwrap(model).named_parameters() if p.requires_grad]
    decay, no_decay = _decay_split(named, stage.no_decay)
    params = decay + no_decay
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": stage.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=stage.lr, betas=tuple(stage.betas), eps=stage.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, stage))

    start = 0
    last, state = checkpoint.load_latest(out_dir) if resume else (None, None)
    if last is not None:
        changed = sorted(k for k, v in stage.math_keys().items() if state["stage"].get(k) != v)
        if changed:
            raise UserError(f"stage {stage.name}: cannot resume from {last}: the recipe changed {changed} since the "
                            f"checkpoint was written (restore them, or retrain the stage with --from-stage "
                            f"{stage.name})")
        parallel.load_full_state(model, optimizer, state["model"], state["optimizer"], env)
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"])
        start = state["step"]
    elif env.is_main:  # a fresh start: no stale metrics or checkpoints from an older attempt
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(out_dir / "tb", ignore_errors=True)
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    parallel.barrier(env)

    stream = stage_stream(stage, corpus)
    frozen = sorted(set(_all_groups(student)) - set(groups))
    banner = (f"stage {stage.name}: {'+'.join(f'{w:g}*{t}' for t, w in stage.objective.items())}, "
              f"{stage.loss_mask} tokens, {steps} steps x {stage.batch_size} x {stage.seq_len}; trains "
              + ", ".join(f"{g} ({n / 1e6:.2f}M)" for g, n in groups.items()) + f"; frozen: {', '.join(frozen) or '-'}"
              + (f"; resuming at step {start}" if start else ""))
    logger = _Logger(out_dir, stage, start, steps, env.is_main, progress, tensorboard, banner)
    n_micro = stage.batch_size // micro
    mine = list(range(env.rank, n_micro, env.world))
    tokens_per_step = stage.batch_size * stage.seq_len
    term_names = list(stage.objective)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    record, first_loss, t_stage, scored = None, None, time.perf_counter(), 0
    last_good = last
    if last is not None:  # a resumed stage reports its whole history
        record = json.loads((last / "trainer_state.json").read_text())
        scored = record.get("scored_tokens_total", 0)
        lines = (out_dir / "metrics.jsonl").read_text().splitlines() if (out_dir / "metrics.jsonl").exists() else []
        first_loss = json.loads(lines[0])["loss"] if lines else None
    uncompile = compile_blocks(stage, student, teacher)
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            host = [stream.batch(step * stage.batch_size + j * micro, micro) for j in mine]
            # Counted on the host: reading counts back from the GPU would wait for the previous step's kernels.
            counts = torch.tensor([sum(int(b["loss_mask"].sum()) for b in host),
                                   sum(int(b["token_mask"].sum()) for b in host)], dtype=torch.float64)
            if env.world > 1:  # NCCL sums device tensors
                counts = parallel.all_sum(env, counts.to(device)).cpu()
            batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()} for b in host]
            norms = {"tokens": float(counts[0]), "align": float(counts[1]) * max(1, len(layers)), "world": env.world}
            local = torch.zeros(1 + len(term_names), dtype=torch.float64, device=device)
            teacher_outs = []
            for k, batch in enumerate(batches):
                with parallel.no_sync(model, k < len(batches) - 1), autocast:
                    if k % per_teacher == 0:  # the teacher's pass for this micro-batch and the next per_teacher - 1
                        with record_function("gendistill.teacher"):
                            teacher_outs = _teacher_pass(stage, capture, topk_cache, step, batches[k:k + per_teacher],
                                                         mine[k:k + per_teacher], device)
                    teacher_out = teacher_outs[k % per_teacher]
                    with record_function("gendistill.student"):
                        loss, terms = model(batch, teacher_out, norms)
                teacher_outs[k % per_teacher] = None  # freed as soon as used
                with record_function("gendistill.backward"):
                    loss.backward()
                local += torch.stack([loss.detach().double()] + [terms[t].double() for t in term_names])
            values = (parallel.all_sum(env, local) / env.world).tolist()  # terms carry x world for the grad mean
            bad = [name for name, v in zip(term_names + ["loss"], values[1:] + values[:1]) if not math.isfinite(v)]
            if bad:  # name the term that broke (the total is only non-finite because of it)
                raise TrainingDiverged(f"stage {stage.name}, step {step + 1}: loss term {bad[0]!r} is not finite "
                                       f"({dict(zip(['loss'] + term_names, values))}); nothing from this step was "
                                       f"saved, last good checkpoint: {last_good}. {_retry_hint(stage)}")
            with record_function("gendistill.optimizer"):
                grad_norm = torch.nn.utils.clip_grad_norm_(params, stage.grad_clip or float("inf"))
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if not math.isfinite(grad_norm):
                raise TrainingDiverged(f"stage {stage.name}, step {step + 1}: gradient norm is {grad_norm} (loss "
                                       f"{values[0]}); last good checkpoint: {last_good}. {_retry_hint(stage)}")
            lr = optimizer.param_groups[0]["lr"]
            with record_function("gendistill.optimizer"):
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            elapsed = time.perf_counter() - t0
            scored += int(counts[0])
            record = {"stage": stage.name, "step": step + 1, "tokens": (step + 1) * tokens_per_step,
                      "loss": values[0], **{f"loss/{t}": v for t, v in zip(term_names, values[1:])},
                      "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / elapsed,
                      "step_time_s": elapsed, "scored_tokens": int(counts[0]), "scored_tokens_total": scored}
            first_loss = values[0] if first_loss is None else first_loss
            if (step + 1) % stage.log_every == 0 or step + 1 == steps:
                logger.log(record)
            logger.progress(record)
            if save and ((stage.checkpoint_every and (step + 1) % stage.checkpoint_every == 0) or step + 1 == steps):
                last_good = _save_checkpoint(out_dir, step + 1, stage, model, optimizer, scheduler, record, env)
            if on_step is not None:
                on_step(stage.name, step + 1, record)
    finally:
        logger.close()
        uncompile()
        if capture is not None:
            capture.close()

    model_dir = out_dir / "model"
    summary = {"stage": stage.name, "steps": steps, "tokens": steps * tokens_per_step, "scored_tokens": scored,
               "model_dir": str(model_dir) if save else None, "trainable": groups, "aligned_layers": layers,
               "first_loss": first_loss, "final": record, "train_time_s": time.perf_counter() - t_stage,
               "resumed_from_step": start or None, "world_size": env.world,
               "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    model_state = parallel.full_state(model, None, env)[0] if save else None
    if env.is_main and save:
        state = {k.removeprefix("student."): v for k, v in model_state.items()}
        if getattr(student.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to the embedding (FSDP's full state dict holds a copy)
        with atomic_dir(model_dir, overwrite=True) as tmp:
            student.save_pretrained(tmp, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        if stage.eval is not None:
            result = resolve_callable(stage.eval, f"stage {stage.name}.eval")(str(model_dir), **stage.eval_args)
            summary["eval"] = result
            if result is not None:
                atomic_write_json(out_dir / "eval.json", result)
        # model code + auto_map, gendistill.json, README.md; paths relative, as in stage.json (the run can move)
        write_student_files(model_dir, student, stage={**summary, "model_dir": "model"})
    if env.is_main:  # on disk the model dir is relative (the run directory can move) and carries its checksums
        atomic_write_json(out_dir / "stage.json", {**summary, "model_dir": "model" if save else None,
                                                   "model_files": model_checksums(model_dir) if save else None})
    parallel.barrier(env)
    return summary


def _retry_hint(stage: Stage) -> str:
    return (f"To retry this stage with other settings (e.g. a lower lr), keeping the finished stages before it: "
            f"--set {stage.name}.lr=... --from-stage {stage.name}")


def model_checksums(model_dir: Path) -> dict[str, str]:
    """sha256 of a model directory's weight files (what a later stage or a resume checks before using them)."""
    return {p.name: sha256_file(p) for p in sorted(Path(model_dir).glob("*.safetensors"))}


def _save_checkpoint(out_dir, step, stage, model, optimizer, scheduler, record, env) -> Path | None:
    model_state, optim_state = parallel.full_state(model, optimizer, env)  # collective
    path = None
    if env.is_main:
        state = {"model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                 "rng": checkpoint.rng_state(), "step": step, "stage": stage.math_keys()}
        path = checkpoint.save(out_dir, step, state, record, keep=stage.keep_checkpoints)
    parallel.barrier(env)
    return path


# ----------------------------------------------------------------------------------------------------------------
# a whole recipe

def run_recipe(recipe_or_path, overrides=(), resume: bool = False, *, overwrite: bool = False,
               from_stage: int | str | None = None, allow_code: bool = False, teacher=None, student=None,
               tokenizer=None, on_step: Callable | None = None) -> dict:
    """Run every stage of a recipe (YAML path, dict or Recipe) and return the run summary (also run.json).

    resume: continue an interrupted run: finished stages are kept, the current one restarts from its newest intact
    checkpoint. Refused when anything a finished or started stage depends on changed (the message names it).
    from_stage: a stage number (1-based) or name: keep the stages before it (they must be unchanged), retrain it and
    every later stage with the recipe as it is now; recorded in run.json's history.
    overwrite: delete an existing out_dir first (only one gendistill created; never the current or home directory).
    allow_code: let the recipe name "module:function" code (factories, eval hooks) beyond gendistill's own.
    teacher/student/tokenizer: objects that replace the recipe's specs (the Python API for callers that already
    hold the models). Everything is validated (recipe, data, tokenizer, models) before anything is written.
    """
    recipe = load_recipe(recipe_or_path, list(overrides), allow_code)
    if overwrite and (resume or from_stage is not None):
        raise UserError("--overwrite starts over; it excludes --resume and --from-stage")
    start_at = None if from_stage is None else _stage_index(recipe, from_stage)
    continuing = resume or start_at is not None
    env = parallel.setup()
    out = Path(recipe.out_dir)
    record = _check_run_dir(out, continuing, overwrite, from_stage)

    # ---- checks (nothing written yet) ----
    kinds = {}
    for stage in recipe.stages:
        src = recipe.data[stage.data]
        if stage.data not in kinds:
            kinds[stage.data] = detect_kind(src) if src.kind == "auto" else src.kind
        if stage.loss_mask == "completion_only" and kinds[stage.data] != "chat":
            raise UserError(f"stage {stage.name}: loss_mask completion_only needs chat data (records with "
                            f"`{src.messages_field}`), but data source {stage.data!r} ({src.path}) holds plain text")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(recipe)
    chat = [s.name for s in recipe.stages if kinds[s.data] == "chat"]
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"stages {chat} train on chat data, but the tokenizer has no chat template; use a tokenizer "
                        "with one (e.g. the instruct model's) or set `tokenizer:` in the recipe")
    if teacher is None and recipe.teacher is not None:
        teacher = load_model(recipe.teacher, role="teacher")
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    converted = student is None and "convert" in recipe.student  # the run's conversion step (see convert_step)
    initial = student if student is not None else load_model(recipe.student, teacher=teacher, role=recipe.trained)
    for stage in recipe.stages:  # every stage's groups and layers exist in this architecture
        trainable_groups(initial, stage.train, stage.freeze)
        align_layers(stage, initial)
        micro_batch(stage, env.world)
        if stage.needs_teacher and teacher.config.vocab_size != initial.config.vocab_size:
            raise UserError(f"teacher vocabulary ({teacher.config.vocab_size}) differs from the student's "
                            f"({initial.config.vocab_size})")
        for role, model in (("student", initial), ("teacher", teacher if stage.needs_teacher else None)):
            limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            if limit and stage.seq_len > limit:
                raise UserError(f"stage {stage.name}.seq_len: {stage.seq_len} exceeds the {role}'s "
                                f"max_position_embeddings ({limit}); use seq_len <= {limit}")
    if len(tokenizer) > initial.config.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens but the student's vocabulary is "
                        f"{initial.config.vocab_size}")
    fingerprint = run_fingerprint(recipe, teacher, initial, tokenizer)
    keep = _kept_stages(out, recipe, record, fingerprint, resume, start_at)
    parallel.barrier(env)

    # ---- run: the directory locked, marked and recorded, then the stages ----
    lock, created = None, not out.exists()
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        lock = DirLock(out).acquire()  # refused: the directory is another run's (leave it as it is)
    try:
        if env.is_main:  # again, under the lock: another run may have used the directory since the first check
            _check_run_dir(out, continuing, overwrite, from_stage)
        return _run_stages(recipe, out, env, record, fingerprint, keep, continuing, start_at, created, kinds,
                           tokenizer, teacher, initial, on_step, converted)
    finally:
        if lock is not None:
            lock.release()


def _run_stages(recipe, out, env, record, fingerprint, keep, continuing, start_at, created, kinds, tokenizer,
                teacher, initial, on_step, converted) -> dict:
    if env.is_main:
        stage_dirs = _stage_dirs(out)
        if not continuing:  # a fresh start: out was checked deletable (marked, or empty)
            for child in contents(out):
                remove_tree(child)
        else:
            for index, path in stage_dirs.items():
                if index >= keep:  # --from-stage: the stages it retrains start afresh
                    remove_tree(path)
        mark_dir(out)
        history = (record or {}).get("history", []) + [{
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "mode": "from_stage" if start_at is not None else "resume" if continuing else "fresh",
            **({"from_stage": recipe.stages[start_at].name,
                "changed": _diff(record["fingerprint"], fingerprint, range(start_at, len(recipe.stages)))}
               if start_at is not None else {})}]
        record = {"recipe": recipe.name, "status": "running", "fingerprint": fingerprint, "history": history}
        atomic_write_json(out / "run.json", record)
        atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        if converted:  # the initial student on disk before any stage trains it (in place, in fp32)
            record["convert"] = convert_step(out, recipe, initial, tokenizer, fingerprint)
            atomic_write_json(out / "run.json", record)
    parallel.barrier(env)
    cache_dir = Path(recipe.cache_dir) if recipe.cache_dir else out / "token_cache"
    corpora = {}
    try:  # every data source tokenised (and each record checked) before the first step of the first stage
        for name in dict.fromkeys(s.data for s in recipe.stages):
            corpora[name] = sized_corpus(dataclasses.replace(recipe.data[name], kind=kinds[name]), tokenizer,
                                         cache_dir, [s for s in recipe.stages if s.data == name], env)
    except BaseException:  # e.g. a bad record: a fresh run this call created leaves nothing behind (a run dir
        if env.is_main and created and not _stage_dirs(out):  # that existed stays, marked and without stages,
            remove_tree(out)                                    # which a plain rerun starts afresh)
        raise
    results, previous = [], None
    for index, stage in enumerate(recipe.stages):
        stage_dir = out / f"{index + 1:02d}-{stage.name}"
        if continuing and (stage_dir / "stage.json").exists():
            results.append(finished_stage(stage_dir))
            previous = stage_dir / "model"
            continue
        if previous is None:
            current = initial
        else:
            current = load_model({"path": str(previous), "dtype": "float32"}, role="student")
        results.append(train_stage(stage, current, teacher=teacher, tokenizer=tokenizer, data=corpora[stage.data],
                                   out_dir=stage_dir, resume=continuing, parallel_strategy=recipe.parallel,
                                   progress=recipe.progress, tensorboard=recipe.tensorboard, on_step=on_step,
                                   env=env))
        previous = Path(results[-1]["model_dir"])
        del current
    summary = {"recipe": recipe.name, "out_dir": str(out), "final_model": str(previous), "stages": results,
               **({"converted_model": str(out / CONVERT_DIR / "model")} if converted else {})}
    if env.is_main:  # on disk, paths relative to the run directory
        atomic_write_json(out / "run.json", {
            **record, "status": "done", "final_model": str(previous.relative_to(out)),
            "stages": [{**r, "model_dir": f"{i + 1:02d}-{r['stage']}/model"} for i, r in enumerate(results)]})
    return summary


# ----------------------------------------------------------------------------------------------------------------
# the conversion step

CONVERT_DIR = "convert"


def convert_step(out: Path, recipe: Recipe, student, tokenizer, fingerprint: dict) -> dict:
    """Write the run's conversion step: `student` (converted from the teacher while the run was checked, so that its
    weights are in the fingerprint) as OUT/convert/model, a self-contained student directory with the tokenizer, and
    its record OUT/convert/convert.json; returns the record run.json keeps. A continued run keeps an intact copy of
    the same weights. Stage 1 then trains this student, whose conversion provenance its model card carries."""
    from gendistill.convert import save_student

    directory = out / CONVERT_DIR
    weights = fingerprint["stages"][0]["keys"][f"{recipe.trained}.weights.sha256"]
    teacher = recipe.teacher or {}
    entry = {"model_dir": f"{CONVERT_DIR}/model", "teacher": teacher.get("path") or teacher.get("factory"),
             "options": recipe.student["convert"] or {}, "attention_layers": list(student.config.attention_layers),
             "weights_sha256": weights}
    try:
        kept = json.loads((directory / "convert.json").read_text())
        intact = kept["weights_sha256"] == weights and kept["model_files"] == model_checksums(directory / "model")
    except (OSError, ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        start = time.perf_counter()
        with atomic_dir(directory / "model", overwrite=True) as tmp:
            save_student(student, tmp, tokenizer=tokenizer, provenance={
                "teacher": entry["teacher"], "attention_layers": entry["attention_layers"],
                "seed": entry["options"].get("seed", 0)})
        atomic_write_json(directory / "convert.json", {**entry, "model_dir": "model",
                                                      "model_files": model_checksums(directory / "model"),
                                                      "seconds": round(time.perf_counter() - start, 3)})
        print(f"[convert] {entry['teacher']} -> Hybrid-KDA student: attention layers {entry['attention_layers']} "
              f"-> {directory / 'model'}", file=sys.stderr, flush=True)
    student.name_or_path = str(directory / "model")  # stage 1's model card reads its provenance there
    return entry


# ----------------------------------------------------------------------------------------------------------------
# run directories: checks, fingerprints, finished stages

_STAGE_DIR = re.compile(r"^(\d{2,})-(.+)$")


def _stage_dirs(out: Path) -> dict[int, Path]:
    """{0-based stage index: NN-<name> directory} of the stages that were started in `out`."""
    found = {}
    if out.is_dir():
        for path in out.iterdir():
            match = _STAGE_DIR.match(path.name)
            if match and path.is_dir():
                found[int(match.group(1)) - 1] = path
    return found


def _stage_index(recipe: Recipe, ref: int | str) -> int:
    names = [s.name for s in recipe.stages]
    text = str(ref)
    if text in names:
        return names.index(text)
    if text.isdigit() and 1 <= int(text) <= len(names):
        return int(text) - 1
    raise UserError(f"--from-stage {ref}: expected a stage number 1..{len(names)} or a name ({', '.join(names)})")


def _check_run_dir(out: Path, continuing: bool, overwrite: bool, from_stage) -> dict | None:
    """Validate `out` for this kind of start (nothing written); return the run record of a run being continued."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out_dir {out} is a file, not a directory; set out_dir to a directory path")
    flag = "--resume" if from_stage is None else f"--from-stage {from_stage}"
    if continuing:
        if not out.is_dir():
            raise UserError(f"{flag}: there is no run directory {out} to continue; start the run without {flag}")
        try:
            record = json.loads((out / "run.json").read_text())
            record["fingerprint"]["stages"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{flag}: {out} is not a gendistill run directory (no valid run.json record; runs made "
                            "by older versions cannot be continued)") from None
        return record
    if not out.exists():
        return None
    if overwrite:
        check_deletable(out)
        return None
    if _stage_dirs(out) or (contents(out) and not is_marked(out)):
        raise UserError(f"output directory {out} already exists; pass --resume to continue it or --overwrite to "
                        "start over (or --from-stage N: keep its stages before N, retrain from N)")
    return None  # a marked run that never started a stage (e.g. stopped by a bad data record): start it afresh


def _flatten(value, prefix: str, into: dict) -> dict:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), into)
    else:
        into[prefix] = value
    return into


def weights_sha256(model) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, shapes and bytes), whatever it was loaded from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # the buffer, not a copy
    return h.hexdigest()


def _data_fingerprint(src) -> dict:
    spec = {k: v for k, v in dataclasses.asdict(src).items() if k != "path"}
    paths = source_paths(src)
    if paths is not None and all(p.exists() for p in paths):  # local files: their contents, wherever they are
        spec["files"], listed = {}, isinstance(src.path, list)
        for i, path in enumerate(paths):  # a `path` list: each entry's files under its index
            root = path if path.is_dir() else path.parent
            spec["files"].update({(f"{i}/" if listed else "") + str(f.relative_to(root)): sha256_file(f)
                                  for f in local_files(path)})
    else:
        spec["hub"] = src.path
        spec["revision"] = _hub_revision(src.path)
    return spec


def _hub_revision(dataset_id: str) -> str | None:
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(dataset_id).sha
    except Exception:  # offline, private, ...: unknown, and then not compared
        return None


def run_fingerprint(recipe: Recipe, teacher, student, tokenizer) -> dict:
    """What each stage depends on, as flat `key: value` pairs (`teacher.kwargs.seed`, `kd.lr`, `data.text.files.x`)."""
    from gendistill.tokenizer import tokenizer_fingerprint

    common = {"seed": recipe.seed, "tokenizer.sha256": tokenizer_fingerprint(tokenizer)}
    for role, spec, model in (("teacher", recipe.teacher, teacher), (recipe.trained, recipe.student, student)):
        _flatten({k: v for k, v in (spec or {}).items() if k != "path"}, role, common)
        if model is not None:
            common[f"{role}.weights.sha256"] = weights_sha256(model)
    data = {name: _flatten(_data_fingerprint(recipe.data[name]), f"data.{name}", {})
            for name in dict.fromkeys(s.data for s in recipe.stages)}
    stages = []
    for stage in recipe.stages:
        keys = _flatten(stage.math_keys(), stage.name, {})
        stages.append({"name": stage.name, "keys": {**common, **data[stage.data], **keys}})
    return {"stages": stages}


def _diff(old: dict, new: dict, indices) -> list[str]:
    """`key: old -> new` for every difference in the stages at `indices` (a missing stage counts as all-new)."""
    changes: dict[str, str] = {}  # keys shared by stages (teacher, data) are named once
    for i in indices:
        a = old["stages"][i]["keys"] if i < len(old["stages"]) else {}
        b = new["stages"][i]["keys"] if i < len(new["stages"]) else {}
        for key in dict.fromkeys([*a, *b]):
            if key.endswith(".revision") and (a.get(key) is None or b.get(key) is None):
                continue  # a hub revision that could not be looked up is not a change
            if a.get(key, "(unset)") != b.get(key, "(unset)"):
                changes.setdefault(key, f"{key}: {a.get(key, '(unset)')} -> {b.get(key, '(unset)')}")
    return list(changes.values())


def _kept_stages(out: Path, recipe: Recipe, record: dict | None, fingerprint: dict, resume: bool,
                 start_at: int | None) -> int:
    """How many leading stages of an existing run are kept; refuses (naming what changed) to continue a run whose
    kept stages were trained on anything else than this recipe, teacher, tokenizer and data."""
    if record is None:
        return 0
    old_names = [s["name"] for s in record["fingerprint"]["stages"]]
    if start_at is not None:
        keep = start_at
    else:
        started = _stage_dirs(out)
        keep = max(started) + 1 if started else 0
    check = range(keep)
    if any(i >= len(recipe.stages) or i >= len(old_names) or recipe.stages[i].name != old_names[i] for i in check):
        raise UserError(f"{out}: the recipe's stages {[s.name for s in recipe.stages]} do not continue the run's "
                        f"{old_names[:keep]}; run into a new out_dir")
    changes = _diff(record["fingerprint"], fingerprint, check)
    if changes:
        first = next(i for i in check if _diff(record["fingerprint"], fingerprint, [i]))
        what = "--resume" if start_at is None else f"--from-stage {recipe.stages[start_at].name}"
        raise UserError(
            f"{what}: {out} was trained with other settings than the recipe now gives for stages it keeps "
            f"({', '.join(old_names[:keep])}): {'; '.join(changes)}. Restore them, or retrain from the first stage "
            f"they affect with --from-stage {recipe.stages[first].name} (keeps the stages before it), or use a new "
            "out_dir")
    return keep


def finished_stage(stage_dir: Path) -> dict:
    """A finished stage's summary, its model checked against the checksums recorded when it finished."""
    summary = json.loads((stage_dir / "stage.json").read_text())
    model_dir = stage_dir / "model"
    recorded = summary.get("model_files")
    if recorded is not None:
        actual = model_checksums(model_dir)
        bad = sorted(name for name in set(recorded) | set(actual) if recorded.get(name) != actual.get(name))
        if bad:
            raise UserError(f"stage {summary['stage']}: {', '.join(bad)} in {model_dir} does not match the checksum "
                            "recorded when the stage finished (the file is damaged or was replaced); retrain it with "
                            f"--from-stage {summary['stage']}")
    return {**summary, "model_dir": str(model_dir)}
