"""`gendistill demo`: the whole system on a world it generates itself, end to end.

world -> teacher (trained from scratch, or reused from the cache) -> convert -> the four GenDistill stages ->
evaluate teacher and student both ways (log-likelihood and generation) -> report.html/.md -> a summary table.
Each step is an existing piece: `world.build_world`, `world.teacher.train_or_reuse_teacher` (the world's teacher
recipe), `distill.run_recipe` (the distillation recipe: its conversion step, then the stages; both recipes bundled
in gendistill/recipes/demo/), `evaluation.evaluate`, `modeling.cache_bytes`.
Every phase is timed; the times are printed at the end and kept in summary.json ("phases").

On a GPU, fla's Triton kernels compile and autotune on their first call at each autotune key, which on a machine
with no Triton cache takes minutes. `warm_kernels` makes those first calls in a second process while the teacher
trains (it compiles on the CPU the teacher leaves idle): the demo's own recipes and evaluation, one step each, on a
random-weight model of the same shapes. fla keeps its autotune results in Triton's on-disk cache, so the demo's
student finds every kernel compiled and tuned. The configurations are timed while the teacher trains on the same
GPU, so they may not be the fastest; the demo's accuracies do not depend on them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gendistill.io import UserError, atomic_write_json
from gendistill.world.teacher import (MINI_OVERRIDES, ONE_STEP_OVERRIDES, SCALES, TEACHER_RECORD, cached_teacher_dir,
                                      demo_recipe, stage_rows, train_or_reuse_teacher, train_teacher,
                                      world_data_overrides)

TEACHER_TARGET = 0.95  # generation accuracy the teacher should reach on the seen people's questions, open and MC
EVAL_TASKS = ("world_qa_mc_seen", "world_qa_open_seen", "world_qa_mc_extraction", "world_qa_open_extraction")
# scale -> world preset, eval item cap per task (None: all), long-context recall tasks, recall items per length,
# eval batch size. The noise budget: every item of the world's eval tasks is scored, so the seen tasks' 95 % intervals
# stay within about +-5 pp on CPU (336 items per seen task: 168 facts, each in both held-out phrasings; 192 per
# extraction task) and +-3 pp at GPU scale (1,200 items per task, +-2.8 pp at worst); the 60 and 200 items of earlier
# demos gave up to +-12 and +-7 pp, which is how two machines came to report figures 10-17 pp apart (issue 20). On
# CPU that is 3.7x the items of the 60-item demo, whose evaluation took ~15 s of its 3.6 min.
# Recall at GPU scale: 1K-8K, the length of the world's long-context documents (long_doc_tokens), which a teacher that
# learns retrieval is to be trained on, and 16K, twice that. The bundled teacher trains on 512-token sequences only
# (its long stage wiped it: teacher-gpu.yaml), so these rows show what it cannot do, until it can. 20 items per
# length (+-13 pp at 90 %): building the items (fitting each prompt to its length with the tokenizer) takes more of
# the demo's time per item than scoring them. Batches of 120 divide the 1,200 items of a task (and their 4,800 MC
# options): every batch has the shape the kernel warm-up ran, so no fla kernel meets a new autotune key mid-eval.
EVAL_SETTINGS = {
    "mini": dict(world="tiny", limit=16, recall="niah_single@256", recall_samples=4, batch_size=16),
    "cpu": dict(world="cpu", limit=None, recall="niah_single@512,1k", recall_samples=10, batch_size=32),
    "gpu": dict(world="gpu", limit=None, recall="niah_single@1k,2k,4k,8k,16k,niah_multikey@4k,16k,"
                                                "assoc_recall@1k,4k,8k,16k", recall_samples=20, batch_size=120),
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("GENDISTILL_CACHE", Path.home() / ".cache" / "gendistill"))


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def build_world_dir(out: Path, seed: int, preset: str) -> Path:
    """(Re)build the world under `out`: a second or so, and an earlier demo's world may be of another seed, scale or
    world version (the teacher cache key hashes world.json, so the same world finds the same teacher)."""
    from gendistill.world import build_world

    world_dir = out / "world"
    build_world(seed=seed, scale=preset).save(world_dir, overwrite=True)
    return world_dir


def distill_student(teacher_dir: Path, world_dir: Path, out: Path, scale: str,
                    overrides: list[str] | tuple[str, ...] = ()) -> dict:
    from gendistill.distill import run_recipe

    recipe = demo_recipe("distill", scale)
    settings = world_data_overrides(recipe, world_dir) + [
        f"teacher.path={teacher_dir}", f"tokenizer.path={teacher_dir}", f"out_dir={out / 'distill'}"]
    if scale == "mini":
        settings += MINI_OVERRIDES
    return run_recipe(recipe, settings + list(overrides), overwrite=True)


def _eval_tasks(world_dir: Path, settings: dict) -> str:
    return ",".join(str(world_dir / "tasks" / f"{t}.yaml") for t in EVAL_TASKS) + "," + settings["recall"]


def _eval_kwargs(scale: str, settings: dict) -> dict:
    # On the GPU a batch may hold 128K tokens (the default 64K fits three 16K recall prompts): decoding is bound by
    # the steps, not the rows, and the teacher's padding mask for seven 16K prompts is under 2 GB.
    return dict(recall_samples=settings["recall_samples"], batch_size=settings["batch_size"],
                max_batch_tokens=1 << 17 if scale == "gpu" else 1 << 16,
                device="cuda" if scale == "gpu" else "cpu", dtype="bfloat16" if scale == "gpu" else "float32")


def warm_kernels(world_dir: Path, out: Path, scale: str, seed: int = 0, limit: int | None = None) -> dict:
    """Call every kernel the demo's student will call, at the demo's shapes: the teacher recipe and the distillation
    recipe one step per stage (a random-weight teacher of the real configuration, converted), then the demo's
    evaluation of that student on one batch per task (`limit` items; default the batch size) and on every recall
    task. What it leaves behind is the Triton cache (compiled kernels, fla's autotune results); `out` is deleted.
    Returns the seconds per part."""
    from gendistill.evaluation import evaluate

    world_dir, out = Path(world_dir), Path(out)
    settings, times = EVAL_SETTINGS[scale], {}
    try:
        start = time.perf_counter()
        teacher = train_teacher(world_dir, out / "teacher", scale, seed, overrides=ONE_STEP_OVERRIDES)
        times["teacher"] = time.perf_counter() - start
        start = time.perf_counter()
        run = distill_student(teacher, world_dir, out, scale, overrides=ONE_STEP_OVERRIDES)
        times["distill"] = time.perf_counter() - start
        start = time.perf_counter()
        evaluate({"student": run["final_model"]}, tasks=_eval_tasks(world_dir, settings), out=out / "eval",
                 limit=limit or settings["batch_size"], overwrite=True, report=False, progress=False,
                 **_eval_kwargs(scale, settings))
        times["eval"] = time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return times


def warm_main(argv: list[str]) -> int:
    """Entry point of the warm-up process: WORLD OUT SCALE SEED LIMIT TIMES_JSON (LIMIT 0: the batch size)."""
    world_dir, out, scale, seed, limit, times_json = argv
    times = warm_kernels(Path(world_dir), Path(out), scale, int(seed), int(limit) or None)
    atomic_write_json(Path(times_json), times)
    return 0


class KernelWarmup:
    """`warm_kernels` in a child process (its output in `log`), started now; `wait()` joins it."""

    def __init__(self, world_dir: Path, out: Path, scale: str, seed: int, limit: int | None = None):
        self.log_path, self.times_path = out.with_suffix(".log"), out.with_suffix(".json")
        self.times_path.unlink(missing_ok=True)
        self.started = time.perf_counter()
        code = "import sys; from gendistill.demo import warm_main; sys.exit(warm_main(sys.argv[1:]))"
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-c", code, str(world_dir), str(out), scale, str(seed),
                                             str(limit or 0), str(self.times_path)], stdout=log,
                                            stderr=subprocess.STDOUT)

    def wait(self) -> dict:
        """Block until the warm-up is done; its record (seconds, and how long this process waited for it)."""
        waited = time.perf_counter()
        code = self.process.wait()
        now = time.perf_counter()
        record = {"seconds": now - self.started, "waited": now - waited, "exit_code": code, "log": str(self.log_path)}
        if self.times_path.exists():
            record["parts"] = json.loads(self.times_path.read_text())
        if code != 0:
            print(f"warning: the kernel warm-up failed (exit code {code}, see {self.log_path}); the kernels compile "
                  "and autotune on their first call instead", flush=True)
        return record

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def summary_rows(report: dict, student_config, teacher_config) -> list[dict]:
    """Teacher vs student on every world task: accuracy under LL (the report's LL metric for the task) and under
    generation, each with its 95 % interval, and the points behind the teacher in each mode (the paper's gap)."""
    import torch

    from gendistill.modeling import cache_bytes

    teacher, student = report["teacher"], report["students"][0]
    rows = []
    for column in ("average", *[t for t in EVAL_TASKS if t in report["scores"][teacher]]):
        t, s = report["scores"][teacher].get(column, {}), report["scores"][student].get(column, {})
        ll = report["ll_mode"].get(column)
        head = report["headline"].get(student, {}).get(column, {})
        row = {"task": column, "ll_metric": ll}
        for who, scores in (("teacher", t), ("student", s)):
            for mode, key in (("ll", ll), ("gen", "gen_acc")):
                row[f"{who}_{mode}"] = scores.get(key) if key else None
                row[f"{who}_{mode}_ci"] = scores.get("ci", {}).get(key) if key else None
        for mode in ("ll", "gen"):
            est = head.get(mode) or {}
            row[f"behind_{mode}"] = est.get("value")
            row[f"behind_{mode}_ci"] = [est["low"], est["high"]] if est.get("low") is not None else None
        rows.append(row)
    # Growth per token (attention KV) and the fixed part (KDA state), bf16, from the configs.
    per_token = {}
    for name, cfg in (("teacher", teacher_config), ("student", student_config)):
        at_1k, at_2k = (cache_bytes(cfg, n, 1, torch.bfloat16) for n in (1024, 2048))
        per_token[name] = {"per_token": (at_2k - at_1k) / 1024, "fixed": at_1k - (at_2k - at_1k)}
    return rows, per_token


def _with_ci(value: float | None, interval, signed: bool = False) -> str:
    """'88.3 [82.1, 93.5]' (percent or points) or '-'."""
    if value is None:
        return "-"
    text = f"{100 * value + 0.0:+.1f}" if signed else f"{100 * value:.1f}"
    return text + (f" [{100 * interval[0] + 0.0:.1f}, {100 * interval[1] + 0.0:.1f}]" if interval else "")


def print_summary(rows: list[dict], per_token: dict, seconds: float, paths: dict) -> None:
    width = 140
    print("\n" + "=" * width)
    print("accuracy % [95 % interval]; behind = points the student is behind the teacher (paired interval)\n"
          "retention, chance-corrected retention, answer rates and the significance tests: the report")
    print(f"{'task':24s} {'teacher LL':>19s} {'student LL':>19s} {'teacher gen':>19s} {'student gen':>19s} "
          f"{'behind LL':>18s} {'behind gen':>18s}")
    for r in rows:
        cells = [_with_ci(r[k], r[k + "_ci"]) for k in ("teacher_ll", "student_ll", "teacher_gen", "student_gen")]
        behind = [_with_ci(r[k], r[k + "_ci"]) for k in ("behind_ll", "behind_gen")]
        print(f"{r['task']:24s} " + " ".join(f"{c:>19s}" for c in cells) + " " + " ".join(f"{c:>18s}" for c in behind))
    metrics = sorted({r["ll_metric"] for r in rows if r["ll_metric"]})
    if metrics:
        print(f"LL metric: {', '.join(metrics)} (acc_norm: log-likelihood per character, lm-eval's cloze metric)")
    t, st = per_token["teacher"], per_token["student"]
    print(f"KV cache per token (bf16): teacher {t['per_token'] / 1024:.1f} KiB, student {st['per_token'] / 1024:.1f} "
          f"KiB ({st['per_token'] / t['per_token']:.0%}); student's fixed KDA state {st['fixed'] / 2**20:.2f} MiB")
    for task in ("world_qa_open_seen", "world_qa_mc_seen"):
        seen = next((r for r in rows if r["task"] == task), None)
        if seen and (seen["teacher_gen"] or 0) < TEACHER_TARGET:
            print(f"note: the teacher answers {100 * (seen['teacher_gen'] or 0):.1f}% of {task} right (target "
                  f"{TEACHER_TARGET:.0%}); retention only means something once the teacher knows its world")
    print(f"report: {paths['html']}  (also {paths['md'].name}, {paths['json'].name})   total {seconds / 60:.1f} min")
    print("=" * width)


def run_demo(scale: str = "cpu", out: str | Path = "runs/demo", seed: int = 0, cache: str | Path | None = None,
             fresh_teacher: bool = False, warmup: bool = True) -> dict:
    """`warmup` (GPU only): run `warm_kernels` in a second process while the teacher trains (a cached teacher leaves
    nothing to overlap with, so then there is no warm-up)."""
    import torch
    from transformers import AutoConfig

    from gendistill.evaluation import evaluate

    if scale not in SCALES:
        raise UserError(f"--scale must be one of {SCALES}, got {scale!r}")
    if scale == "gpu" and not torch.cuda.is_available():
        raise UserError("--scale gpu needs a CUDA GPU; use --scale cpu on this machine")
    if scale == "gpu":  # before fla's first import (the warm-up process inherits it): pinned configs, persistent cache
        from gendistill.kernels.cache import configure_for_cuda, describe

        print(describe(configure_for_cuda()), flush=True)
    settings = EVAL_SETTINGS[scale]
    out, cache = Path(out), Path(cache) if cache else default_cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    phases: dict = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[name] = now - clock
        clock = now

    _step(f"1/5 world ({settings['world']} preset, seed {seed})")
    world_dir = build_world_dir(out, seed, settings["world"])
    lap("world")
    teacher_dir = cached_teacher_dir(world_dir, scale, seed, cache)
    reuse = (teacher_dir / "config.json").exists() and not fresh_teacher
    warm = KernelWarmup(world_dir, out / "kernel_warmup", scale, seed) if warmup and scale == "gpu" and not reuse \
        else None
    try:
        _step("2/5 teacher: Qwen3 trained from scratch on the world (pretraining, chat SFT)"
              + (f"; fla's kernels warm up meanwhile in a second process ({warm.log_path})" if warm else ""))
        teacher_dir = train_or_reuse_teacher(world_dir, scale, seed, cache, fresh_teacher)
        lap("teacher")
        if warm:
            phases["warmup"] = warm.wait()
            lap("warmup_wait")
    finally:
        if warm:
            warm.stop()
    _step("3/5 distillation: convert (the run's first step), then the four GenDistill stages")
    run = distill_student(teacher_dir, world_dir, out, scale)
    student_dir = Path(run["final_model"])
    lap("distill")
    _step("4/5 evaluate teacher and student both ways (log-likelihood and generation)")
    report = evaluate({"student": str(student_dir)}, teacher={"teacher": str(teacher_dir)},
                      tasks=_eval_tasks(world_dir, settings), out=out / "eval", limit=settings["limit"],
                      overwrite=True, run=out / "distill", **_eval_kwargs(scale, settings))
    lap("eval")
    _step("5/5 report")
    paths = {k: out / "eval" / f"report.{k}" for k in ("json", "md", "html")}
    rows, per_token = summary_rows(report, AutoConfig.from_pretrained(student_dir),
                                   AutoConfig.from_pretrained(teacher_dir))
    lap("report")
    seconds = time.perf_counter() - start
    phases["total"] = seconds
    record = teacher_dir / TEACHER_RECORD
    teacher_stages = json.loads(record.read_text())["stages"] if record.exists() else []
    summary = {"scale": scale, "seed": seed, "world": str(world_dir), "teacher": str(teacher_dir),
               "teacher_reused": reuse, "converted": run.get("converted_model"), "student": str(student_dir),
               "report": {k: str(v) for k, v in paths.items()}, "rows": rows,
               "no_answer": {name: {task: scores.get("no_answer") for task, scores in report["scores"][name].items()}
                             for name in (report["teacher"], *report["students"])},
               "recall": report.get("recall") or {},
               "kv_bytes_per_token": per_token, "seconds": seconds, "eval_seconds": phases["eval"],
               "phases": phases, "teacher_stages": teacher_stages, "stages": stage_rows(run)}
    atomic_write_json(out / "summary.json", summary)
    print_summary(rows, per_token, seconds, paths)
    print_phases(phases, teacher_stages, summary["stages"], reuse)
    return summary


def print_phases(phases: dict, teacher_stages: list[dict], stages: list[dict], reused: bool) -> None:
    def stage_list(rows):
        return ", ".join(f"{r['name']} {r['seconds']:.0f}" for r in rows)

    parts = [f"world {phases['world']:.0f}",
             f"teacher {phases['teacher']:.0f}" + (" (cached)" if reused else f" ({stage_list(teacher_stages)})")]
    warm = phases.get("warmup")
    if warm:
        parts.append(f"kernel warm-up {warm['seconds']:.0f} beside the teacher (waited {warm['waited']:.0f} more)")
    parts += [f"convert+distill {phases['distill']:.0f} ({stage_list(stages)})", f"eval {phases['eval']:.0f}",
              f"report {phases['report']:.0f}"]
    print(f"phases, seconds: {'; '.join(parts)}; total {phases['total']:.0f} ({phases['total'] / 60:.1f} min)")


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--scale", default="cpu", choices=SCALES,
                   help="cpu: 2-core laptop, minutes (default); gpu: larger world and 28-layer teacher on one GPU; "
                        "mini: the CI-sized miniature")
    p.add_argument("--out", default="runs/demo", help="output directory (world, distillation run, eval, report)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=None, help="where trained teachers are kept (default ~/.cache/gendistill, "
                                                 "or $GENDISTILL_CACHE)")
    p.add_argument("--fresh-teacher", action="store_true", help="train the teacher even if a cached one exists")
    p.add_argument("--no-warmup", action="store_true", help="GPU: do not compile and autotune fla's kernels in a "
                                                              "second process while the teacher trains")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 is "
                                                              "faster when other work shares the cores)")
    return p


def main(args) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    run_demo(args.scale, args.out, args.seed, args.cache, args.fresh_teacher, warmup=not args.no_warmup)
    return 0
