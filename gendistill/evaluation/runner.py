"""`evaluate()`: score teacher and students on every task both ways and write an eval directory.

Layout of an eval directory (what `build_report` reads; several can be merged into one report):
  manifest.json                  models (name, role, group, source, tokenizer fingerprint), tasks, settings, the
                                 distillation run the students come from (optional)
  records/<model>/<task>.jsonl   one record per item (see scoring.score_task)
  lm_eval/<model>.json           lm-eval harness results, when `lm_eval_tasks` (--lm-eval) were asked for
  report.json / .md / .html      the report of this directory alone
The directory appears in one rename when everything is written (gendistill.io.atomic_dir). A task that fails for
a model (an exception while scoring it, or a code task refused without --allow-code-execution) does not stop the
others: it is listed in the manifest's `failed` ([{"model": name or null, "task", "error"}]) and has no records.
If the run itself is interrupted, the finished tasks' records and a manifest marked `"incomplete": true` are kept
in OUT.partial (a valid eval directory for `gendistill report`).
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from gendistill.evaluation.engine import Sampling
from gendistill.evaluation.recall import recall_task
from gendistill.evaluation.report import SAFE_NAME, build_report
from gendistill.evaluation.scoring import decode_modes, score_task
from gendistill.evaluation.tasks import (Task, build_context, choice_targets, is_lm_eval_ref, load_task_files,
                                        parse_task_list)
from gendistill.io import UserError, atomic_dir, atomic_write_json, atomic_write_text, check_model_ref, check_output_dir
from gendistill.tokenizer import tokenizer_fingerprint

DTYPES = ("float32", "bfloat16", "float16")


def _record_failure(failed: list[dict], model: str, task: str, err: BaseException) -> None:
    message = f"{type(err).__name__}: {err}"
    failed.append({"model": model, "task": task, "error": message[:2000]})
    print(f"[eval] {model}: {task} FAILED ({message[:300]}); the other tasks go on", file=sys.stderr, flush=True)
    if torch.cuda.is_available():  # an out-of-memory task leaves its blocks cached
        torch.cuda.empty_cache()


def _keep_partial(tmp: Path, out: Path, manifest: dict) -> None:
    """An interrupted run keeps what finished: OUT.partial with the records so far and an incomplete manifest."""
    if not any((tmp / "records").glob("*/*.jsonl")):
        return
    partial = out.with_name(out.name + ".partial")
    try:
        atomic_write_json(tmp / "manifest.json", {**manifest, "incomplete": True})
        shutil.rmtree(partial, ignore_errors=True)
        os.replace(tmp, partial)
        print(f"[eval] interrupted: the finished tasks' records are in {partial}", file=sys.stderr, flush=True)
    except OSError:
        pass


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def check_model_available(ref: str | os.PathLike, role: str = "model") -> None:
    """A local model directory (config and tokenizer), or a hub id ("Qwen/Qwen3-0.6B") whose config is cached or
    reachable: checked for every model before any is scored."""
    path = Path(ref)
    if path.exists() or not _HUB_ID.match(str(ref)):
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a model directory (no config.json)")
        check_model_ref(path, role, need_tokenizer=True)
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(ref))
    except (OSError, ValueError) as err:
        raise UserError(f"model {ref}: no such directory, and as a hub id it cannot be loaded "
                        f"(offline and not cached?): {str(err).splitlines()[0]}") from None


def load_model(path: str | os.PathLike, device: str | None = None, dtype: str = "float32", role: str = "model"):
    """The model (through `gendistill.loading.load_model`, as every command loads one) and its tokenizer, from a
    local directory with both or a hub id; on `device` (default: CUDA if present) in `dtype`."""
    from transformers import AutoTokenizer

    from gendistill.loading import load_model as load_checkpoint

    check_model_available(path, role)
    device = _check_device(device)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    model = load_checkpoint(path, dtype=dtype, device=device, role=role)
    tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(str(path)))
    return model, tokenizer


def _check_device(device: str | None) -> str:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {device!r}: use cpu or cuda (cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r}: CUDA is not available on this machine; use --device cpu")
    return device


def check_prompt_lengths(name: str, max_positions: int | None, tokenizer, tasks, limit: int | None) -> None:
    """Every prompt plus its longest answer (a choice, or max_new_tokens generated) fits the model's positions.
    Recall tasks longer than the model's positions are allowed (they measure extrapolation) with a warning."""
    if not max_positions:
        return
    for spec in tasks:
        if not isinstance(spec, Task):
            if spec[1] > max_positions:
                print(f"gendistill: warning: {spec[0]}@{spec[1]} is longer than {name}'s max_position_embeddings "
                      f"({max_positions}); scored anyway and marked in the manifest", file=sys.stderr)
            continue
        items = spec.items[:limit]
        if not items or spec.adapter is not None:  # lm-eval tasks bring their own prompts (lm-eval truncates them)
            continue
        prompts = tokenizer([build_context(spec, item, tokenizer) for item in items],
                            add_special_tokens=False)["input_ids"]
        for item, ids in zip(items, prompts):
            prompt, answer = len(ids), spec.max_new_tokens
            if spec.is_mc:
                choices = tokenizer(choice_targets(spec, item), add_special_tokens=False)["input_ids"]
                answer = max(answer, 1 + max(map(len, choices)))
            if prompt + answer > max_positions:
                raise UserError(f"task {spec.name}, item {item.get('id')!r}: the prompt ({prompt} tokens) plus its "
                                f"answer ({answer}) exceeds {name}'s max_position_embeddings ({max_positions}); "
                                "shorten the prompt or drop the item")


