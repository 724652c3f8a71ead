"""The report: the same items scored by log-likelihood and by generation, side by side, for teacher and students,
with the uncertainty of every number.

Everything is computed from the item records of one or more eval directories, so `gendistill report A B` can put
students evaluated at different times next to one teacher. report.json holds every number; report.md and the
self-contained report.html (plots embedded as PNG) render the same tables from it.

Accuracies are fractions in [0, 1], each with a 95 % interval (gendistill.evaluation.stats: percentile bootstrap over
items, paired across models on the same items; report["methods"] names every method). The headline is the paper's
gap: points behind the teacher under log-likelihood and under generation, side by side. Retention = student /
teacher, and chance-corrected retention (student - chance) / (teacher - chance) beside it (chance = 1/k on k-way
multiple choice, 0 on open questions). A finding that rests on a difference ("LL hides the gap", a ranking
reversal) is stated only when the difference is significant after Holm's correction across tasks; otherwise the
report says the data cannot tell. "Average" is the unweighted mean over the multiple-choice tasks (the only ones
scored both ways), recall tasks apart; its intervals come from a stratified bootstrap (each task resampled apart).
"""
from __future__ import annotations

import base64
import html
import io
import json
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gendistill.evaluation import stats
from gendistill.evaluation.tasks import LETTERS
from gendistill.io import UserError, atomic_write_json, atomic_write_text

LL_MODES = ("ll_acc", "ll_acc_norm")
GEN_MODES = ("gen_acc", "gen_acc_sampled")
MODES = LL_MODES + GEN_MODES
MODE_LABELS = {"ll_acc": "LL acc", "ll_acc_norm": "LL acc_norm", "gen_acc": "Gen acc (greedy)",
               "gen_acc_sampled": "Gen acc (sampled)"}
# Collapse: one letter is at least half of the answers and 1.5x its share among the gold answers.
COLLAPSE_SHARE, COLLAPSE_RATIO, COLLAPSE_MIN_ANSWERS = 0.5, 1.5, 10
LOOP_THRESHOLD = 0.5  # an output whose token 3-grams are at least half repeats is looping
N_EXAMPLES = 3  # example outputs per task and student
DEFAULT_GROUP = "all"  # students with no group form one group


# ---------------------------------------------------------------- loading

SAFE_NAME = re.compile(r"^[\w.@-]+$")  # model and task names: they become records/<model>/<task>.jsonl


