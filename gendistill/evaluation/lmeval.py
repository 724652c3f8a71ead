"""Bridge to lm-evaluation-harness 0.4.13: run standard (or local YAML) tasks on an in-memory model, and export our
tasks as local lm-eval YAML tasks (`dataset_path: json`) that lm-eval scores the same way we do.

`simple_evaluate` ignores its batch size when given an LM object (lm-eval issue #3207), so it is set on HFLM.
HFLM right-pads LL batches without an attention mask (exact for any causal model) and left-pads `generate_until`
batches with one, so the student must treat left padding exactly, as it does.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import yaml

from gendistill.evaluation.tasks import Task, choice_targets, target_text, user_text, uses_chat
from gendistill.io import UserError, atomic_write_text


def lm_eval_name(task: Task, generative: bool = False) -> str:
    return "gd_" + "".join(c if c.isalnum() else "_" for c in task.name) + ("_gen" if generative else "")


def _doc(task: Task, item: dict) -> dict:
    doc = {"id": item["id"], "prompt": user_text(task, item), "target": target_text(task, item)}
    if task.is_mc:
        doc.update(choices=choice_targets(task, item), gold=item["answer"])
    return doc


def export_task(task: Task, directory: str | Path, generative: bool = False) -> Path:
    """Write `task` as an lm-eval task: a JSONL of rendered prompts and a YAML beside it. Multiple-choice tasks
    export as `multiple_choice` (acc, acc_norm) or, with `generative`, as `generate_until` (exact_match), both with
    our prompt, few-shot examples (first n, as ours), stop strings and max new tokens. Returns the YAML path."""
    if not task.is_mc and not generative:
        raise ValueError(f"task {task.name} is open-ended: only its generative form exists")
    directory = Path(directory).resolve()
    name = lm_eval_name(task, generative)
    data_files = {"test": str(directory / f"{name}.jsonl")}
    atomic_write_text(data_files["test"], "".join(json.dumps(_doc(task, i)) + "\n" for i in task.items))
    config = {"task": name, "dataset_path": "json", "dataset_name": None,
              "dataset_kwargs": {"data_files": data_files, "cache_dir": str(directory / ".hf_datasets")},
              "test_split": "test", "doc_to_text": "prompt", "target_delimiter": " ", "fewshot_delimiter": "\n\n",
              "num_fewshot": task.num_fewshot}
    if task.num_fewshot:
        data_files["train"] = str(directory / f"{name}_fewshot.jsonl")
        atomic_write_text(data_files["train"], "".join(json.dumps(_doc(task, i)) + "\n" for i in task.fewshot))
        config.update(fewshot_split="train", fewshot_config={"sampler": "first_n"})
    if generative:
        config.update(output_type="generate_until", doc_to_target="target",
                      generation_kwargs={"until": list(task.stop), "max_gen_toks": task.max_new_tokens,
                                         "do_sample": False, "temperature": 0.0},
                      metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                    "ignore_case": True, "ignore_punctuation": True}])
    else:
        config.update(output_type="multiple_choice", doc_to_choice="choices", doc_to_target="gold",
                      metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                   for m in ("acc", "acc_norm")])
    path = directory / f"{name}.yaml"
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def import_lm_eval():
    """lm-eval's entry points, or a UserError saying what is missing (checked before any model is scored)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:  # HFLM needs `accelerate` (lm-eval's [hf] extra)
        raise UserError(f"--lm-eval needs lm-eval with its HF backend installed: {err}") from None
    return lm_eval, HFLM, TaskManager


OFFLINE_HINT = ("a dataset that is neither in the datasets cache nor reachable (HF_HUB_OFFLINE=1 or no network): "
                "run once with network access to fill the cache (HF_HOME / HF_DATASETS_CACHE), or evaluate a local "
                "copy through an lm-eval YAML with `dataset_path: json` (--lm-eval-include DIR)")