def resolve_tasks(refs: str | Sequence[str | Task], *, limit: int | None = None, lm_eval_include: Sequence[str] = (),
                  lm_eval_chat: bool = True, allow_code_execution: bool = False
                  ) -> tuple[list[Task | tuple[str, int]], list[dict]]:
    """Task files are loaded now, and lm-eval tasks (`lm-eval:NAME`, `paper`) with their datasets, so errors come
    before any model is loaded; recall tasks stay (family, length) until a tokenizer is known, since their lengths
    are counted in its tokens. Returns (tasks, refused): code tasks refused without `allow_code_execution`."""
    out: list = []
    lm_eval_refs: list[str] = []
    refs = [refs] if isinstance(refs, str) else list(refs)
    for ref in refs:
        if isinstance(ref, Task):
            out.append(ref)
            continue
        for parsed in parse_task_list(ref):
            if isinstance(parsed, tuple):
                out += [(parsed[0], length) for length in parsed[1]]
            elif is_lm_eval_ref(parsed):
                if not lm_eval_refs:
                    at = len(out)  # lm-eval tasks are built together (one TaskManager), run where the first was asked
                lm_eval_refs.append(parsed)
            else:
                out += load_task_files(parsed)
    refused: list[dict] = []
    if lm_eval_refs:
        from gendistill.evaluation.lmeval_tasks import build_lm_eval_tasks

        built, refused = build_lm_eval_tasks(lm_eval_refs, include=lm_eval_include, limit=limit, chat=lm_eval_chat,
                                             allow_code_execution=allow_code_execution)
        out[at:at] = built
    names = [t.name if isinstance(t, Task) else f"{t[0]}@{t[1]}" for t in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"task names must be unique; repeated: {duplicates}")
    if not out:
        raise UserError("; ".join(["no tasks to run"] + [r["error"] for r in refused]) if refused else "no tasks given")
    return out, refused


def _named_models(models, teacher) -> list[tuple[str, str, object]]:
    """[(name, role, ref)] with the teacher first; names from dict keys or directory names, made unique."""
    entries = []
    if teacher is not None:
        if isinstance(teacher, Mapping):
            (name, ref), = teacher.items()
        else:
            name = Path(teacher).resolve().name if isinstance(teacher, (str, os.PathLike)) else "teacher"
            ref = teacher
        entries.append((name, "teacher", ref))
    if isinstance(models, Mapping):
        items = list(models.items())
    elif isinstance(models, (str, os.PathLike, tuple)):
        items = [(None, models)]
    else:
        items = [(None, m) for m in models]
    for index, (name, ref) in enumerate(items):
        if name is None:  # resolved, so that "." or "run/model/" name the directory itself
            name = Path(ref).resolve().name if isinstance(ref, (str, os.PathLike)) else f"student{index + 1}"
        entries.append((str(name), "student", ref))
    bad = [name for name, _, _ in entries if not SAFE_NAME.match(name)]
    if bad:
        raise UserError(f"model names become directory names: use letters, digits and ._@- only, not {bad}")
    seen: dict[str, int] = {}
    unique = []
    for name, role, ref in entries:
        seen[name] = seen.get(name, 0) + 1
        unique.append((name if seen[name] == 1 else f"{name}-{seen[name]}", role, ref))
    if not any(role == "student" for _, role, _ in unique):
        raise UserError("no model to evaluate")
    return unique


