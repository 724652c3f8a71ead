"""`gendistill ablate SPEC.yaml [--check] [--resume] [--only AXIS,...] [--cluster slurm|debug]`: a whole ablation from
one file (`--only`: a subset of the spec's axes).

A spec names a base recipe, axes (each value a set of `--set` overrides of the recipe), seeds and eval settings:

    name: world-gpu
    base: ../demo/distill-gpu.yaml         # relative to the spec
    set: [teacher.path=T, ...]             # overrides for every variant
    mode: sweep                            # sweep: one axis at a time from the base; grid: every combination
    axes:
      masking: {path: kd_instruct.loss_mask, values: [completion_only, all]}
      freezing:
        values:
          attention: {kd_instruct.train: [kda, mlp, norms]}
          none: {kd_instruct.train: all}
    variants: {name: {overrides...}}       # or/and named variants (reported in the group "variants")
    seeds: [0, 1]                          # recipe seed (stages without their own), a converted student's seed
    eval: {tasks: "...", limit: 200}       # keyword arguments of gendistill.evaluation.evaluate
    executor: {timeout_min: 60, slurm_partition: gpu, gpus_per_node: 1}   # submitit parameters (--cluster)
    estimate: {tokens_per_s: 400000}       # optional: --check's time estimate before anything has run

Stages are content-addressed: a stage's key hashes its resolved settings (`Stage.math_keys`), its data and the key of
the stage before it (the first stage: teacher, student and tokenizer), so variants that agree on a prefix of stages
share those checkpoints; each unique stage runs once into `OUT/stages/<key>/` (train_stage's own layout, resumable
from its checkpoints). Stages run in waves by depth (a stage only needs its parent), then one eval per unique final
model and one for the teacher. Local: the wave's jobs are queued over the visible GPUs, one subprocess per GPU
(CUDA_VISIBLE_DEVICES), or run one after another on CPU. Clusters: submitit (`--cluster slurm`; `debug` runs
submitit's in-process executor). A killed sweep continues with --resume: finished stages and evals are skipped.

Spec values may read environment variables as ${NAME} (e.g. the world and teacher directories).

Outputs: OUT/plan.json, OUT/stages/, OUT/evals/, OUT/report/ (an eval directory merging every run, each model
tagged with `group`, `axis`, `value`, `variant` and `seed`, plus report.json/.md/.html), OUT/ablation.md and .json
(scores by axis, and each value's effect against its axis's base, paired by seed and item: `axis_effects`).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from gendistill.evaluation import stats
from gendistill.evaluation.report import format_p, format_pp, item_outcomes, load_eval_dirs
from gendistill.io import UserError, atomic_dir, atomic_write_json, atomic_write_text

SPEC_KEYS = {"name", "base", "set", "out_dir", "mode", "axes", "variants", "seeds", "eval", "executor", "estimate"}
MODES = ("sweep", "grid")
CLUSTERS = ("local", "slurm", "debug")
_HASH_FILE_LIMIT = 256 * 2**20  # local files up to this size are hashed by content, larger ones by size and mtime


@dataclasses.dataclass
class Run:
    """One variant at one seed: the overrides that make its recipe, and the groups it is reported in."""

    name: str
    variant: str
    seed: int
    overrides: list[str]
    groups: list[dict]  # [{"group", "axis", "value"}]
    stages: list[str] = dataclasses.field(default_factory=list)  # stage keys, in order
    eval: str | None = None


# ------------------------------------------------------------------------------------------------------------------
# the spec

def load_spec(path: str | Path, out_dir: str | None = None, overrides: list[str] | tuple = (),
              only: list[str] | tuple = ()) -> dict:
    """Read and check a spec; `overrides` (`--set`) are appended to its `set` list (they apply to every variant);
    `only` (`--only`) keeps those of its axes (`variants`: its named variants) and drops the others."""
    from gendistill.recipes import resolve

    path = resolve(path, "ablation spec")  # a file, or a bundled spec's name ("ablations/paper")
    text = os.path.expandvars(path.read_text().replace("${spec_dir}", str(path.resolve().parent)))
    unset = sorted(set(re.findall(r"\$\{(\w+)\}", text)))
    if unset:
        raise UserError(f"{path}: environment variable(s) {unset} not set (the spec reads them as ${{NAME}})")
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(spec, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}; known: {', '.join(sorted(SPEC_KEYS))}")
    if not isinstance(spec.get("base"), str):
        raise UserError(f"{path}.base: required: the base recipe YAML (relative to the spec)")
    spec["base"] = str((path.resolve().parent / spec["base"]).resolve())
    spec.setdefault("name", path.stem)
    spec["out_dir"] = out_dir or spec.get("out_dir") or f"runs/ablations/{spec['name']}"
    spec["set"] = list(spec.get("set") or []) + list(overrides)
    if not all(isinstance(s, str) and "=" in s for s in spec["set"]):
        raise UserError(f"{path}.set: expected a list of KEY=VALUE strings, got {spec['set']!r}")
    spec["mode"] = spec.get("mode", "sweep")
    if spec["mode"] not in MODES:
        raise UserError(f"{path}.mode: expected one of {MODES}, got {spec['mode']!r}")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                             for s in seeds):
        raise UserError(f"{path}.seeds: expected a list of integers, got {seeds!r}")
    spec["seeds"] = seeds
    spec["axes"] = {str(k): _axis_values(v, f"{path}.axes.{k}") for k, v in (spec.get("axes") or {}).items()}
    variants = spec.get("variants") or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise UserError(f"{path}.variants: expected a mapping name -> {{override path: value}}")
    spec["variants"] = {_safe(k): _overrides(v) for k, v in variants.items()}
    if "base" in spec["variants"]:  # the name of the base recipe's run, which `expand` adds beside named variants
        raise UserError(f"{path}.variants.base: `base` names the base recipe's own run; give this variant another name")
    if only:
        known = [*spec["axes"], *(["variants"] if spec["variants"] else [])]
        unknown = sorted(set(only) - set(known))
        if unknown:
            raise UserError(f"--only {','.join(unknown)}: not in {path}; it has {', '.join(known)}")
        spec["axes"] = {k: v for k, v in spec["axes"].items() if k in only}
        spec["variants"] = spec["variants"] if "variants" in only else {}
    if not spec["axes"] and not spec["variants"]:
        raise UserError(f"{path}: no `axes` and no `variants`: nothing to compare")
    for key in ("eval", "executor", "estimate"):
        if not isinstance(spec.get(key) or {}, dict):
            raise UserError(f"{path}.{key}: expected a mapping")
        spec[key] = dict(spec.get(key) or {})
    if "tasks" not in spec["eval"]:
        raise UserError(f"{path}.eval.tasks: required (the same tasks score every variant)")
    return spec


def _safe(name) -> str:
    return re.sub(r"[^\w.-]+", "_", str(name)).strip("_") or "x"


def _overrides(mapping: dict) -> list[str]:
    # JSON is YAML: load_recipe's `--set` parsing reads every value back exactly (lists, null, numbers, strings).
    return [f"{k}={json.dumps(v)}" for k, v in mapping.items()]


def _axis_values(raw, where: str) -> dict[str, list[str]]:
    """An axis -> {value name: overrides}. Forms: {path, values: [...]} or {values: {name: {path: value}}}."""
    if not isinstance(raw, dict) or "values" not in raw or set(raw) - {"path", "values"}:
        raise UserError(f"{where}: expected {{path: STAGE.key, values: [...]}} or {{values: {{name: {{key: value}}}}}}")
    values = raw["values"]
    if "path" in raw:
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}.values: expected a non-empty list of values for {raw['path']}")
        out = {_safe(v if not isinstance(v, (list, dict)) else json.dumps(v)): _overrides({raw["path"]: v})
               for v in values}
    else:
        if not isinstance(values, dict) or not values or not all(isinstance(v, dict) for v in values.values()):
            raise UserError(f"{where}.values: expected a mapping name -> {{override path: value}}")
        out = {_safe(k): _overrides(v) for k, v in values.items()}
    if len(out) < len(values):
        raise UserError(f"{where}: values {list(values)} give repeated names; name them ({{values: {{name: ...}}}})")
    if len(out) < 2:
        raise UserError(f"{where}: an axis needs at least two distinct values")
    return out


def expand(spec: dict) -> list[Run]:
    """Variants x seeds. sweep: each axis varied alone from the base recipe (a value equal to the base's shares its
    stages with the other axes' base values); grid: every combination, reported once per axis in a group holding
    the other axes fixed; named variants in the group "variants", with the base recipe as "base" where no other run
    is it."""
    variants: dict[str, tuple[list[str], list[dict]]] = {}
    if spec["mode"] == "sweep":
        for axis, values in spec["axes"].items():
            for value, overrides in values.items():
                variants[f"{axis}-{value}"] = (overrides, [{"group": axis, "axis": axis, "value": value}])
    elif spec["axes"]:
        axes = list(spec["axes"])
        for combo in itertools.product(*(spec["axes"][a].items() for a in axes)):
            name = "_".join(f"{a}-{v}" for a, (v, _) in zip(axes, combo))
            groups = [{"group": f"{a}|" + ",".join(f"{b}-{w}" for b, (w, _) in zip(axes, combo) if b != a),
                       "axis": a, "value": v} for a, (v, _) in zip(axes, combo)]
            variants[name] = ([o for _, overrides in combo for o in overrides], groups)
    for name, overrides in spec["variants"].items():
        variants[name] = (overrides, [{"group": "variants", "axis": "variants", "value": name}])
    if spec["variants"] and all(overrides for overrides, _ in variants.values()):
        # named variants are compared with the base recipe: run it when no axis value is it (stages shared by key)
        variants["base"] = ([], [{"group": "variants", "axis": "variants", "value": "base"}])
    return [Run(name=f"{name}.s{seed}", variant=name, seed=seed, overrides=overrides, groups=groups)
            for name, (overrides, groups) in variants.items() for seed in spec["seeds"]]


def run_recipe_of(spec: dict, run: Run):
    """The run's validated Recipe: base + spec `set` + the variant's overrides + its seed."""
    from gendistill.distill.recipe import load_recipe

    out = Path(spec["out_dir"])
    common = list(spec["set"]) + [f"cache_dir={out / 'token_cache'}", f"out_dir={out / 'runs' / run.name}"]
    try:
        recipe = load_recipe(spec["base"], common + run.overrides)
        seeded = [f"seed={run.seed}"] + ([f"student.convert.seed={run.seed}"] if "convert" in recipe.student else [])
        return load_recipe(spec["base"], common + run.overrides + seeded)
    except UserError as err:
        raise UserError(f"variant {run.variant}: {err}") from err


# ------------------------------------------------------------------------------------------------------------------
# content keys

def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(path: str) -> dict | str:
    """What a local file or directory holds (contents up to 256 MiB a file, else size and mtime); a hub id as is."""
    p = Path(path)
    if not p.exists():
        return path
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    out = {}
    for f in files:
        stat = f.stat()
        out[str(f.relative_to(p) if p.is_dir() else f.name)] = _file_digest(str(f), stat.st_size, stat.st_mtime_ns)
    return out


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int):
    """Content hash (cached per size and mtime: a plan reads each data file once, not once per run and stage)."""
    if size > _HASH_FILE_LIMIT:
        return [size, mtime_ns]
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _spec_fingerprint(spec) -> object:
    if isinstance(spec, dict) and isinstance(spec.get("path"), str):
        return {**spec, "content": fingerprint(spec["path"])}
    return spec


def stage_keys(recipe) -> list[str]:
    """key_k = hash(key_{k-1}, stage k's settings, its data); key_{-1} = hash(teacher, student, tokenizer)."""
    key = _digest({"teacher": _spec_fingerprint(recipe.teacher), "student": _spec_fingerprint(recipe.student),
                   "tokenizer": _spec_fingerprint(recipe.tokenizer)})
    keys = []
    for stage in recipe.stages:
        source = dataclasses.asdict(recipe.data[stage.data])
        key = _digest({"parent": key, "stage": stage.math_keys(),
                       "data": {**source, "content": fingerprint(source["path"])}})
        keys.append(key)
    return keys


# ------------------------------------------------------------------------------------------------------------------
# the plan

def build_plan(spec: dict) -> dict:
    """Every run with its stage keys; every unique stage once (with the runs that use it); evals by final model."""
    from gendistill.distill.trainer import total_steps

    runs = expand(spec)
    stages: dict[str, dict] = {}
    evals: dict[str, dict] = {}
    eval_settings = _digest(spec["eval"])
    teachers = set()
    for run in runs:
        recipe = run_recipe_of(spec, run)
        run.stages = stage_keys(recipe)
        for index, (key, stage) in enumerate(zip(run.stages, recipe.stages)):
            node = stages.setdefault(key, {"run": run.name, "index": index, "name": stage.name,
                                           "parent": run.stages[index - 1] if index else None, "used_by": [],
                                           "tokens": total_steps(stage) * stage.batch_size * stage.seq_len,
                                           "count": stage.count})
            node["used_by"].append(run.name)
        run.eval = _digest({"model": run.stages[-1], "eval": eval_settings})
        evals.setdefault(run.eval, {"stage": run.stages[-1], "run": run.name})
        teachers.add(json.dumps(_spec_fingerprint(recipe.teacher), sort_keys=True, default=str))
    if len(teachers) > 1:
        raise UserError("the variants have different teachers; an ablation compares students of one teacher")
    teacher_key = _digest({"teacher": json.loads(teachers.pop()), "eval": eval_settings})
    return {"name": spec["name"], "spec": spec, "runs": [dataclasses.asdict(r) for r in runs], "stages": stages,
            "evals": evals, "teacher_eval": {"key": teacher_key, "run": runs[0].name}}


def waves(plan: dict, out: Path) -> list[list[dict]]:
    """Jobs not done yet, by depth: stage jobs of depth 0, 1, ..., then the evals (a job needs only earlier waves)."""
    depth = max(node["index"] for node in plan["stages"].values()) + 1
    result = [[{"kind": "stage", "key": k} for k, node in plan["stages"].items()
               if node["index"] == d and not (out / "stages" / k / "stage.json").is_file()] for d in range(depth)]
    evals = [{"kind": "eval", "key": k} for k in plan["evals"] if not (out / "evals" / k / "manifest.json").is_file()]
    if not (out / "evals" / plan["teacher_eval"]["key"] / "manifest.json").is_file():
        evals.append({"kind": "teacher", "key": plan["teacher_eval"]["key"]})
    return [w for w in result + [evals] if w]


def describe(plan: dict, out: Path) -> str:
    """--check: the variants, which stages they share, the token total and, when known, the time."""
    stages, runs = plan["stages"], plan["runs"]
    done = {k for k in stages if (out / "stages" / k / "stage.json").is_file()}
    lines = [f"ablation {plan['name']}: {len(runs)} runs ({len({r['variant'] for r in runs})} variants x "
             f"{len(plan['spec']['seeds'])} seeds), {len(stages)} unique stages of "
             f"{sum(len(r['stages']) for r in runs)}, {len(plan['evals'])} student evals + teacher; out {out}"]
    for run in runs:
        keys = [f"{stages[k]['name']}:{k[:8]}{'*' if len(stages[k]['used_by']) > 1 else ''}" for k in run["stages"]]
        groups = ", ".join(g["group"] for g in run["groups"])
        lines.append(f"  {run['name']:<40s} [{groups}]  " + " -> ".join(keys))
    unique = sum(n["tokens"] for n in stages.values())
    naive = sum(stages[k]["tokens"] for r in runs for k in r["stages"])
    left = sum(n["tokens"] for k, n in stages.items() if k not in done)
    scored = any(n["count"] == "scored" for n in stages.values())
    lines.append(f"  (* = shared) training tokens: {unique:,} unique ({naive:,} without sharing), {left:,} left"
                 + ("; scored budgets counted as their packed minimum" if scored else ""))
    rate, how = plan["spec"]["estimate"].get("tokens_per_s"), "spec estimate.tokens_per_s"
    measured = [json.loads((out / "stages" / k / "stage.json").read_text()) for k in done]
    measured = [m for m in measured if m.get("train_time_s")]
    if measured:
        rate = sum(m["tokens"] for m in measured) / sum(m["train_time_s"] for m in measured)
        how = f"measured over {len(measured)} finished stages"
    if rate:
        lines.append(f"  time left: {left / rate / 3600:.2f} h of training on one device at {rate:,.0f} tokens/s "
                     f"({how}), plus the evals; divide by the GPUs in use")
    else:
        lines.append("  time: unknown (set estimate.tokens_per_s in the spec, or run some stages first)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# jobs (run in this process, in a CUDA_VISIBLE_DEVICES subprocess, or by submitit)

def run_job(out: str, job: dict) -> str:
    """One stage (trained into OUT/stages/<key>) or one eval (OUT/evals/<key>); a no-op when already done."""
    from gendistill.distill import parallel
    from gendistill.distill.data import detect_kind
    from gendistill.distill.trainer import load_model, load_tokenizer, sized_corpus, train_stage

    out = Path(out)
    plan = json.loads((out / "plan.json").read_text())
    spec = plan["spec"]
    runs = {r["name"]: Run(**r) for r in plan["runs"]}
    if job["kind"] == "stage":
        node = plan["stages"][job["key"]]
        stage_dir = out / "stages" / job["key"]
        if (stage_dir / "stage.json").is_file():
            return job["key"]
        recipe = run_recipe_of(spec, runs[node["run"]])
        stage = recipe.stages[node["index"]]
        tokenizer = load_tokenizer(recipe)
        first = node["parent"] is None
        teacher = None
        if recipe.teacher is not None and (stage.needs_teacher or (first and "convert" in recipe.student)):
            teacher = load_model(recipe.teacher, role="teacher").eval().requires_grad_(False)
        if first:
            student = load_model(recipe.student, teacher=teacher, role="student")
        else:
            student = load_model({"path": str(out / "stages" / node["parent"] / "model"), "dtype": "float32"},
                                 role="student")
        source = recipe.data[stage.data]
        source = dataclasses.replace(source, kind=detect_kind(source) if source.kind == "auto" else source.kind)
        env = parallel.setup()
        corpus = sized_corpus(source, tokenizer, recipe.cache_dir, [stage], env)
        train_stage(stage, student, teacher=teacher, tokenizer=tokenizer, data=corpus, out_dir=stage_dir,
                    resume=True, parallel_strategy=recipe.parallel, progress=recipe.progress,
                    tensorboard=recipe.tensorboard, env=env)
        return job["key"]
    from gendistill.evaluation import evaluate

    target = out / "evals" / job["key"]
    if (target / "manifest.json").is_file():
        return job["key"]
    settings = {"progress": False, **spec["eval"]}
    if job["kind"] == "eval":
        model = {"student": str(out / "stages" / plan["evals"][job["key"]]["stage"] / "model")}
    else:  # the teacher, scored as a model of its own eval directory (evaluate needs one non-teacher model)
        import torch

        recipe = run_recipe_of(spec, runs[plan["teacher_eval"]["run"]])
        teacher = load_model(recipe.teacher, role="teacher")  # any spec (hub id, factory): placed as evaluate would
        device = settings.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        teacher = teacher.to(device=device, dtype=getattr(torch, settings.get("dtype", "float32")))
        model = {"teacher": (teacher, load_tokenizer(recipe))}
    evaluate(model, teacher=None, out=target, overwrite=True, report=False, **settings)
    return job["key"]


def _local_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _job_name(job: dict) -> str:
    return f"{job['kind']}-{job['key']}"


def run_wave(out: Path, jobs: list[dict], cluster: str, executor_args: dict) -> None:
    """Run a wave's independent jobs and wait for all of them; a failed job is reported with its log."""
    failed = []
    if cluster in ("slurm", "debug"):
        import submitit

        executor = submitit.AutoExecutor(folder=out / "submitit", cluster=cluster)
        if cluster == "slurm" and executor_args:
            executor.update_parameters(**executor_args)
        submitted = executor.map_array(run_job, [str(out)] * len(jobs), jobs)
        for job, handle in zip(jobs, submitted):
            try:
                handle.result()
            except Exception as err:  # noqa: BLE001 (submitit re-raises the job's error; report them all)
                failed.append(f"{_job_name(job)}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                              f" (logs: {out / 'submitit'})")
    else:
        gpus = _local_gpus()
        if len(gpus) <= 1:  # CPU or one GPU: one after another, in this process (no start-up cost per job)
            for job in jobs:
                print(f"[ablate] {_job_name(job)}", flush=True)
                run_job(str(out), job)
            return
        free: queue.Queue = queue.Queue()
        for gpu in gpus:
            free.put(gpu)

        def launch(job):
            gpu = free.get()
            log = out / "logs" / f"{_job_name(job)}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            print(f"[ablate] {_job_name(job)} on GPU {gpu} (log {log})", flush=True)
            try:
                with open(log, "a") as f:
                    rc = subprocess.run([sys.executable, "-m", "gendistill.ablate", str(out), json.dumps(job)],
                                        env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu}, stdout=f,
                                        stderr=subprocess.STDOUT).returncode
            finally:
                free.put(gpu)
            return None if rc == 0 else f"{_job_name(job)}: exit {rc} (log: {log})"

        with ThreadPoolExecutor(len(gpus)) as pool:
            failed = [f for f in pool.map(launch, jobs) if f]
    if failed:
        raise UserError(f"{len(failed)} job(s) failed; the others are kept, rerun with --resume:\n  "
                        + "\n  ".join(failed))


# ------------------------------------------------------------------------------------------------------------------
# the report

def merge_evals(plan: dict, out: Path) -> Path:
    """OUT/report: one eval directory holding the teacher and every run (records copied), each student tagged with
    `group` / `axis` / `value` / `variant` / `seed`; a grid run appears once per axis (named run~axis)."""
    teacher_dir = out / "evals" / plan["teacher_eval"]["key"]
    teacher_manifest = json.loads((teacher_dir / "manifest.json").read_text())
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "settings": teacher_manifest["settings"],
                "ablation": plan["name"], "models": {}, "tasks": dict(teacher_manifest["tasks"])}
    with atomic_dir(out / "report", overwrite=True) as tmp:
        shutil.copytree(teacher_dir / "records" / "teacher", tmp / "records" / "teacher")
        manifest["models"]["teacher"] = {**teacher_manifest["models"]["teacher"], "role": "teacher"}
        for run in plan["runs"]:
            source = out / "evals" / run["eval"]
            info = json.loads((source / "manifest.json").read_text())
            for g in run["groups"]:
                name = run["name"] if len(run["groups"]) == 1 else f"{run['name']}~{g['axis']}"
                shutil.copytree(source / "records" / "student", tmp / "records" / name)
                manifest["models"][name] = {**info["models"]["student"], "role": "student", **g,
                                            "variant": run["variant"], "seed": run["seed"], "stages": run["stages"]}
            for task, meta in info["tasks"].items():
                manifest["tasks"].setdefault(task, meta)
        atomic_write_json(tmp / "manifest.json", manifest)
    return out / "report"


SUMMARY_COLUMNS = (("average", "ll_acc"), ("average", "gen_acc"), ("average_open", "gen_acc"))


def by_axis(plan: dict, report: dict) -> dict:
    """{group: [{"value", "runs", column/mode: {"mean", "min", "max", "n"}}]}: each value's score over its seeds
    (min-max is the seed spread; item-level intervals and tests are the report's). Values in the spec's order."""
    names = {n: m for n, m in report["models"].items() if m.get("role") == "student"}
    tables: dict[str, list] = {}
    for name, info in names.items():
        rows = tables.setdefault(info["group"], [])
        row = next((r for r in rows if r["value"] == info["value"]), None)
        if row is None:
            row = {"value": info["value"], "runs": []}
            rows.append(row)
        row["runs"].append(name)
    for rows in tables.values():
        for row in rows:
            for column, mode in SUMMARY_COLUMNS:
                values = [report["scores"][n].get(column, {}).get(mode) for n in row["runs"]]
                values = [v for v in values if isinstance(v, (int, float))]
                if values:
                    row[f"{column}/{mode}"] = {"mean": sum(values) / len(values), "min": min(values),
                                               "max": max(values), "n": len(values)}
    return tables


def render_axes(tables: dict, report: dict) -> str:
    """ablation.md: one table per group, the teacher's scores on top."""
    teacher = report["scores"].get(report.get("teacher") or "", {})
    lines = []
    for group, rows in tables.items():
        keys = [f"{c}/{m}" for c, m in SUMMARY_COLUMNS if any(f"{c}/{m}" in r for r in rows)]
        lines += [f"## {group}", "", "| value | seeds | " + " | ".join(keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        if teacher:
            cells = [teacher.get(k.split("/")[0], {}).get(k.split("/")[1]) for k in keys]
            lines.append("| teacher | - | " + " | ".join("-" if v is None else f"{100 * v:.1f}%" for v in cells) + " |")
        for row in rows:
            cells = []
            for key in keys:
                s = row.get(key)
                cells.append("-" if s is None else f"{100 * s['mean']:.1f}% [{100 * s['min']:.1f}-{100 * s['max']:.1f}]"
                             if s["n"] > 1 else f"{100 * s['mean']:.1f}%")
            lines.append(f"| {row['value']} | {len(row['runs'])} | " + " | ".join(cells) + " |")
        lines.append("")
    note = ("Mean over seeds [min-max over seeds]. Compare values within a table only; item-level intervals and "
            "paired tests: report/report.md.")
    return "# Ablation by axis\n\n" + note + "\n\n" + "\n".join(lines)


def axis_effects(plan: dict, tables: dict, report: dict, records: dict) -> dict:
    """{group: {"base", "rows"}}: what each value changes against its axis's base value (the axis's first; for named
    variants, the base recipe), paired by seed and by item: Δ LL and Δ generation accuracy over the multiple-choice
    tasks (items pooled, so a task weighs by its items), their difference Δgen - ΔLL (does the change move one mode
    more than the other: the paper's finding 3 asks), and Δ generation on the open tasks. Each row's bootstrap
    resamples items, an item's copies under every seed together; 95 % intervals, two-sided p, Holm within the axis."""
    models = report["models"]
    ll_mode = {t: m for t, m in report.get("ll_mode", {}).items() if t != "average"}
    open_tasks = [t for t, meta in report.get("tasks", {}).items() if meta.get("kind") == "open"]

    def by_seed(names) -> dict:
        return {models[n]["seed"]: n for n in names if n in models}

    base_recipe = by_seed(r["name"] for r in plan["runs"] if not r["overrides"])

    def stacked(pairs, tasks, mc: bool):
        """Outcome rows (value LL, base LL, value gen, base gen; open tasks: the gen rows) over (seed, task, item)."""
        rows, clusters = [[] for _ in range(4 if mc else 2)], []
        for a, b in pairs:
            for task in tasks:
                ra = {r["id"]: r for r in records.get(a, {}).get(task, [])}
                rb = {r["id"]: r for r in records.get(b, {}).get(task, [])}
                ids = [i for i in ra if i in rb]
                if not ids:
                    continue
                oa, ob = item_outcomes([ra[i] for i in ids]), item_outcomes([rb[i] for i in ids])
                keys = (ll_mode[task], "gen_acc") if mc else ("gen_acc",)
                for k, key in enumerate(keys):
                    rows[2 * k].extend(oa[key]), rows[2 * k + 1].extend(ob[key])
                clusters.extend(f"{task}:{i}" for i in ids)
        return np.asarray(rows, dtype=np.float64), clusters

    effects = {}
    for group, values in tables.items():
        base, base_runs = (("base recipe", base_recipe) if group == "variants"
                           else (values[0]["value"], by_seed(values[0]["runs"])))
        rows = []
        for value in values:
            pairs = [(n, base_runs[seed]) for seed, n in by_seed(value["runs"]).items()
                     if seed in base_runs and base_runs[seed] != n]
            if not pairs:
                continue
            row = {"value": value["value"], "seeds": len(pairs)}
            x, clusters = stacked(pairs, list(ll_mode), mc=True)
            if x.shape[1]:
                d = stats.bootstrap_means(x, clusters, seed=stats.task_seed(f"{group}/{value['value']}"))
                m = x.mean(axis=1)
                row.update(items=x.shape[1], d_ll=stats.difference_from(m[0], m[1], d[0], d[1]),
                           d_gen=stats.difference_from(m[2], m[3], d[2], d[3]),
                           d_gen_minus_d_ll=stats.difference_from(m[2] - m[3], m[0] - m[1], d[2] - d[3], d[0] - d[1]))
            x, clusters = stacked(pairs, open_tasks, mc=False)
            if x.shape[1]:
                d = stats.bootstrap_means(x, clusters, seed=stats.task_seed(f"{group}/{value['value']}/open"))
                row["d_gen_open"] = stats.difference_from(x[0].mean(), x[1].mean(), d[0], d[1])
            rows.append(row)
        tested = [r for r in rows if "d_gen_minus_d_ll" in r]
        for r, p in zip(tested, stats.holm([r["d_gen_minus_d_ll"]["p"] for r in tested])):
            r["d_gen_minus_d_ll"]["p_holm"] = p
            r["verdict"] = _effect_verdict(r["d_ll"], r["d_gen"], p)
        if rows:
            effects[group] = {"base": base, "rows": rows}
    return effects


def _effect_verdict(d_ll: dict, d_gen: dict, p_holm: float) -> str:
    def moved(est):
        return est["low"] is not None and (est["low"] > 0 or est["high"] < 0)

    if p_holm <= 1 - stats.LEVEL:
        return ("moves generation more than LL" if abs(d_gen["value"]) > abs(d_ll["value"])
                else "moves LL more than generation")
    if moved(d_ll) and moved(d_gen):
        return "moves both modes; no difference between them detected"
    if moved(d_ll) or moved(d_gen):
        one, other = ("generation", "LL") if moved(d_gen) else ("LL", "generation")
        return f"moves {one} (no effect detected under {other}); the difference between the modes is not significant"
    return "no effect detected in either mode"


def render_effects(effects: dict) -> str:
    lines = ["# Effects against each axis's base", "",
             "Each value against its axis's base value (named variants: against the base recipe), paired by seed and "
             "by item; the multiple-choice tasks pooled by item; 95 % bootstrap intervals; Δgen − ΔLL tested "
             "two-sided, Holm-adjusted within the axis. A verdict is called only where the data allow it.", ""]
    for group, eff in effects.items():
        lines += [f"## {group} (against {eff['base']})", "",
                  "| value | seeds | MC items | Δ LL | Δ gen | Δgen − ΔLL | p (Holm) | Δ gen, open tasks "
                  "| verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in eff["rows"]:
            did = r.get("d_gen_minus_d_ll")
            lines.append(f"| {r['value']} | {r['seeds']} | {r.get('items', '–')} | {format_pp(r.get('d_ll'))} | "
                         f"{format_pp(r.get('d_gen'))} | {format_pp(did)} | "
                         f"{format_p(did and did['p_holm'])} | "
                         f"{format_pp(r.get('d_gen_open'))} | {r.get('verdict', '–')} |")
        lines.append("")
    return "\n".join(lines)


def summarize(plan: dict, out: Path, report: dict) -> dict:
    stage_info = {k: json.loads((out / "stages" / k / "stage.json").read_text()) for k in plan["stages"]}
    runs = []
    for run in plan["runs"]:
        runs.append({"name": run["name"], "variant": run["variant"], "seed": run["seed"], "groups": run["groups"],
                     "overrides": run["overrides"], "model": str(out / "stages" / run["stages"][-1] / "model"),
                     "stages": [{"key": k, "name": stage_info[k]["stage"], "tokens": stage_info[k]["tokens"],
                                 "scored_tokens": stage_info[k].get("scored_tokens"),
                                 "shared_by": len(plan["stages"][k]["used_by"]),
                                 "final_loss": (stage_info[k].get("final") or {}).get("loss")}
                                for k in run["stages"]]})
    tables = by_axis(plan, report)
    effects = axis_effects(plan, tables, report, load_eval_dirs([out / "report"])["records"])
    summary = {"name": plan["name"], "runs": runs, "unique_stages": len(plan["stages"]),
               "stage_runs_without_sharing": sum(len(r["stages"]) for r in plan["runs"]),
               "train_time_s": sum(s.get("train_time_s") or 0 for s in stage_info.values()),
               "report": str(out / "report" / "report.json"), "by_axis": tables, "effects": effects,
               "findings": report.get("findings", [])}
    atomic_write_text(out / "ablation.md", render_axes(tables, report) + "\n\n" + render_effects(effects))
    atomic_write_json(out / "ablation.json", summary)
    return summary


# ------------------------------------------------------------------------------------------------------------------
# the sweep

@contextlib.contextmanager
def _sweep_lock(out: Path):
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".ablate.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `gendistill ablate` is running on {out}") from None
        yield


def run_ablation(spec_path: str | Path, *, resume: bool = False, check: bool = False, cluster: str = "local",
                 out_dir: str | None = None, overrides=(), only=(), on_job=None) -> dict:
    """Plan, then run every missing stage and eval, then merge and report. Returns ablation.json's content (or, with
    `check`, {"plan": ..., "text": ...}). `on_job(job)` is called before each local job (tests stop a sweep with it)."""
    if cluster not in CLUSTERS:
        raise UserError(f"--cluster: expected one of {CLUSTERS}, got {cluster!r}")
    spec = load_spec(spec_path, out_dir, overrides, only)
    out = Path(spec["out_dir"])
    plan = build_plan(spec)
    if check:
        text = describe(plan, out)
        print(text)
        return {"plan": plan, "text": text}
    if (out / "plan.json").is_file() and not resume:
        raise UserError(f"{out} already holds an ablation; pass --resume to continue it (finished stages are reused)")
    with _sweep_lock(out):
        _pretokenize(spec, plan)
        atomic_write_json(out / "plan.json", plan)
        for wave in waves(plan, out):
            print(f"[ablate] wave of {len(wave)} job(s): {', '.join(_job_name(j) for j in wave)}", flush=True)
            if on_job is not None:
                for job in wave:
                    on_job(job)
            run_wave(out, wave, cluster, spec["executor"])
        from gendistill.evaluation.report import build_report

        report_dir = merge_evals(plan, out)
        paths = build_report([report_dir], out=report_dir)
        summary = summarize(plan, out, json.loads(paths["json"].read_text()))
    print((out / "ablation.md").read_text())
    print(f"[ablate] {len(plan['runs'])} runs, {summary['unique_stages']} unique stages "
          f"(of {summary['stage_runs_without_sharing']}); {out / 'ablation.md'}, report {paths['html']}", flush=True)
    return summary


def _pretokenize(spec: dict, plan: dict) -> None:
    """Tokenise each data source once, long enough for every stage that reads it, before jobs run in parallel (two
    jobs must never build the same token cache at once)."""
    from gendistill.distill import parallel
    from gendistill.distill.data import detect_kind
    from gendistill.distill.trainer import load_tokenizer, sized_corpus

    by_source: dict[str, tuple] = {}
    tokenizers: dict[str, object] = {}
    for run in expand(spec):
        recipe = run_recipe_of(spec, run)
        tok_key = json.dumps(recipe.tokenizer or recipe.teacher, sort_keys=True, default=str)
        for stage in recipe.stages:
            source = recipe.data[stage.data]
            source = dataclasses.replace(source, kind=detect_kind(source) if source.kind == "auto" else source.kind)
            key = json.dumps([dataclasses.asdict(source), tok_key], sort_keys=True)
            entry = by_source.setdefault(key, (source, recipe, []))
            entry[2].append(stage)
            tokenizers.setdefault(tok_key, recipe)
    env = parallel.setup()
    loaded = {k: load_tokenizer(r) for k, r in tokenizers.items()}
    for key, (source, recipe, stages) in by_source.items():
        tok_key = json.loads(key)[1]
        sized_corpus(source, loaded[tok_key], recipe.cache_dir, stages, env)


# ------------------------------------------------------------------------------------------------------------------
# CLI

def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run an ablation: variants of a recipe over axes and seeds, "
                                "stages shared where variants agree, every variant evaluated, one report by axis.",
                                epilog="examples:\n  %(prog)s ablations/world-gpu.yaml --check\n"
                                       "  %(prog)s ablations/world-gpu.yaml --resume\n"
                                       "  %(prog)s ablations/paper.yaml --cluster slurm",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", help="ablation spec YAML (base recipe, axes, seeds, eval)")
    p.add_argument("--check", action="store_true", help="print the plan (variants, shared stages, tokens, time)")
    p.add_argument("--resume", action="store_true", help="continue a sweep: finished stages and evals are kept")
    p.add_argument("--cluster", default="local", choices=CLUSTERS,
                   help="local: the visible GPUs (one job each) or CPU; slurm: submitit's SLURM executor with the "
                        "spec's `executor` parameters; debug: submitit's in-process executor")
    p.add_argument("--out", help="output directory (default: the spec's out_dir)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override for every variant (after the spec's `set`), e.g. '*.seq_len=256'")
    p.add_argument("--only", type=lambda t: [a.strip() for a in t.split(",") if a.strip()], default=[],
                   metavar="AXIS,...", help="run only these axes of the spec ('variants': its named variants)")
    return p


def main(args) -> int:
    run_ablation(args.spec, resume=args.resume, check=args.check, cluster=args.cluster, out_dir=args.out,
                 overrides=args.overrides, only=args.only)
    return 0


if __name__ == "__main__":  # a local GPU worker: python -m gendistill.ablate OUT JOB_JSON
    run_job(sys.argv[1], json.loads(sys.argv[2]))