def explain_load_error(name: str, err: BaseException) -> str:
    """One line per task that cannot be built; an offline dataset is marked `(offline)` (see `load_errors`)."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    if isinstance(err, KeyError):
        return (f"lm-eval:{name} is not a task, group or tag of lm-eval's registry (list them: `lm-eval ls tasks`) "
                f"nor an lm-eval YAML file; local tasks: --lm-eval-include DIR ({text[:200]})")
    if isinstance(err, ImportError):
        return f"lm-eval:{name} needs a package that is not installed ({text}); e.g. pip install 'lm-eval[{name}]'"
    offline = isinstance(err, ConnectionError) or any(w in text.lower() for w in ("offline", "connect", "resolve"))
    return f"lm-eval:{name}: cannot load it{' (offline)' if offline else ''}: {text[:300]}"


def load_errors(what: str, errors: list[str]) -> UserError:
    hint = f"\n(offline) = {OFFLINE_HINT}" if any("(offline)" in e for e in errors) else ""
    return UserError(f"cannot build these {what} (nothing was evaluated):\n  " + "\n  ".join(errors) + hint)


def check_harness_tasks(tasks: Sequence[str | Path | Task]) -> None:
    """Load the lm-eval tasks (and so their datasets) that `run_lm_eval` will run, before any model is scored:
    offline without a cached dataset, an unknown name or a missing package is one UserError naming them all."""
    from gendistill.evaluation.tasks import load_task

    _, _, TaskManager = import_lm_eval()
    names: list[str] = []
    include: set[str] = set()
    standard = False
    for ref in tasks:
        if isinstance(ref, Task):
            continue
        if str(ref).endswith((".yaml", ".yml")):
            try:
                spec = yaml.safe_load(Path(ref).read_text()) or {}
            except (OSError, yaml.YAMLError) as err:
                raise UserError(f"--lm-eval {ref}: cannot read it: {err}") from None
            if "task" not in spec:  # a gendistill task: exported, its items are local
                load_task(ref)
                continue
            include.add(str(Path(ref).resolve().parent))
            names.append(str(spec["task"]))
        else:
            standard = True
            names.append(str(ref))
    if not names:
        return
    manager = TaskManager(include_path=sorted(include) or None, include_defaults=standard)
    errors = []
    for name in names:
        try:
            manager.load([name])
        except Exception as err:  # noqa: BLE001 -- dataset download, unknown name, missing package
            errors.append(explain_load_error(name, err))
    if errors:
        raise load_errors("--lm-eval tasks", errors)


def run_lm_eval(model, tokenizer, tasks: Sequence[str | Path | Task], *, export_dir: str | Path,
                batch_size: int = 16, limit: int | None = None, chat_template: bool | None = None,
                log_samples: bool = False) -> dict:
    """Run lm-eval on `model` (an in-memory HF causal LM). `tasks`: lm-eval task names, lm-eval YAML files, our
    task YAMLs or Task objects (exported to `export_dir`, both LL and generative forms). `chat_template`: apply
    the tokenizer's chat template to lm-eval's standard tasks (default: when it has one, as the paper does);
    exported tasks follow their own `chat_template` setting. Returns {"results": {task: {metric: value}},
    "configs": ..., "samples"?}."""
    lm_eval, HFLM, TaskManager = import_lm_eval()
    from gendistill.evaluation.tasks import load_task

    export_dir = Path(export_dir)
    has_template = getattr(tokenizer, "chat_template", None) is not None
    default_chat = has_template if chat_template is None else (chat_template and has_template)
    by_chat: dict[bool, list[str]] = {}  # simple_evaluate applies the chat template to all its tasks or none
    include: set[str] = set()
    standard = False  # only index lm-eval's thousands of built-in task YAMLs when one of them is asked for
    for ref in tasks:
        if isinstance(ref, (str, Path)) and str(ref).endswith((".yaml", ".yml")):
            spec = yaml.safe_load(Path(ref).read_text()) or {}
            if "task" in spec:  # an lm-eval YAML: include its folder, run it by name
                include.add(str(Path(ref).resolve().parent))
                by_chat.setdefault(default_chat, []).append(spec["task"])
                continue
            ref = load_task(ref)
        if isinstance(ref, Task):
            chat = uses_chat(ref, tokenizer)
            forms = [False, True] if ref.is_mc else [True]
            for generative in forms:
                include.add(str(export_task(ref, export_dir, generative).parent))
                by_chat.setdefault(chat, []).append(lm_eval_name(ref, generative))
        else:
            standard = True
            by_chat.setdefault(default_chat, []).append(str(ref))
    max_length = getattr(model.config, "max_position_embeddings", None)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
              max_length=max_length, enable_thinking=False)
    manager = TaskManager(include_path=sorted(include) or None, include_defaults=standard)
    merged: dict = {"results": {}, "configs": {}, "samples": {}}
    for chat, names in by_chat.items():
        out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                      apply_chat_template=chat, fewshot_as_multiturn=chat, bootstrap_iters=1000,
                                      log_samples=log_samples, random_seed=1234, numpy_random_seed=1234,
                                      torch_random_seed=1234, fewshot_random_seed=1234)
        merged["results"].update({t: {k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "alias"}
                                  for t, r in out["results"].items()})
        merged["configs"].update(out.get("configs", {}))
        merged["samples"].update(out.get("samples", {}))
    if not log_samples:
        del merged["samples"]
    return merged