def evaluate(models, teacher=None, tasks: str | Sequence[str | Task] = (), out: str | os.PathLike = "runs/eval", *,
             decode: str = "greedy", seeds: Sequence[int] = (1, 2, 3), sampling: Sampling = Sampling(),
             batch_size: int = 16, max_batch_tokens: int = 1 << 16, limit: int | None = None,
             recall_samples: int = 20, lm_eval_tasks: Sequence[str] = (), lm_eval_limit: int | None = None,
             lm_eval_chat_template: bool | None = None, lm_eval_include: Sequence[str] = (),
             allow_code_execution: bool = False, device: str | None = None, dtype: str = "float32",
             report: bool = True, overwrite: bool = False, progress: bool = True,
             groups: Mapping[str, str] | None = None, run: str | os.PathLike | None = None) -> dict:
    """Score `teacher` and `models` on `tasks` by log-likelihood and by generation; write the eval directory `out`
    and (with `report`) its report. `models`: {name: dir or (model, tokenizer)}, a list of dirs, or one.
    `teacher`: a dir, a (model, tokenizer) pair, {name: either}, or None (no retention numbers; a teacher evaluated
    in another eval directory can be merged in by `build_report`). `tasks`: task YAMLs / dirs / recall tasks /
    lm-eval tasks ("a.yaml,tasks/,niah_single@1k,4k,lm-eval:arc_challenge,paper") or Task objects; lm-eval tasks
    come from lm-eval's registry and the `lm_eval_include` folders, under the chat template unless
    `lm_eval_chat_template` is False; code tasks run only with `allow_code_execution`. `decode`: greedy | sample |
    both (sampling averages `seeds`). `lm_eval_tasks`: also run lm-eval's own harness on these (a raw cross-check
    table). Returns the report dict (or the manifest when `report` is False)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise UserError(f"limit {limit!r}: items per task must be at least 1 (leave it out for all items)")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    _check_device(device)
    check_output_dir(out, overwrite)
    resolved, refused = resolve_tasks(tasks, limit=limit, lm_eval_include=lm_eval_include,
                                      lm_eval_chat=lm_eval_chat_template is not False,
                                      allow_code_execution=allow_code_execution)
    entries = _named_models(models, teacher)
    if lm_eval_tasks:
        from gendistill.evaluation.lmeval import check_harness_tasks, run_lm_eval

        check_harness_tasks(lm_eval_tasks)  # datasets now: offline without a cache fails before any model loads
    groups = dict(groups or {})
    students = [name for name, role, _ in entries if role == "student"]
    if set(groups) - set(students):
        raise UserError(f"groups name {sorted(set(groups) - set(students))}, which are not students "
                        f"(students: {students})")
    for name, role, ref in entries:  # every model, tokenizer and prompt checked before any model is loaded
        if isinstance(ref, (str, os.PathLike)):
            check_model_available(ref, role)
            from transformers import AutoConfig, AutoTokenizer

            import gendistill.modeling  # noqa: F401  (the student's config class)
            config, tokenizer = AutoConfig.from_pretrained(str(ref)), AutoTokenizer.from_pretrained(str(ref))
        else:
            config, tokenizer = ref[0].config, ref[1]
        check_prompt_lengths(name, getattr(config, "max_position_embeddings", None), tokenizer, resolved, limit)
    for failure in refused:
        print(f"[eval] {failure['error']}", file=sys.stderr, flush=True)
    modes = decode_modes(decode, seeds, sampling)
    settings = {"decode": decode, "seeds": list(seeds) if decode != "greedy" else [],
                "sampling": vars(sampling) if decode != "greedy" else None, "batch_size": batch_size,
                "max_batch_tokens": max_batch_tokens, "limit": limit, "recall_samples": recall_samples,
                "dtype": dtype, "lm_eval_tasks": list(lm_eval_tasks), "lm_eval_chat_template": lm_eval_chat_template,
                "allow_code_execution": allow_code_execution}
    failed: list[dict] = list(refused)
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "settings": settings, "models": {}, "tasks": {},
                "failed": failed}
    if run is not None:
        manifest["run"] = str(Path(run).resolve())
    recall_cache: dict[tuple, Task] = {}  # recall items depend on the tokenizer only: build once per tokenizer
    with atomic_dir(out, overwrite=overwrite) as tmp:
        try:
            for name, role, ref in entries:
                loaded_here = isinstance(ref, (str, os.PathLike))
                model, tokenizer = load_model(ref, device, dtype, role) if loaded_here else ref
                was_training = model.training  # a model handed over mid-training goes back to train mode afterwards
                model.eval()
                max_positions = getattr(model.config, "max_position_embeddings", None)
                fingerprint = tokenizer_fingerprint(tokenizer)
                manifest["models"][name] = {"role": role, "source": str(ref) if loaded_here else type(model).__name__,
                                            "class": type(model).__name__, "tokenizer": fingerprint,
                                            "max_position_embeddings": max_positions}
                if role == "student" and groups.get(name):
                    manifest["models"][name]["group"] = str(groups[name])
                for spec in resolved:
                    if isinstance(spec, Task):
                        task = spec
                    else:
                        if (fingerprint, *spec) not in recall_cache:
                            try:
                                recall_cache[(fingerprint, *spec)] = recall_task(spec[0], spec[1], tokenizer,
                                                                                 recall_samples)
                            except ValueError as err:  # e.g. a length too short for the task's fixed text
                                raise UserError(f"recall task {spec[0]}@{spec[1]}: {err}") from None
                        task = recall_cache[(fingerprint, *spec)]
                    if limit is not None:
                        task = dataclasses.replace(task, items=task.items[:limit])
                    if progress:
                        print(f"[eval] {name}: {task.name} ({len(task.items)} items)", flush=True)
                    try:
                        records = score_task(model, tokenizer, task, modes, batch_size=batch_size,
                                             max_batch_tokens=max_batch_tokens, progress=progress)
                    except Exception as err:  # noqa: BLE001 -- one task's failure must not lose the others
                        _record_failure(failed, name, task.name, err)
                        atomic_write_json(tmp / "manifest.json", manifest)
                        continue
                    atomic_write_text(tmp / "records" / name / f"{task.name}.jsonl",
                                      "".join(json.dumps(r) + "\n" for r in records))
                    manifest["tasks"].setdefault(task.name, {
                        "kind": task.kind, "n_items": len(task.items), "source": task.source, "extract": task.extract,
                        "chat_template": task.chat_template, "num_fewshot": task.num_fewshot,
                        "max_new_tokens": task.max_new_tokens, "recall": task.recall, "ll_target": task.ll_target,
                        **({"lm_eval": task.lm_eval} if task.lm_eval else {})})
                    if task.recall and max_positions and task.recall["length"] > max_positions:
                        manifest["models"][name].setdefault("beyond_max_positions", []).append(task.name)
                    atomic_write_json(tmp / "manifest.json", manifest)  # complete after every task
                if lm_eval_tasks:
                    try:
                        with tempfile.TemporaryDirectory() as export_dir:  # exported task files: only while it runs
                            results = run_lm_eval(model, tokenizer, lm_eval_tasks, export_dir=export_dir,
                                                  batch_size=batch_size, limit=lm_eval_limit,
                                                  chat_template=lm_eval_chat_template)
                        atomic_write_json(tmp / "lm_eval" / f"{name}.json", results)
                    except Exception as err:  # noqa: BLE001
                        _record_failure(failed, name, "lm-eval harness", err)
                model.train(was_training)
                if loaded_here:  # free the weights before the next model
                    del model
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            atomic_write_json(tmp / "manifest.json", manifest)
        except BaseException:
            _keep_partial(tmp, Path(out), manifest)
            raise
    if not report:
        return manifest
    # The report is derived data, built once the eval directory is complete (`gendistill report OUT` rebuilds it).

    paths = build_report([out], out=out)
    return json.loads(paths["json"].read_text())