def read_manifest(directory: str | Path) -> dict:
    """An eval directory's manifest.json, checked: valid JSON with `models` (name -> {role, ...}) and `tasks`, and
    every model and task name safe as a path component (names become records/<model>/<task>.jsonl)."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{directory} is not an eval directory (no manifest.json); run `gendistill eval --out "
                        f"{directory}` first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path}: not valid JSON ({err}); rerun `gendistill eval` for this directory") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("models"), dict) \
            or not isinstance(manifest.get("tasks"), dict):
        raise UserError(f"{path}: incomplete manifest (expected `models` and `tasks` mappings); rerun `gendistill "
                        "eval` for this directory")
    for kind, names in (("model", manifest["models"]), ("task", manifest["tasks"])):
        for name, info in names.items():
            if not SAFE_NAME.match(name) or name in (".", ".."):
                raise UserError(f"{path}: {kind} name {name!r} is not a plain name (letters, digits, ._@-); it "
                                "would be used as a path")
            if not isinstance(info, dict) or (kind == "model" and info.get("role") not in ("teacher", "student")):
                raise UserError(f"{path}: {kind} {name!r} has an incomplete entry: {info!r}")
    return manifest


def load_eval_dirs(dirs: Sequence[str | Path]) -> dict:
    """Merge eval directories: the first teacher found is the teacher; a student name seen twice gets @dir."""
    models: dict[str, dict] = {}
    tasks: dict[str, dict] = {}
    records: dict[str, dict[str, list[dict]]] = {}
    lm_eval: dict[str, dict] = {}
    settings, notes, runs = [], [], []
    teacher = None
    for d in map(Path, dirs):
        manifest = read_manifest(d)  # names checked before they are used as paths
        settings.append({"dir": str(d), "created": manifest.get("created"), **manifest.get("settings", {})})
        if manifest.get("run"):
            runs.append({"dir": str(d), "run": manifest["run"]})
        for failure in manifest.get("failed") or []:  # tasks refused or failed while scoring: said, not dropped
            who = f"{failure['model']}: " if failure.get("model") else ""
            notes.append(f"{d}: {who}task {failure.get('task')} not scored: {failure.get('error')}")
        for name, info in manifest["models"].items():
            new_name = name
            if info["role"] == "teacher":
                if teacher is not None:
                    notes.append(f"{d}: teacher {name!r} skipped (teacher is {teacher!r} from an earlier directory)")
                    continue
                teacher = name
            elif name in models:
                new_name = f"{name}@{d.name}"
            models[new_name] = {**info, "dir": str(d)}
            records[new_name] = {}
            for path in sorted((d / "records" / name).glob("*.jsonl")):
                records[new_name][path.stem] = [json.loads(line) for line in path.read_text().splitlines() if line]
            if (d / "lm_eval" / f"{name}.json").is_file():
                lm_eval[new_name] = json.loads((d / "lm_eval" / f"{name}.json").read_text())["results"]
        for task, meta in manifest["tasks"].items():
            tasks.setdefault(task, meta)
    return {"models": models, "teacher": teacher, "tasks": tasks, "records": records, "lm_eval": lm_eval,
            "settings": settings, "notes": notes, "runs": runs}


def load_training_curves(run_dir: str | Path) -> dict[str, list[dict]]:
    """{stage: metrics lines} from a distillation run directory (NN-<stage>/metrics.jsonl, as distill writes it)."""
    curves = {}
    for path in sorted(Path(run_dir).glob("*/metrics.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if lines:
            curves[lines[0].get("stage") or path.parent.name] = lines
    return curves


# ---------------------------------------------------------------- per-item outcomes

def primary_gen(record: dict) -> dict | None:
    """The output pathologies look at: greedy when it was run, else the first sampling seed."""
    gen = record.get("gen") or {}
    return gen.get("greedy") or (gen[sorted(gen)[0]] if gen else None)


def item_outcomes(records: list[dict]) -> dict[str, np.ndarray]:
    """Per-item outcome vectors of one model on one task (in the records' order): 0/1 correctness under each mode
    (sampled generation: the share of seeds right), whether the primary generation gave an answer, and both."""
    out: dict[str, np.ndarray] = {}
    if records and "ll" in records[0]:
        for mode, key in (("ll_acc", "ll_pred"), ("ll_acc_norm", "ll_pred_norm"), ("ll_acc_bytes", "ll_pred_bytes")):
            out[mode] = np.array([float(r[key] == r["answer"]) for r in records])
    labels = sorted({label for r in records for label in r.get("gen", {})})
    if "greedy" in labels:
        out["gen_acc"] = np.array([float(r["gen"]["greedy"]["correct"]) for r in records])
    seeds = [label for label in labels if label != "greedy"]
    if seeds:
        out["gen_acc_sampled"] = np.array([np.mean([float(r["gen"][s]["correct"]) for s in seeds]) for r in records])
    if labels:
        primary = [primary_gen(r) for r in records]
        out["answered"] = np.array([float(p is not None and p["extracted"] is not None) for p in primary])
        out["answered_correct"] = np.array([float(p is not None and p["extracted"] is not None and p["correct"])
                                            for p in primary])
    return out


def task_scores(records: list[dict]) -> dict:
    """Point metrics of one model on one task from its records (no intervals): the accuracies under each mode,
    answer rate, no-answer share and accuracy when answered."""
    outcomes = item_outcomes(records)
    scores: dict = {"n": len(records)}
    scores.update({k: float(v.mean()) for k, v in outcomes.items() if k in MODES + ("ll_acc_bytes",)})
    if "answered" in outcomes:
        answered = outcomes["answered"].sum()
        scores.update(answer_rate=float(outcomes["answered"].mean()), no_answer=float(1 - outcomes["answered"].mean()),
                      acc_when_answered=float(outcomes["answered_correct"].sum() / answered) if answered else None)
    return scores


def chance_level(records: list[dict]) -> float:
    """Accuracy of a uniform guess that always answers: mean 1/k over k-way multiple-choice items, 0 for open ones."""
    return float(np.mean([1 / r["n_choices"] if r.get("n_choices") else 0.0 for r in records])) if records else 0.0


def cloze(task_meta: dict) -> bool:
    """Cloze-style multiple choice: LL ranks the options' texts (not their letters), as lm-eval's ARC/HellaSwag."""
    if "ll_target" in task_meta:
        return task_meta["ll_target"] == "text"
    return task_meta.get("extract") == "choice_text"  # manifests before ll_target was recorded


def ll_mode_for(task_metas: Sequence[dict]) -> str:
    """The LL metric the findings use: lm-eval's acc_norm (log-likelihood / character length of the continuation)
    where every task is cloze-style, since options of different lengths make raw LL favour short ones; acc otherwise
    (a letter is one token, nothing to normalise)."""
    return "ll_acc_norm" if task_metas and all(cloze(m) for m in task_metas) else "ll_acc"


def _samples(values: np.ndarray, clusters, seed: int) -> np.ndarray:
    return stats.bootstrap_means(values, clusters, seed=seed)[0]


def _est(value, samples) -> dict:
    return stats.estimate(value, samples)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def ratio(student: float | None, teacher: float | None) -> float | None:
    return None if student is None or not teacher else student / teacher


# ---------------------------------------------------------------- generation pathologies

def repeated_ngram_share(tokens: Sequence[int], n: int = 3) -> float:
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def first_departure(student: Sequence, teacher: Sequence) -> int | None:
    """First position where two greedy outputs differ (None: identical)."""
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s != t:
            return i
    return None if len(student) == len(teacher) else min(len(student), len(teacher))


def letter_distribution(records: list[dict]) -> dict:
    """Chosen-letter shares (over answered multiple-choice outputs) against the gold letters, and the collapse flag."""
    mc = [r for r in records if r["kind"] == "multiple_choice" and primary_gen(r)]
    chosen = Counter(LETTERS[p["extracted"]] if p["extracted"] is not None else "none"
                     for p in map(primary_gen, mc))
    gold = Counter(LETTERS[r["answer"]] for r in mc)
    answered = sum(v for k, v in chosen.items() if k != "none")
    shares = {k: v / answered for k, v in sorted(chosen.items()) if k != "none"} if answered else {}
    gold_shares = {k: v / len(mc) for k, v in sorted(gold.items())} if mc else {}
    top = max(shares, key=shares.get) if shares else None
    collapse = bool(top and answered >= COLLAPSE_MIN_ANSWERS and shares[top] >= COLLAPSE_SHARE
                    and shares[top] >= COLLAPSE_RATIO * gold_shares.get(top, 0.0))
    # The table and the chart both show shares of all multiple-choice outputs, "none" included (the collapse test
    # looks at answered outputs only: abstaining is not favouring a letter).
    of_all = {k: v / len(mc) for k, v in sorted(chosen.items())} if mc else {}
    return {"chosen": shares, "of_all": of_all, "gold": gold_shares, "answered": answered,
            "unanswered": chosen.get("none", 0),
            "top_letter": top, "top_share": shares.get(top) if top else None, "collapse": collapse}


def pathologies(records: dict[str, list[dict]], teacher_records: dict[str, list[dict]] | None,
                same_tokenizer: bool = True) -> dict:
    """Per model, over all its tasks (recall included): letters, looping, never stopping, length, departure."""
    flat = [r for task in records.values() for r in task]
    outputs = [(r, primary_gen(r)) for r in flat if primary_gen(r)]
    result: dict = {"mode": "greedy" if any("greedy" in r.get("gen", {}) for r in flat) else "first seed",
                    "letters": letter_distribution(flat), "n_outputs": len(outputs)}
    reps = [repeated_ngram_share(p.get("tokens") or p["text"].split()) for _, p in outputs]
    result["repetition_rate"] = _mean(reps)
    result["looping_share"] = _mean(float(x >= LOOP_THRESHOLD) for x in reps)
    result["never_stop_rate"] = _mean(float(not p["stopped"]) for _, p in outputs)
    result["mean_tokens"] = _mean(p["n_tokens"] for _, p in outputs)
    if teacher_records is None:
        return result
    teacher_by_key = {(r["task"], r["id"]): primary_gen(r) for task in teacher_records.values() for r in task}
    pairs = [(p, teacher_by_key[(r["task"], r["id"])]) for r, p in outputs if teacher_by_key.get((r["task"], r["id"]))]
    if not pairs:
        return result
    teacher_tokens = _mean(t["n_tokens"] for _, t in pairs)
    result["length_ratio_vs_teacher"] = ratio(_mean(s["n_tokens"] for s, _ in pairs), teacher_tokens)
    # Token positions when the tokenizers agree and greedy tokens were kept; else character positions.
    unit = "token" if same_tokenizer and all("tokens" in s and "tokens" in t for s, t in pairs) else "character"
    key = "tokens" if unit == "token" else "text"
    departures = [first_departure(s[key], t[key]) for s, t in pairs]
    departed = [d for d in departures if d is not None]
    result["first_departure"] = {
        "unit": unit, "n_compared": len(pairs), "identical_share": departures.count(None) / len(pairs),
        "median": statistics.median(departed) if departed else None, "mean": _mean(departed),
        "positions": departed}
    return result


# ---------------------------------------------------------------- the report dict

def _task_data(records: dict[str, dict[str, list[dict]]], ordered: list[str], task: str,
               notes: list[str]) -> dict | None:
    """The items every model has for `task`, in one order: records, clusters, chance level, outcomes and their
    bootstrap samples (one draw for all models: paired)."""
    present = [m for m in ordered if task in records[m]]
    common = set.intersection(*({r["id"] for r in records[m][task]} for m in present))
    ids = [r["id"] for r in records[present[0]][task] if r["id"] in common]
    if not ids:
        notes.append(f"{task}: the models share no item; left out")
        return None
    if any(len(records[m][task]) != len(ids) for m in present):
        notes.append(f"{task}: only the {len(ids)} items every model has are compared")
    by_id = {m: {r["id"]: r for r in records[m][task]} for m in present}
    recs = {m: [by_id[m][i] for i in ids] for m in present}
    labels = [(r.get("meta") or {}).get("cluster") for r in recs[present[0]]]
    clusters = [f"cluster:{c}" if c is not None else f"item:{i}" for c, i in zip(labels, ids)]
    if len(set(clusters)) == len(clusters):  # every item its own cluster: independent items (McNemar applies)
        clusters = None
    outcomes = {m: item_outcomes(recs[m]) for m in present}
    keys = [(m, k) for m in present for k in outcomes[m]]
    seed = stats.task_seed(task)
    drawn = stats.bootstrap_means(np.stack([outcomes[m][k] for m, k in keys]), clusters, seed=seed)
    samples: dict[str, dict[str, np.ndarray]] = {m: {} for m in present}
    for (m, k), row in zip(keys, drawn):
        samples[m][k] = row
    points = {m: {k: float(v.mean()) for k, v in outcomes[m].items()} for m in present}
    for m in present:  # accuracy when answered: a ratio of sums on each resample
        if "answered" in outcomes[m]:
            answered = samples[m]["answered"]
            samples[m]["acc_when_answered"] = stats.ratio_samples(samples[m]["answered_correct"], answered)
            n_answered = outcomes[m]["answered"].sum()
            points[m]["acc_when_answered"] = (float(outcomes[m]["answered_correct"].sum() / n_answered)
                                              if n_answered else None)
            points[m]["answer_rate"], samples[m]["answer_rate"] = points[m]["answered"], answered
    return {"ids": ids, "records": recs, "clusters": clusters, "seed": seed, "chance": chance_level(recs[present[0]]),
            "outcomes": outcomes, "points": points, "samples": samples}


def _interval(points: dict, samples: dict, key: str, outcomes: dict | None = None, clusters=None,
              n_items: int | None = None) -> list | None:
    """The 95 % interval of one score: the percentile bootstrap, or Wilson's where every item (cluster) has the same
    outcome and the bootstrap would collapse to a point."""
    if points.get(key) is None or key not in samples:
        return None
    values = None
    if outcomes is not None:
        values = {"answer_rate": outcomes.get("answered"),
                  "acc_when_answered": (outcomes["answered_correct"][outcomes["answered"] == 1]
                                        if "answered" in outcomes else None)}.get(key, outcomes.get(key))
    if values is not None and len(values) and np.isin(values, (0, 1)).all() and values.min() == values.max():
        n = len(values) if clusters is None or key == "acc_when_answered" else len(set(clusters))
        return list(stats.wilson(round(points[key] * n), n))
    interval = stats.percentile_interval(samples[key])
    if interval and interval[0] == interval[1] and n_items and key in ("answer_rate",) + MODES:
        # an average whose every task had one outcome throughout: Wilson over all its items
        return list(stats.wilson(round(points[key] * n_items), n_items))
    return list(interval) if interval else None


SCORE_KEYS = MODES + ("ll_acc_bytes", "answer_rate", "acc_when_answered")


def _scores(records: list[dict] | None, points: dict, samples: dict, outcomes: dict | None, clusters, n: int) -> dict:
    out: dict = {"n": n}
    out.update({k: points[k] for k in SCORE_KEYS if k in points})
    if "answer_rate" in points:
        out["no_answer"] = 1 - points["answer_rate"]
    out["ci"] = {k: _interval(points, samples, k, outcomes, clusters, n) for k in SCORE_KEYS if k in points}
    if outcomes is not None and clusters is None:  # the closed-form cross-check of the bootstrap (independent items)
        out["wilson"] = {k: list(stats.wilson(int(v.sum()), len(v))) for k, v in outcomes.items()
                         if k in MODES and np.isin(v, (0, 1)).all()}
    if records:
        seeds = sorted({label for r in records for label in r.get("gen", {}) if label != "greedy"})
        if seeds:
            by_seed = {s: float(np.mean([float(r["gen"][s]["correct"]) for r in records])) for s in seeds}
            out["gen_acc_by_seed"] = by_seed
            out["gen_acc_sampled_std"] = statistics.pstdev(by_seed.values()) if len(by_seed) > 1 else 0.0
    return out


def _difference(points_a: dict, points_b: dict, samples_a: dict, samples_b: dict, key: str,
                outcomes_a: dict | None = None, outcomes_b: dict | None = None, clusters=None) -> dict:
    """a - b on the same items; McNemar's exact p where both are 0/1 outcomes of independent items."""
    out = stats.difference_from(points_a[key], points_b[key], samples_a[key], samples_b[key])
    if outcomes_a is not None and clusters is None and key in outcomes_a:
        a, b = outcomes_a[key], outcomes_b[key]
        if np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all():
            out.update(p=stats.mcnemar_exact(a, b)["p"], test="mcnemar_exact")
    return out


def _holm_into(entries: list[dict]) -> None:
    """Holm-adjust the "p" of each entry (one per task) in place: "p_holm" and "significant" at stats.ALPHA."""
    for entry, adjusted in zip(entries, stats.holm([e["p"] for e in entries])):
        entry["p_holm"], entry["significant"] = adjusted, adjusted <= stats.ALPHA


def compute_report(loaded: dict) -> dict:
    models, teacher, tasks, records = loaded["models"], loaded["teacher"], loaded["tasks"], loaded["records"]
    notes = list(loaded["notes"])
    students = [m for m in models if models[m]["role"] != "teacher"]
    ordered = ([teacher] if teacher else []) + students
    data = {t: d for t in tasks if any(t in records[m] for m in ordered)
            for d in [_task_data(records, ordered, t, notes)] if d is not None}
    task_names = list(data)
    mc_tasks = [t for t in task_names if tasks[t]["kind"] == "multiple_choice" and not tasks[t].get("recall")]
    open_tasks = [t for t in task_names if tasks[t]["kind"] == "open" and not tasks[t].get("recall")]
    recall_tasks = [t for t in task_names if tasks[t].get("recall")]

    # points / samples per model and column (tasks, then the stratified averages)
    points = {m: {t: d["points"][m] for t, d in data.items() if m in d["points"]} for m in ordered}
    samples = {m: {t: d["samples"][m] for t, d in data.items() if m in d["samples"]} for m in ordered}
    averages = [(c, group) for c, group in (("average", mc_tasks), ("average_open", open_tasks)) if group]
    for column, group in averages:
        for m in ordered:
            if not all(t in points[m] for t in group):
                continue
            keys = [k for k in points[m][group[0]] if all(points[m][t].get(k) is not None for t in group)]
            points[m][column] = {k: float(np.mean([points[m][t][k] for t in group])) for k in keys}
            samples[m][column] = {k: np.mean([samples[m][t][k] for t in group], axis=0) for k in keys}
    chance = {t: d["chance"] for t, d in data.items()}
    chance.update({c: float(np.mean([chance[t] for t in group])) for c, group in averages})
    ll_mode = {t: ll_mode_for([tasks[t]]) for t in mc_tasks}
    if mc_tasks:
        ll_mode["average"] = ll_mode_for([tasks[t] for t in mc_tasks])
    any_greedy = any("gen_acc" in points[m].get(t, {}) for m in ordered for t in task_names)
    gen_mode = "gen_acc" if any_greedy else "gen_acc_sampled"
    columns = [c for c, _ in averages] + task_names

    def cell(m, c):  # (points, samples, outcomes, clusters) of model m in column c
        d = data.get(c)
        return points[m][c], samples[m][c], (d["outcomes"][m] if d else None), (d["clusters"] if d else None)

    scores = {m: {} for m in ordered}
    for m in ordered:
        for c in columns:
            if c in points[m]:
                p, s, o, cl = cell(m, c)
                n = len(data[c]["ids"]) if c in data else sum(len(data[t]["ids"]) for t in dict(averages)[c])
                scores[m][c] = _scores(data[c]["records"][m] if c in data else None, p, s, o, cl, n)
    report: dict = {
        "title": "gendistill evaluation report", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "teacher": teacher, "students": students, "models": models, "tasks": tasks,
        "groups": {}, "task_groups": {"multiple_choice": mc_tasks, "open": open_tasks, "recall": recall_tasks},
        "modes": [mode for mode in MODES if any(mode in scores[m].get(t, {}) for m in ordered for t in task_names)],
        "ll_mode": ll_mode, "gen_mode": gen_mode, "chance": chance,
        "methods": dict(stats.METHODS, ll_mode=(
            "LL findings use lm-eval's acc_norm (sum of log-probabilities / character length of the continuation) on "
            "cloze-style tasks (options ranked by their text) and acc (raw sum) where options are letters; both are "
            "in the tables, with acc_bytes (per byte) in report.json"),
            chance="chance = mean 1/k over k-way multiple-choice items (a guess that always answers), 0 on open "
                   "questions; chance-corrected retention = (student - chance) / (teacher - chance)",
            average="average: unweighted mean over the multiple-choice tasks, intervals from a stratified bootstrap"),
        "scores": scores, "headline": {}, "behind_teacher": {}, "retention": {}, "retention_chance": {},
        "settings": loaded["settings"], "notes": notes, "lm_eval": loaded["lm_eval"],
    }
    if teacher:
        for s in students:
            for c in columns:
                if c not in points[s] or c not in points[teacher]:
                    continue
                pt, st, ot, cl = cell(teacher, c)
                ps, ss, os_, _ = cell(s, c)
                keys = [k for k in MODES if k in pt and k in ps]
                report["behind_teacher"].setdefault(s, {})[c] = {
                    k: _difference(pt, ps, st, ss, k, ot, os_, cl) for k in keys}
                report["retention"].setdefault(s, {})[c] = {
                    k: stats.retention_from(ps[k], pt[k], ss[k], st[k]) for k in keys}
                report["retention_chance"].setdefault(s, {})[c] = {
                    k: stats.retention_from(ps[k], pt[k], ss[k], st[k], chance[c]) for k in keys}
                if gen_mode not in keys:
                    continue
                head = {"gen_mode": gen_mode, "gen": report["behind_teacher"][s][c][gen_mode]}
                lm = ll_mode.get(c)
                if lm in keys:
                    head.update(ll_mode=lm, ll=report["behind_teacher"][s][c][lm], difference=stats.difference_from(
                        head["gen"]["value"], report["behind_teacher"][s][c][lm]["value"],
                        st[gen_mode] - ss[gen_mode], st[lm] - ss[lm]))
                report["headline"].setdefault(s, {})[c] = head
            _holm_into([report["headline"][s][t]["difference"] for t in mc_tasks
                        if "difference" in report["headline"].get(s, {}).get(t, {})])
    report["groups"] = groups = {}
    for s in students:
        groups.setdefault(models[s].get("group") or DEFAULT_GROUP, []).append(s)
    report["ranking"] = {g: ranking(members, points, samples, data, ll_mode, gen_mode, mc_tasks)
                         for g, members in groups.items() if len(members) >= 2}
    fingerprint = models[teacher]["tokenizer"] if teacher else None
    report["pathologies"] = {
        m: pathologies(records[m], records[teacher] if teacher and m != teacher else None,
                       same_tokenizer=models[m]["tokenizer"] == fingerprint)
        for m in ordered}
    recall: dict = {}
    for t in recall_tasks:
        family, length = tasks[t]["recall"]["family"], tasks[t]["recall"]["length"]
        for m in ordered:
            if t in scores[m]:
                key = gen_mode if gen_mode in scores[m][t] else next(k for k in GEN_MODES if k in scores[m][t])
                interval = scores[m][t]["ci"].get(key)
                recall.setdefault(m, {}).setdefault(family, {})[str(length)] = {
                    "value": scores[m][t][key], "low": interval[0] if interval else None,
                    "high": interval[1] if interval else None}
    report["recall"] = recall
    report["examples"] = {t: examples(data[t], teacher, students) for t in task_names if teacher}
    report["training"] = {}
    for entry in loaded.get("runs", []):
        curves = load_training_curves(entry["run"])
        if curves:
            report["training"][entry["run"]] = {stage: {k: [line.get(k) for line in lines] for k in
                                                        ("step", "loss", "lr", "tokens_per_s")}
                                                for stage, lines in curves.items()}
        else:
            notes.append(f"{entry['dir']} names the run {entry['run']}, which has no */metrics.jsonl here")
    report["findings"] = findings(report)
    return report


def ranking(members: list[str], points: dict, samples: dict, data: dict, ll_mode: dict, gen_mode: str,
            mc_tasks: list[str]) -> dict:
    """The students of one group ordered under the LL metric and under generation, per multiple-choice task and on
    the average: every pair's two paired differences, a reversal where they point opposite ways (its p: the larger
    of the two tests' p, Holm-adjusted across tasks), and Kendall's tau over >= 3 students with its interval."""
    out: dict = {}
    for c in (["average"] if "average" in ll_mode else []) + mc_tasks:
        a, b = ll_mode[c], gen_mode
        present = [s for s in members if a in points[s].get(c, {}) and b in points[s].get(c, {})]
        if len(present) < 2:
            continue
        d = data.get(c)
        comp = {"modes": [a, b], "models": present,
                "order": {k: sorted(present, key=lambda s: (-points[s][c][k], s)) for k in (a, b)},
                "kendall_tau": stats.kendall_tau_from([points[s][c][a] for s in present],
                                                      [points[s][c][b] for s in present],
                                                      [samples[s][c][a] for s in present],
                                                      [samples[s][c][b] for s in present]),
                "pairs": []}
        for i, first in enumerate(present):
            for second in present[i + 1:]:
                diffs = {k: _difference(points[first][c], points[second][c], samples[first][c], samples[second][c], k,
                                        d["outcomes"][first] if d else None, d["outcomes"][second] if d else None,
                                        d["clusters"] if d else None) for k in (a, b)}
                reversed_ = diffs[a]["value"] * diffs[b]["value"] < 0
                comp["pairs"].append({"models": [first, second], a: diffs[a], b: diffs[b], "reversed": reversed_,
                                      "p": max(diffs[a]["p"], diffs[b]["p"]) if reversed_ else 1.0})
        out[c] = comp
    # Holm across the tasks for each pair (the average is one more view of the same items, not a further test)
    pairs = {tuple(p["models"]) for comp in out.values() for p in comp["pairs"]}
    for pair in pairs:
        _holm_into([p for t in mc_tasks if t in out for p in out[t]["pairs"] if tuple(p["models"]) == pair])
    return out


def _answer_text(record: dict, value) -> str:
    if value is None:
        return "no answer"
    if record.get("n_choices") and isinstance(value, int):
        return LETTERS[value]
    return str(value)


def examples(task_data: dict, teacher: str, students: list[str], n: int = N_EXAMPLES) -> dict[str, list[dict]]:
    """Per student, up to `n` items where its generation and the teacher's disagree: first where exactly one is right
    (teacher right first), then where both are wrong with different answers. Both outputs and extracted answers."""
    out = {}
    teacher_records = task_data["records"].get(teacher)
    if teacher_records is None:
        return out
    for s in students:
        if s not in task_data["records"]:
            continue
        chosen = []
        for rank in (0, 1, 2):
            for t_rec, s_rec in zip(teacher_records, task_data["records"][s]):
                t_gen, s_gen = primary_gen(t_rec), primary_gen(s_rec)
                if not t_gen or not s_gen:
                    continue
                kind = (0 if t_gen["correct"] and not s_gen["correct"] else
                        1 if s_gen["correct"] and not t_gen["correct"] else
                        2 if not t_gen["correct"] and t_gen["extracted"] != s_gen["extracted"] else None)
                if kind == rank and len(chosen) < n:
                    chosen.append({"id": s_rec["id"], "gold": _answer_text(s_rec, s_rec["answer"]),
                                   **{role: {"text": g["text"], "answer": _answer_text(r, g["extracted"]),
                                             "correct": bool(g["correct"])}
                                      for role, r, g in (("teacher", t_rec, t_gen), ("student", s_rec, s_gen))}})
        if chosen:
            out[s] = chosen
    return out


# ---------------------------------------------------------------- formatting

def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _pp(x: float | None) -> str:
    return "–" if x is None else f"{_r(x):+.1f} pp"


def _range(low, high, pp: bool = False) -> str:
    if low is None or high is None:
        return ""
    return f" [{_r(low):+.1f}, {_r(high):+.1f}]" if pp else f" [{100 * low:.1f}, {100 * high:.1f}]"


def _r(x: float) -> float:
    """x in points, rounded to 0.1 (+ 0.0 turns -0.0 into 0.0: no "-0.0 pp")."""
    return round(100 * x, 1) + 0.0


def _behind(est: dict) -> str:
    """'5.0 pp [0.0, 15.0]' (points behind, unsigned phrasing for sentences)."""
    text = f"{_r(est['value']):.1f} pp"
    return text + (f" [{_r(est['low']):.1f}, {_r(est['high']):.1f}]" if est.get("low") is not None else "")


def _ci(value: float | None, interval) -> str:
    """'88.3% [80.0, 95.0]': a score with its 95 % interval (in %)."""
    return _pct(value) + (_range(*interval) if interval and value is not None else "")


def _est_pct(est: dict | None) -> str:
    if not est or est.get("value") is None:
        return "–" if not est or not est.get("why") else "n/a"
    return _pct(est["value"], 0 if abs(est["value"]) >= 10 else 1) + _range(est["low"], est["high"])


def format_pp(est: dict | None) -> str:
    if not est or est.get("value") is None:
        return "–"
    return _pp(est["value"]) + _range(est["low"], est["high"], pp=True)


def format_p(p: float | None) -> str:
    return "–" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _label(mode: str) -> str:
    return MODE_LABELS.get(mode, mode)


# ---------------------------------------------------------------- findings

def findings(report: dict) -> list[str]:
    """The headline sentences: the paper's gap with intervals, what LL hides (only where significant), reversals
    within a group (only where significant), collapses, runaway outputs."""
    out = []
    alpha = stats.ALPHA
    mc = report["task_groups"]["multiple_choice"]
    for s in report["students"]:
        head = report["headline"].get(s, {})
        avg = head.get("average")
        if avg and "ll" in avg:
            out.append(f"{s} is {_behind(avg['ll'])} behind the teacher under LL "
                       f"({_label(avg['ll_mode'])}) and {_behind(avg['gen'])} under generation "
                       f"({_label(avg['gen_mode'])}), averaged over {len(mc)} multiple-choice task(s) "
                       "(95 % intervals).")
        tested = [t for t in mc if "difference" in head.get(t, {})]
        hides = [t for t in tested if head[t]["difference"]["significant"] and head[t]["difference"]["value"] > 0]
        shows = [t for t in tested if head[t]["difference"]["significant"] and head[t]["difference"]["value"] < 0]
        if hides:
            out.append(f"LL hides the gap for {s} on {', '.join(hides)}: "
                       + "; ".join(f"{t + ': ' if len(hides) > 1 else ''}"
                                   f"{_pp(head[t]['ll']['value'])} behind under LL, "
                                   f"{_pp(head[t]['gen']['value'])} under generation, difference "
                                   f"{format_pp(head[t]['difference'])}, Holm-adjusted p "
                                   f"{format_p(head[t]['difference']['p_holm'])}" for t in hides)
                       + f" ({len(tested)} task(s) tested, level {alpha:g}).")
        if shows:
            out.append(f"{s} is further behind the teacher under LL than under generation on {', '.join(shows)} "
                       "(" + "; ".join(f"{t}: gen − LL {format_pp(head[t]['difference'])}, Holm-adjusted p "
                                       f"{format_p(head[t]['difference']['p_holm'])}" for t in shows) + ").")
        if tested and not hides and not shows:
            smallest = min(head[t]["difference"]["p_holm"] for t in tested)
            out.append(f"Whether LL hides part of {s}'s gap the data cannot tell: on no task is the generation gap "
                       f"significantly different from the LL gap (smallest Holm-adjusted p {format_p(smallest)} over "
                       f"{len(tested)} task(s), level {alpha:g}).")
        for t in report["task_groups"]["open"]:
            if t in head:
                out.append(f"{s} on {t} (open questions, generation only): {_behind(head[t]['gen'])} behind the "
                           f"teacher.")
    for group, per_column in (report["ranking"] or {}).items():
        where = "" if group == DEFAULT_GROUP and len(report["groups"]) == 1 else f" (group {group})"
        shown: set = set()
        for t in mc:
            comp = per_column.get(t)
            for pair in (comp or {}).get("pairs", []):
                if pair["reversed"] and pair.get("significant"):
                    a, b = comp["modes"]
                    first, second = pair["models"]
                    lead_a, lead_b = (first, second) if pair[a]["value"] > 0 else (second, first)
                    out.append(f"Ranking reversal{where} on {t}: {_label(a)} puts {lead_a} ahead of {lead_b} "
                               f"({format_pp({**pair[a], 'value': abs(pair[a]['value']), 'low': None})}), "
                               f"{_label(b)} puts {lead_b} ahead ({_pp(abs(pair[b]['value']))}); both orderings "
                               f"significant, Holm-adjusted p {format_p(pair['p_holm'])} across tasks, "
                               f"level {alpha:g}.")
                    shown.add(tuple(pair["models"]))
        undecided = {tuple(p["models"]) for comp in per_column.values() for p in comp["pairs"]
                     if p["reversed"]} - shown
        for first, second in sorted(undecided):
            out.append(f"{first} and {second}{where} swap places between LL and generation on some task, but the "
                       f"data cannot tell whether either ordering is real (no reversal significant at {alpha:g} "
                       f"after Holm across tasks).")
    undefined: dict[tuple, list[str]] = {}  # (task, mode) -> students whose retention the teacher leaves undefined
    for s, per_column in report["retention"].items():
        for c, kept in per_column.items():
            for mode in (report["ll_mode"].get(c), report["gen_mode"]):
                if c not in ("average", "average_open") and mode and kept.get(mode, {}).get("why"):
                    undefined.setdefault((c, mode), []).append(s)
    for (c, mode), who in undefined.items():
        out.append(f"No retention on {c} under {_label(mode)}: the teacher scores "
                   f"{_pct(report['scores'][report['teacher']][c].get(mode))}, not above chance "
                   f"({_pct(report['chance'][c])}); beyond the teacher, it says nothing about what distillation cost "
                   f"({', '.join(who)}).")
    for m, p in report["pathologies"].items():
        letters = p["letters"]
        if letters["collapse"]:
            out.append(f"{m} answers {letters['top_letter']} in {_pct(letters['top_share'])} of its answers "
                       f"(gold: {_pct(letters['gold'].get(letters['top_letter'], 0.0))}): an 'always "
                       f"{letters['top_letter']}' collapse.")
        if (p.get("never_stop_rate") or 0) >= 0.2:
            out.append(f"{m} never stops in {_pct(p['never_stop_rate'])} of its outputs (runs into max_new_tokens).")
        if (p.get("looping_share") or 0) >= 0.2:
            out.append(f"{m} loops (repeats itself) in {_pct(p['looping_share'])} of its outputs.")
    for m, info in report["models"].items():
        if info.get("beyond_max_positions"):
            out.append(f"{m}: recall tasks {', '.join(info['beyond_max_positions'])} exceed its "
                       f"max_position_embeddings ({info['max_position_embeddings']}); attention layers extrapolate.")
    return out


# ---------------------------------------------------------------- tables (one source for Markdown and HTML)

def _table_columns(report: dict) -> list[str]:
    groups = report["task_groups"]
    return ((["average"] if groups["multiple_choice"] else []) + (["average_open"] if groups["open"] else [])
            + groups["multiple_choice"] + groups["open"])


def _caption(report: dict, column: str) -> str:
    groups = report["task_groups"]
    if column == "average":
        return f"Average over {len(groups['multiple_choice'])} multiple-choice task(s)"
    if column == "average_open":
        return f"Average over {len(groups['open'])} open task(s)"
    meta = report["tasks"][column]
    style = ""
    if meta["kind"] == "multiple_choice":
        style = ", cloze: LL ranks the options' texts" if cloze(meta) else ", LL ranks the letters"
    n = next((report["scores"][m][column]["n"] for m in report["scores"] if column in report["scores"][m]),
             meta["n_items"])
    return f"{column} ({meta['kind']}{style}, {n} items)"


def tables(report: dict) -> dict[str, list[tuple[str, list[str], list[list[str]]]]]:
    """Section -> [(caption, header, rows)], all cells already formatted."""
    teacher, ordered = report["teacher"], ([report["teacher"]] if report["teacher"] else []) + report["students"]
    sections: dict[str, list] = {}

    rows = []
    for s in report["students"]:
        for column in _table_columns(report):
            if column == "average_open" and len(report["task_groups"]["open"]) == 1:
                continue
            head = report["headline"].get(s, {}).get(column)
            if not head:
                continue
            d = head.get("difference")
            verdict = "–"
            if d and "significant" in d:
                verdict = ("LL hides the gap" if d["significant"] and d["value"] > 0 else
                           "LL shows a larger gap" if d["significant"] else "the data cannot tell")
            rows.append([s, column, _label(head["ll_mode"]) if "ll" in head else "–", format_pp(head.get("ll")),
                         format_pp(head["gen"]), format_pp(d), format_p(d.get("p_holm", d.get("p")) if d else None),
                         verdict])
    sections["headline"] = [(
        "Points behind the teacher (teacher − student; 95 % paired bootstrap intervals) under LL and under "
        f"{_label(report['gen_mode'])}; gen − LL > 0: generation shows a larger gap. p: Holm-adjusted across tasks "
        f"for tasks, unadjusted for averages; significance level {stats.ALPHA:g}",
        ["student", "tasks", "LL metric", "behind under LL", "behind under generation", "gen − LL", "p", "verdict"],
        rows)] if rows else []

    score_tables = []
    for column in _table_columns(report):
        present = [m for m in ordered if column in report["scores"][m]]
        if not present:
            continue
        modes = [mode for mode in report["modes"] if any(mode in report["scores"][m][column] for m in present)]
        header = ["model", "role"] + [MODE_LABELS[m] for m in modes] + ["answer rate", "acc when answered"]
        rows = []
        for m in present:
            s = report["scores"][m][column]
            rows.append([m, report["models"][m]["role"]] + [_ci(s.get(k), s["ci"].get(k)) for k in modes]
                        + [_ci(s.get(k), s["ci"].get(k)) for k in ("answer_rate", "acc_when_answered")])
        score_tables.append((_caption(report, column) + " — accuracy [95 % interval]", header, rows))
        if teacher and any(column in report["retention"].get(m, {}) for m in present):
            kept_modes = [k for k in modes if any(k in report["retention"].get(m, {}).get(column, {})
                                                  for m in present)]
            header = ["student"] + [f"retention {MODE_LABELS[k]}" for k in kept_modes] \
                + [f"chance-corrected {MODE_LABELS[k]}" for k in kept_modes]
            rows = [[m] + [_est_pct(report["retention"][m][column].get(k)) for k in kept_modes]
                    + [_est_pct(report["retention_chance"][m][column].get(k)) for k in kept_modes]
                    for m in report["students"] if column in report["retention"].get(m, {})]
            score_tables.append((f"{column} — retention of the teacher's accuracy: raw (student / teacher) and "
                                 f"chance-corrected ((s − c) / (t − c), c = {_pct(report['chance'][column])}); "
                                 "n/a: the teacher is not above chance", header, rows))
    sections["scores"] = score_tables

    ranking_tables = []
    for group, per_column in (report["ranking"] or {}).items():
        for column, comp in per_column.items():
            a, b = comp["modes"]
            tau = comp["kendall_tau"]
            rows = [[f"{p['models'][0]} − {p['models'][1]}", format_pp(p[a]), format_p(p[a]["p"]), format_pp(p[b]),
                     format_p(p[b]["p"]), "yes" if p["reversed"] else "no",
                     format_p(p.get("p_holm")) if p["reversed"] else "–",
                     "–" if not p["reversed"] else "see the tasks" if "significant" not in p else
                     "significant" if p["significant"] else "the data cannot tell"]
                    for p in comp["pairs"]]
            if tau is None:
                tau_text = "– (needs ≥ 3 students in the group)"
            elif tau["value"] is None:
                tau_text = "– (a ranking is all ties)"
            else:
                tau_text = f"{tau['value']:+.2f} [{tau['low']:+.2f}, {tau['high']:+.2f}]"
            caption = (f"group {group}, {column}: order by {_label(a)}: {' > '.join(comp['order'][a])}; by "
                       f"{_label(b)}: {' > '.join(comp['order'][b])}; Kendall τ {tau_text}")
            ranking_tables.append((caption, ["pair", f"Δ {_label(a)}", "p", f"Δ {_label(b)}", "p", "reversed",
                                             "p (Holm)", "verdict"], rows))
    sections["ranking"] = ranking_tables

    rows = []
    letters = sorted({k for p in report["pathologies"].values() for k in list(p["letters"]["of_all"])
                      + list(p["letters"]["gold"])} - {"none"}) + ["none"]
    for m in ordered:
        p = report["pathologies"][m]
        dep = p.get("first_departure")
        of_all = p["letters"]["of_all"]
        rows.append([m, " ".join(f"{k}:{_pct(of_all.get(k, 0.0), 0)}" for k in letters) if of_all else "–",
                     "yes" if p["letters"]["collapse"] else "no", _pct(p["repetition_rate"]), _pct(p["looping_share"]),
                     _pct(p["never_stop_rate"]), "–" if p["mean_tokens"] is None else f"{p['mean_tokens']:.1f}",
                     "–" if p.get("length_ratio_vs_teacher") is None else f"{p['length_ratio_vs_teacher']:.2f}×",
                     "–" if not dep else ("never" if dep["median"] is None
                                          else f"{dep['median']:g} ({dep['unit']}s)"),
                     "–" if not dep else _pct(dep["identical_share"])])
    gold = next((p["letters"]["gold"] for p in report["pathologies"].values() if p["letters"]["gold"]), {})
    sections["pathologies"] = [(
        "Greedy outputs over all tasks; chosen letters as shares of all multiple-choice outputs (none = no answer "
        "extracted), as in the chart; gold letters: " + (" ".join(f"{k}:{_pct(gold.get(k, 0.0), 0)}"
                                                                  for k in letters if k != "none") or "–"),
        ["model", "chosen letters", "collapse", "repetition rate", "looping outputs", "never stop", "mean tokens",
         "length vs teacher", "first departure (median)", "identical to teacher"], rows)]

    example_tables = []
    for task, per_student in report.get("examples", {}).items():
        rows = [[s, e["id"], e["gold"], e["teacher"]["answer"] + (" ✓" if e["teacher"]["correct"] else " ✗"),
                 _clip(e["teacher"]["text"]), e["student"]["answer"] + (" ✓" if e["student"]["correct"] else " ✗"),
                 _clip(e["student"]["text"])] for s, items in per_student.items() for e in items]
        if rows:
            example_tables.append((f"{task}: items where {teacher} and a student disagree under generation (greedy)",
                                   ["student", "item", "gold", "teacher's answer", "teacher's output",
                                    "student's answer", "student's output"], rows))
    sections["examples"] = example_tables

    recall_tables = []
    families = sorted({f for per_model in report["recall"].values() for f in per_model})
    for family in families:
        lengths = sorted({int(n) for per_model in report["recall"].values() for n in per_model.get(family, {})})
        rows = [[m] + [_ci(e.get("value"), (e.get("low"), e.get("high")) if e.get("low") is not None else None)
                       if (e := report["recall"].get(m, {}).get(family, {}).get(str(n))) else "–" for n in lengths]
                for m in ordered if m in report["recall"]]
        recall_tables.append((family, ["model"] + [_length(n) for n in lengths], rows))
    sections["recall"] = recall_tables

    sections["training"] = [(f"{run}: {stage}", ["steps", "first loss", "last loss", "lr (last)",
                                                  "median tokens/s"],
                             [[str(len(c["step"])), _num(c["loss"][0]), _num(c["loss"][-1]), _num(c["lr"][-1]),
                               _num(statistics.median([v for v in c["tokens_per_s"] if v is not None] or [0]))]])
                            for run, curves in report.get("training", {}).items() for stage, c in curves.items()]

    lm_tables = []
    if report["lm_eval"]:
        keys = sorted({(t, k) for r in report["lm_eval"].values() for t, metrics in r.items() for k in metrics
                       if "_stderr," not in k})
        rows = [[t, k] + [cell for m in ordered for cell in _lm_eval_cells(report["lm_eval"].get(m, {}).get(t, {}), k)]
                for t, k in keys]
        lm_tables.append(("lm-evaluation-harness results; interval: value ± 1.96 × lm-eval's standard error",
                          ["task", "metric"] + [h for m in ordered for h in (m, f"{m} 95 % interval")], rows))
    sections["lm_eval"] = lm_tables

    keys = list(dict.fromkeys(k for s in report["settings"] for k in s if k != "dir"))
    sections["settings"] = [("Evaluation settings, per eval directory", ["setting"] + [s["dir"] for s in
                                                                                     report["settings"]],
                             [[k] + [_setting(s.get(k)) for s in report["settings"]] for k in keys])] \
        if report["settings"] else []
    sections["settings"].append(("Methods", ["what", "method"], [[k, v] for k, v in report["methods"].items()]))
    return sections


def _lm_eval_cells(metrics: dict, key: str) -> list[str]:
    """lm-eval's value and the normal interval from its standard error ("acc_stderr,none"), where it has one."""
    value = metrics.get(key)
    if value is None:
        return ["–", "–"]
    name, _, where = key.partition(",")
    stderr = metrics.get(f"{name}_stderr,{where}")
    interval = (f"[{value - 1.96 * stderr:.4f}, {value + 1.96 * stderr:.4f}]"
                if isinstance(stderr, (int, float)) else "–")
    return [f"{value:.4f}", interval]


def _clip(text: str, n: int = 80) -> str:
    text = " ".join(text.split()) or "(empty)"
    return text if len(text) <= n else text[: n - 1] + "…"


def _num(x) -> str:
    return "–" if x is None else f"{x:.4g}"


def _length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _setting(value) -> str:
    if value is None or value == [] or value == "":
        return "–"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return str(value)


SECTION_TITLES = {"headline": "Points behind the teacher: LL vs generation",
                  "scores": "Scores: log-likelihood vs generation",
                  "ranking": "Ranking under each mode (within a group)",
                  "pathologies": "Generation pathologies", "examples": "Example outputs",
                  "recall": "Long-context recall", "training": "Training curves", "lm_eval": "lm-eval",
                  "settings": "Settings"}
EMPTY = {"headline": "Needs a teacher and a student.", "ranking": "Needs at least two students in a group.",
         "recall": "No recall task was run.", "lm_eval": "lm-eval was not run (gendistill eval --lm-eval TASKS).",
         "scores": "No scores.", "pathologies": "No outputs.",
         "examples": "No item where teacher and student disagree under generation (or no teacher).",
         "training": "The eval directory names no distillation run (gendistill eval --run DIR).",
         "settings": "No settings."}


def render_markdown(report: dict, sections: dict) -> str:
    lines = [f"# {report['title']}", "", f"Teacher: **{report['teacher'] or 'none'}**; students: "
             f"{', '.join(report['students']) or 'none'}"
             + ("" if list(report["groups"]) in ([], [DEFAULT_GROUP]) else
                " (groups: " + "; ".join(f"{g}: {', '.join(ms)}" for g, ms in report["groups"].items()) + ")")
             + f". Created {report['created']}.", "", "## Summary", ""]
    lines += [f"- {f}" for f in report["findings"]] or ["- Nothing stands out."]
    for key, title in SECTION_TITLES.items():
        lines += ["", f"## {title}", ""]
        if not sections[key]:
            lines.append(EMPTY[key])
        for caption, header, rows in sections[key]:
            lines += [f"**{caption}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
            lines.append("")
    lines += [f"- note: {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots and HTML

def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _yerr(values: list[float], lows: list, highs: list) -> np.ndarray:
    """Error bar lengths (2, n) in % from intervals (0 where there is none)."""
    return np.array([[100 * (v - lo) if lo is not None else 0.0 for v, lo in zip(values, lows)],
                     [100 * (hi - v) if hi is not None else 0.0 for v, hi in zip(values, highs)]]).clip(min=0)


def _bars(ax, groups: list[str], series: list[tuple[str, dict, list[dict | None]]], missing_text) -> None:
    """Grouped bars with 95 % error bars; a missing value gets a note at its place instead of an empty bar."""
    width = 0.8 / max(1, len(series))
    for i, (label, style, ests) in enumerate(series):
        xs = [k + i * width - 0.4 + width / 2 for k in range(len(groups))]
        values = [e["value"] if e and e.get("value") is not None else None for e in ests]
        drawn = [(x, v, e) for x, v, e in zip(xs, values, ests) if v is not None]
        if drawn:
            ax.bar([d[0] for d in drawn], [100 * d[1] for d in drawn], width, label=label,
                   yerr=_yerr([d[1] for d in drawn], [d[2].get("low") for d in drawn],
                              [d[2].get("high") for d in drawn]),
                   error_kw={"elinewidth": 0.8, "capsize": 2}, edgecolor="black", linewidth=0.4, **style)
        for x, v, e in zip(xs, values, ests):
            if v is None and e is not None:
                ax.text(x, 2, missing_text(e), rotation=90, ha="center", va="bottom", fontsize=6, color="dimgray")


PLOTS_NEED = "the plots need matplotlib (pip install 'gendistill[eval]'); the tables hold every number"


def plots(report: dict) -> dict[str, list[str]] | None:
    """Section -> base64 PNGs; None without matplotlib (the `eval` extra), which the core install lacks: the report
    is complete without its plots, so their absence is said in the page rather than failing the evaluation."""
    try:
        import matplotlib
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        print(f"[report] {PLOTS_NEED}", file=sys.stderr, flush=True)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, list[str]] = {}
    ordered = ([report["teacher"]] if report["teacher"] else []) + report["students"]
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(ordered)}
    gen_mode = report["gen_mode"]
    mc = report["task_groups"]["multiple_choice"]
    columns = (["average"] if mc else []) + mc

    if report["headline"]:
        head_columns = [c for c in columns + report["task_groups"]["open"]
                        if any(c in h for h in report["headline"].values())]
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(head_columns) * max(1, len(report["students"])) ** 0.5),
                                        3.8))
        series = []
        for s in report["students"]:
            h = report["headline"].get(s, {})
            series.append((f"{s} · LL", {"color": colors[s]}, [h.get(c, {}).get("ll") for c in head_columns]))
            series.append((f"{s} · generation", {"color": colors[s], "alpha": 0.55, "hatch": "//"},
                           [h.get(c, {}).get("gen") for c in head_columns]))
        _bars(ax, head_columns, series, lambda e: "no LL")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(head_columns)), head_columns, rotation=20, ha="right")
        ax.set_ylabel("points behind the teacher")
        ax.set_title("The paper's gap: teacher − student under LL (solid) and generation (hatched), 95 % intervals")
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        out["headline"] = [_png(fig)]

    if columns and report["modes"]:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(columns) * max(1, len(ordered)) ** 0.5), 4))
        series = []
        for m in ordered:
            for mode, style in ((report["ll_mode"].get("average", "ll_acc"), {}),
                                (gen_mode, {"alpha": 0.55, "hatch": "//"})):
                ests = []
                for c in columns:
                    s = report["scores"][m].get(c, {})
                    interval = s.get("ci", {}).get(report["ll_mode"].get(c, mode) if mode in LL_MODES else mode)
                    key = report["ll_mode"].get(c, mode) if mode in LL_MODES else mode
                    ests.append({"value": s.get(key), "low": interval[0] if interval else None,
                                 "high": interval[1] if interval else None} if key in s else None)
                series.append((f"{m} · {'LL' if mode in LL_MODES else 'generation'}", {"color": colors[m], **style},
                               ests))
        _bars(ax, columns, series, lambda e: "–")
        ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        ax.set_title("Same items: log-likelihood ranking (solid) vs generation (hatched), 95 % intervals")
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        out.setdefault("scores", []).append(_png(fig))
    if report["retention"]:
        retention_columns = [c for c in columns + report["task_groups"]["open"] + report["task_groups"]["recall"]
                             if any(c in r for r in report["retention"].values())]
        series = []
        for s in report["students"]:
            for j, (kind, label) in enumerate((("retention", "raw"), ("retention_chance", "chance-corrected"))):
                for mode_is_ll in (True, False):
                    ests = []
                    for c in retention_columns:
                        mode = report["ll_mode"].get(c) if mode_is_ll else gen_mode
                        ests.append(report[kind].get(s, {}).get(c, {}).get(mode) if mode else None)
                    if any(e is not None for e in ests):
                        series.append((f"{s} · {'LL' if mode_is_ll else 'gen'} · {label}",
                                       {"color": colors[s], "alpha": 1.0 if mode_is_ll else 0.55,
                                        "hatch": ("" if mode_is_ll else "//") + ("" if j == 0 else "..")}, ests))
        fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(series) * len(retention_columns) + 1), 4))
        _bars(ax, retention_columns, series, lambda e: "teacher not above chance: no retention")
        ax.axhline(100, color="black", linestyle="--", linewidth=0.8)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(retention_columns)), retention_columns, rotation=20, ha="right")
        ax.set_ylabel("retention (%)")
        ax.set_title("Retention: student / teacher, and (s − chance) / (t − chance) (dotted), 95 % intervals")
        ax.legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc="upper left")
        out.setdefault("scores", []).append(_png(fig))

    families = sorted({f for per_model in report["recall"].values() for f in per_model})
    if families:
        fig, axes = plt.subplots(1, len(families), figsize=(4.6 * len(families), 3.8), squeeze=False)
        for ax, family in zip(axes[0], families):
            for m in ordered:
                points = sorted((int(n), e) for n, e in report["recall"].get(m, {}).get(family, {}).items()
                                if e.get("value") is not None)
                if points:
                    xs, ys = [p[0] for p in points], [100 * p[1]["value"] for p in points]
                    lows = [100 * (p[1]["low"] if p[1]["low"] is not None else p[1]["value"]) for p in points]
                    highs = [100 * (p[1]["high"] if p[1]["high"] is not None else p[1]["value"]) for p in points]
                    ax.plot(xs, ys, marker="o", color=colors[m], label=m)
                    ax.fill_between(xs, lows, highs, color=colors[m], alpha=0.15)
            ax.set_xscale("log", base=2)
            lengths = sorted({int(n) for m in ordered for n in report["recall"].get(m, {}).get(family, {})})
            ax.set_xticks(lengths, [_length(n) for n in lengths])
            ax.minorticks_off()
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(-5, 105)
            ax.set_title(family)
            fails = recall_teacher_fails(report, family)
            if fails:
                ax.text(0.5, 0.5, "the teacher fails too at " + ", ".join(_length(n) for n in fails)
                        + ":\nthe task is beyond the teacher,\nnot a loss from distillation", transform=ax.transAxes,
                        ha="center", va="center", fontsize=8, color="firebrick",
                        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "firebrick"})
            ax.legend(fontsize=7)
        out["recall"] = [_png(fig)]

    gold = next((p["letters"]["gold"] for p in report["pathologies"].values() if p["letters"]["gold"]), {})
    if gold:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"wspace": 0.35})
        names = ordered + ["gold"]
        bottoms = [0.0] * len(names)
        letters = sorted(({k for p in report["pathologies"].values() for k in p["letters"]["of_all"]} | set(gold))
                         - {"none"})
        for k_index, k in enumerate(letters + ["none"]):  # shares of all MC outputs, as the table
            values = [100 * report["pathologies"][m]["letters"]["of_all"].get(k, 0.0) for m in ordered]
            values.append(0.0 if k == "none" else 100 * gold.get(k, 0.0))
            axes[0].bar(names, values, bottom=bottoms, label=k,
                        color="lightgrey" if k == "none" else plt.cm.Set2(k_index % 8))
            bottoms = [b + v for b, v in zip(bottoms, values)]
        axes[0].set_ylabel("share of multiple-choice outputs (%)")
        axes[0].set_title("Chosen answer letters (greedy; none = no answer)")
        axes[0].legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        positions = {m: (report["pathologies"][m].get("first_departure") or {}).get("positions") or []
                     for m in report["students"]}
        everything = [x for p in positions.values() for x in p]
        if everything:
            # One set of integer-aligned edges for every student, at most 30 bins, so the bars compare.
            top = max(everything) + 1
            edges = np.unique(np.linspace(0, top, min(30, top) + 1).round())
            for m, p in positions.items():
                if p:
                    axes[1].hist(p, bins=edges, alpha=0.6, color=colors[m], label=m)
            axes[1].legend(fontsize=7)
        else:
            axes[1].text(0.5, 0.5, "every student output equals the teacher's", ha="center", va="center",
                         transform=axes[1].transAxes)
        unit = next((report["pathologies"][m]["first_departure"]["unit"] for m in report["students"]
                     if report["pathologies"][m].get("first_departure")), "token")
        axes[1].set_title("Where greedy outputs depart from the teacher's")
        axes[1].set_xlabel(f"first differing position ({unit}s)")
        axes[1].set_ylabel("outputs")
        out["pathologies"] = [_png(fig)]

    for run, curves in report.get("training", {}).items():
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.2), gridspec_kw={"wspace": 0.3})
        offset = 0
        for i, (stage, c) in enumerate(curves.items()):
            steps = [offset + s for s in c["step"]]
            color = plt.cm.tab10(i % 10)
            for ax, key in zip(axes, ("loss", "lr", "tokens_per_s")):
                ax.plot(steps, c[key], color=color, label=stage, linewidth=1, marker="o", markersize=2.5)
            offset = steps[-1] if steps else offset
            for ax in axes:
                ax.axvline(offset, color="grey", linewidth=0.5, linestyle=":")
        axes[0].set_yscale("log")
        for ax, title in zip(axes, ("loss (log scale)", "learning rate", "tokens / s")):
            ax.set_title(title)
            ax.set_xlabel("step (stages one after another)")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"Training curves: {run}", fontsize=9, y=1.04)
        out.setdefault("training", []).append(_png(fig))
    return out


def recall_teacher_fails(report: dict, family: str) -> list[int]:
    """Context lengths where the teacher answers no recall item: there the student has nothing to lose."""
    teacher = report["recall"].get(report["teacher"] or "", {}).get(family, {})
    return sorted(int(n) for n, e in teacher.items() if e.get("value") == 0)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.85em}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}caption{text-align:left;
font-weight:600;padding:4px 0}img{max-width:100%;margin:0.5em 0}.findings li{margin:0.3em 0}code{font-size:0.85em}
td{white-space:nowrap}td.text{text-align:left;font-family:monospace;font-size:0.9em;white-space:normal;
min-width:14em}"""


def render_html(report: dict, sections: dict, images: dict[str, list[str]] | None) -> str:
    esc = html.escape
    groups = "" if list(report["groups"]) in ([], [DEFAULT_GROUP]) else \
        " (groups: " + "; ".join(f"{g}: {', '.join(ms)}" for g, ms in report["groups"].items()) + ")"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(report['title'])}</title>"
             f"<style>{_CSS}</style></head><body><h1>{esc(report['title'])}</h1>",
             f"<p>Teacher: <b>{esc(report['teacher'] or 'none')}</b>; students: "
             f"{esc(', '.join(report['students']) or 'none')}{esc(groups)}. Created {esc(report['created'])}.</p>",
             "<h2 id='summary'>Summary</h2><ul class='findings'>"]
    parts += [f"<li>{esc(f)}</li>" for f in report["findings"]] or ["<li>Nothing stands out.</li>"]
    parts.append("</ul>")
    if images is None:
        parts.append(f"<p><i>No plots: {esc(PLOTS_NEED)}.</i></p>")
        images = {}
    for key, title in SECTION_TITLES.items():
        parts.append(f"<h2 id='{key}'>{esc(title)}</h2>")
        parts += [f"<img alt='{esc(title)}' src='data:image/png;base64,{png}'>" for png in images.get(key, [])]
        if not sections[key]:
            parts.append(f"<p>{esc(EMPTY[key])}</p>")
        for caption, header, rows in sections[key]:
            text_columns = {i for i, h in enumerate(header) if h.endswith("'s output") or h == "method"}
            parts.append(f"<table><caption>{esc(caption)}</caption><tr>"
                         + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td class='text'>{esc(c)}</td>" if i in text_columns else f"<td>{esc(c)}</td>"
                                       for i, c in enumerate(row)) + "</tr>" for row in rows]
            parts.append("</table>")
    if report["notes"]:
        parts.append("<h2 id='notes'>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in report["notes"])
                     + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(out_dirs: Sequence[str | Path] | str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Read eval directories, write report.json/.md/.html into `out` (default: the first directory).
    Returns {"json": path, "md": path, "html": path}."""
    dirs = [out_dirs] if isinstance(out_dirs, (str, Path)) else list(out_dirs)
    if not dirs:
        raise UserError("no eval directory given")
    report = compute_report(load_eval_dirs(dirs))
    report["eval_dirs"] = [str(d) for d in dirs]
    out = Path(out or dirs[0])
    sections = tables(report)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["md"], render_markdown(report, sections))
    atomic_write_text(paths["html"], render_html(report, sections, plots(report)))
    return paths
