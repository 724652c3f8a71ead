"""The report: the same items scored by log-likelihood and by generation, side by side, for teacher and students.

Everything is computed from the item records of one or more eval directories, so `gendistill report A B` can put
students evaluated at different times next to one teacher. report.json holds every number; report.md and the
self-contained report.html (plots embedded as PNG) render the same tables from it.

Accuracies are fractions in [0, 1]; retention = student / teacher; gap = LL accuracy - generation accuracy.
"Average" is over the multiple-choice tasks (the only ones scored both ways), recall tasks apart.
"""
from __future__ import annotations

import base64
import html
import io
import json
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

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


# ---------------------------------------------------------------- loading

def load_eval_dirs(dirs: Sequence[str | Path]) -> dict:
    """Merge eval directories: the first teacher found is the teacher; a student name seen twice gets @dir."""
    models: dict[str, dict] = {}
    tasks: dict[str, dict] = {}
    records: dict[str, dict[str, list[dict]]] = {}
    lm_eval: dict[str, dict] = {}
    settings, notes = [], []
    teacher = None
    for d in map(Path, dirs):
        manifest_path = d / "manifest.json"
        if not manifest_path.is_file():
            raise UserError(f"{d} is not an eval directory (no manifest.json); run `gendistill eval --out {d}` first")
        manifest = json.loads(manifest_path.read_text())
        settings.append({"dir": str(d), "created": manifest.get("created"), **manifest.get("settings", {})})
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
            "settings": settings, "notes": notes}


# ---------------------------------------------------------------- scores

def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def primary_gen(record: dict) -> dict | None:
    """The output pathologies look at: greedy when it was run, else the first sampling seed."""
    gen = record.get("gen") or {}
    return gen.get("greedy") or (gen[sorted(gen)[0]] if gen else None)


def task_scores(records: list[dict]) -> dict:
    """Per-task metrics of one model from its item records."""
    scores: dict = {"n": len(records)}
    if records and "ll" in records[0]:
        scores["ll_acc"] = _mean(float(r["ll_pred"] == r["answer"]) for r in records)
        scores["ll_acc_norm"] = _mean(float(r["ll_pred_norm"] == r["answer"]) for r in records)
        scores["ll_acc_bytes"] = _mean(float(r["ll_pred_bytes"] == r["answer"]) for r in records)
    labels = sorted({label for r in records for label in r.get("gen", {})})
    if "greedy" in labels:
        scores["gen_acc"] = _mean(float(r["gen"]["greedy"]["correct"]) for r in records)
    seeds = [label for label in labels if label != "greedy"]
    if seeds:
        by_seed = {s: _mean(float(r["gen"][s]["correct"]) for r in records) for s in seeds}
        scores["gen_acc_by_seed"] = by_seed
        scores["gen_acc_sampled"] = _mean(by_seed.values())
        scores["gen_acc_sampled_std"] = statistics.pstdev(by_seed.values()) if len(by_seed) > 1 else 0.0
    primary = [primary_gen(r) for r in records]
    if any(primary):
        scores["no_answer"] = _mean(float(p["extracted"] is None) for p in primary if p)
    return scores


def average(per_task: dict[str, dict], task_names: Sequence[str]) -> dict:
    """Unweighted mean over tasks of each metric the tasks have."""
    means = {m: _mean(per_task[t].get(m) for t in task_names if t in per_task) for m in MODES + ("no_answer",)}
    return {m: v for m, v in means.items() if v is not None}


def ratio(student: float | None, teacher: float | None) -> float | None:
    return None if student is None or not teacher else student / teacher


def retention(scores: dict[str, dict], teacher: str) -> dict[str, dict]:
    """{student: {mode: student / teacher}} for one task (or the average)."""
    return {m: {mode: ratio(s.get(mode), scores[teacher].get(mode)) for mode in MODES if mode in scores[teacher]}
            for m, s in scores.items() if m != teacher}


def gap(scores: dict) -> dict:
    """LL accuracy minus generation accuracy (positive: LL flatters the model)."""
    ll = scores.get("ll_acc")
    return {f"ll_minus_{mode}": (ll - scores[mode] if ll is not None and scores.get(mode) is not None else None)
            for mode in GEN_MODES if mode in scores}


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b (ties in either ranking handled); None when either ranking is all ties."""
    concordant = discordant = ties_x = ties_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                ties_x += 1
                ties_y += 1
            elif dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    pairs = n * (n - 1) / 2
    denominator = ((pairs - ties_x) * (pairs - ties_y)) ** 0.5
    return (concordant - discordant) / denominator if denominator else None


def compare_rankings(scores: dict[str, dict], mode_a: str, mode_b: str) -> dict | None:
    """Order models by two modes; list the pairs the two order oppositely (ranking reversals) and Kendall's tau."""
    names = [n for n in scores if scores[n].get(mode_a) is not None and scores[n].get(mode_b) is not None]
    if len(names) < 2:
        return None
    a = [scores[n][mode_a] for n in names]
    b = [scores[n][mode_b] for n in names]
    reversals = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            if (a[i] - a[j]) * (b[i] - b[j]) < 0:
                first, second = (names[i], names[j]) if a[i] > a[j] else (names[j], names[i])
                reversals.append({"ahead_by_" + mode_a: first, "ahead_by_" + mode_b: second,
                                  mode_a: [scores[first][mode_a], scores[second][mode_a]],
                                  mode_b: [scores[first][mode_b], scores[second][mode_b]]})
    return {"modes": [mode_a, mode_b],
            "order": {mode_a: sorted(names, key=lambda n: (-scores[n][mode_a], n)),
                      mode_b: sorted(names, key=lambda n: (-scores[n][mode_b], n))},
            "reversals": reversals, "kendall_tau": kendall_tau(a, b)}


def rankings(scores: dict[str, dict]) -> list[dict]:
    """Each LL mode against each generation mode, over the given models (students)."""
    out = []
    for ll_mode in LL_MODES:
        for gen_mode in GEN_MODES:
            compared = compare_rankings(scores, ll_mode, gen_mode)
            if compared:
                out.append(compared)
    return out


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
    return {"chosen": shares, "gold": gold_shares, "answered": answered, "unanswered": chosen.get("none", 0),
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

def compute_report(loaded: dict) -> dict:
    models, teacher, tasks, records = loaded["models"], loaded["teacher"], loaded["tasks"], loaded["records"]
    students = [m for m in models if models[m]["role"] != "teacher"]
    ordered = ([teacher] if teacher else []) + students
    task_names = [t for t in tasks if any(t in records[m] for m in ordered)]
    mc_tasks = [t for t in task_names if tasks[t]["kind"] == "multiple_choice" and not tasks[t].get("recall")]
    open_tasks = [t for t in task_names if tasks[t]["kind"] == "open" and not tasks[t].get("recall")]
    recall_tasks = [t for t in task_names if tasks[t].get("recall")]

    scores = {m: {t: task_scores(records[m][t]) for t in task_names if t in records[m]} for m in ordered}
    for m in ordered:
        scores[m]["average"] = average(scores[m], mc_tasks)
        if open_tasks:
            scores[m]["average_open"] = average(scores[m], open_tasks)
    columns = (["average"] if mc_tasks else []) + (["average_open"] if open_tasks else []) + task_names
    report: dict = {
        "title": "gendistill evaluation report", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "teacher": teacher, "students": students, "models": models, "tasks": tasks,
        "task_groups": {"multiple_choice": mc_tasks, "open": open_tasks, "recall": recall_tasks},
        "modes": [mode for mode in MODES if any(mode in scores[m].get(t, {}) for m in ordered for t in task_names)],
        "scores": scores,
        "gap": {m: {c: gap(scores[m][c]) for c in columns if c in scores[m]} for m in ordered},
        "retention": {}, "behind_teacher": {}, "retention_gap": {},
        "settings": loaded["settings"], "notes": loaded["notes"], "lm_eval": loaded["lm_eval"],
    }
    if teacher:
        for c in columns:
            per_model = {m: scores[m][c] for m in ordered if c in scores[m]}
            if teacher not in per_model:
                continue
            for student, kept in retention(per_model, teacher).items():
                report["retention"].setdefault(student, {})[c] = kept
                report["behind_teacher"].setdefault(student, {})[c] = {
                    mode: per_model[teacher][mode] - per_model[student][mode] for mode in kept
                    if per_model[student].get(mode) is not None and per_model[teacher].get(mode) is not None}
                report["retention_gap"].setdefault(student, {})[c] = {
                    f"ll_acc_minus_{mode}": (kept["ll_acc"] - kept[mode]
                                             if kept.get("ll_acc") is not None and kept.get(mode) is not None
                                             else None)
                    for mode in GEN_MODES if mode in kept}
    report["ranking"] = None
    if len(students) >= 2:
        report["ranking"] = {c: rankings({s: scores[s][c] for s in students if c in scores[s]})
                             for c in columns if c not in recall_tasks}
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
                s = scores[m][t]
                value = s.get("gen_acc", s.get("gen_acc_sampled"))
                recall.setdefault(m, {}).setdefault(family, {})[str(length)] = value
    report["recall"] = recall
    report["findings"] = findings(report)
    return report


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _pp(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f} pp"


def findings(report: dict) -> list[str]:
    """The headline sentences: what LL hides, reversals, collapses, runaway outputs."""
    out = []
    for s in report["students"]:
        kept = report["retention"].get(s, {}).get("average", {})
        if kept.get("ll_acc") is not None:
            for mode in GEN_MODES:
                if kept.get(mode) is not None:
                    behind = report["behind_teacher"][s]["average"]
                    out.append(f"{s} keeps {_pct(kept['ll_acc'])} of the teacher's accuracy under LL "
                               f"({_pp(-behind['ll_acc'])} vs teacher) and {_pct(kept[mode])} under generation "
                               f"({MODE_LABELS[mode]}, {_pp(-behind[mode])} vs teacher).")
    for comparison in (report["ranking"] or {}).get("average", []):
        a, b = comparison["modes"]
        for rev in comparison["reversals"]:
            out.append(f"Ranking reversal: {MODE_LABELS[a]} puts {rev['ahead_by_' + a]} ahead of "
                       f"{rev['ahead_by_' + b]}; {MODE_LABELS[b]} puts {rev['ahead_by_' + b]} ahead "
                       f"(Kendall tau {comparison['kendall_tau']:+.2f}).")
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

def tables(report: dict) -> dict[str, list[tuple[str, list[str], list[list[str]]]]]:
    """Section -> [(caption, header, rows)], all cells already formatted."""
    teacher, ordered = report["teacher"], ([report["teacher"]] if report["teacher"] else []) + report["students"]
    sections: dict[str, list] = {}
    score_tables = []
    groups = report["task_groups"]
    for column in (["average"] if groups["multiple_choice"] else []) + (["average_open"] if groups["open"] else []) \
            + groups["multiple_choice"] + groups["open"]:
        present = [m for m in ordered if column in report["scores"][m]]
        modes = [mode for mode in report["modes"] if any(mode in report["scores"][m][column] for m in present)]
        gap_modes = [mode for mode in GEN_MODES if mode in modes and "ll_acc" in modes]
        header = ["model", "role"] + [MODE_LABELS[m] for m in modes]
        header += [f"gap LL − {MODE_LABELS[m]}" for m in gap_modes]
        header += [f"retention {MODE_LABELS[m]}" for m in modes] if teacher else []
        header.append("no answer")
        rows = []
        for m in present:
            s = report["scores"][m][column]
            row = [m, report["models"][m]["role"]] + [_pct(s.get(mode)) for mode in modes]
            row += [_pp(report["gap"][m][column].get(f"ll_minus_{mode}")) for mode in gap_modes]
            if teacher:
                kept = report["retention"].get(m, {}).get(column, {})
                row += [(_pct(1.0) if s.get(mode) else "–") if m == teacher else _pct(kept.get(mode)) for mode in modes]
            row.append(_pct(s.get("no_answer")))
            rows.append(row)
        if column == "average":
            caption = f"Average over {len(groups['multiple_choice'])} multiple-choice task(s)"
        elif column == "average_open":
            caption = f"Average over {len(groups['open'])} open task(s)"
        else:
            caption = f"{column} ({report['tasks'][column]['kind']}, {report['tasks'][column]['n_items']} items)"
        score_tables.append((caption, header, rows))
    sections["scores"] = score_tables

    ranking_tables = []
    for column, comparisons in (report["ranking"] or {}).items():
        rows = [[MODE_LABELS[c["modes"][0]], MODE_LABELS[c["modes"][1]], " > ".join(c["order"][c["modes"][0]]),
                 " > ".join(c["order"][c["modes"][1]]),
                 "–" if c["kendall_tau"] is None else f"{c['kendall_tau']:+.2f}",
                 "; ".join(f"{r['ahead_by_' + c['modes'][0]]} ↔ {r['ahead_by_' + c['modes'][1]]}"
                           for r in c["reversals"]) or "none"] for c in comparisons]
        ranking_tables.append((column, ["LL mode", "generation mode", "order by LL", "order by generation",
                                        "Kendall τ", "reversed pairs"], rows))
    sections["ranking"] = ranking_tables

    rows = []
    letters = sorted({k for p in report["pathologies"].values() for k in list(p["letters"]["chosen"])
                      + list(p["letters"]["gold"])})
    for m in ordered:
        p = report["pathologies"][m]
        dep = p.get("first_departure")
        chosen = p["letters"]["chosen"]
        rows.append([m, " ".join(f"{k}:{_pct(chosen.get(k, 0.0), 0)}" for k in letters) if chosen else "no answers",
                     "yes" if p["letters"]["collapse"] else "no", _pct(p["repetition_rate"]), _pct(p["looping_share"]),
                     _pct(p["never_stop_rate"]), "–" if p["mean_tokens"] is None else f"{p['mean_tokens']:.1f}",
                     "–" if p.get("length_ratio_vs_teacher") is None else f"{p['length_ratio_vs_teacher']:.2f}×",
                     "–" if not dep else ("never" if dep["median"] is None else f"{dep['median']:g} ({dep['unit']}s)"),
                     "–" if not dep else _pct(dep["identical_share"])])
    gold = next((p["letters"]["gold"] for p in report["pathologies"].values() if p["letters"]["gold"]), {})
    sections["pathologies"] = [(
        "Greedy outputs over all tasks; gold letters: " + (" ".join(f"{k}:{_pct(gold.get(k, 0.0), 0)}"
                                                                    for k in letters) or "–"),
        ["model", "chosen letters", "collapse", "repetition rate", "looping outputs", "never stop", "mean tokens",
         "length vs teacher", "first departure (median)", "identical to teacher"], rows)]

    recall_tables = []
    families = sorted({f for per_model in report["recall"].values() for f in per_model})
    for family in families:
        lengths = sorted({int(n) for per_model in report["recall"].values() for n in per_model.get(family, {})})
        rows = [[m] + [_pct(report["recall"].get(m, {}).get(family, {}).get(str(n))) for n in lengths]
                for m in ordered if m in report["recall"]]
        recall_tables.append((family, ["model"] + [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths],
                              rows))
    sections["recall"] = recall_tables

    lm_tables = []
    if report["lm_eval"]:
        keys = sorted({(t, k) for r in report["lm_eval"].values() for t, metrics in r.items() for k in metrics})
        rows = [[t, k] + [("–" if report["lm_eval"].get(m, {}).get(t, {}).get(k) is None
                           else f"{report['lm_eval'][m][t][k]:.4f}") for m in ordered] for t, k in keys]
        lm_tables.append(("lm-evaluation-harness results", ["task", "metric"] + ordered, rows))
    sections["lm_eval"] = lm_tables
    return sections


SECTION_TITLES = {"scores": "Scores: log-likelihood vs generation", "ranking": "Ranking under each mode",
                  "pathologies": "Generation pathologies", "recall": "Long-context recall", "lm_eval": "lm-eval"}
EMPTY = {"ranking": "Needs at least two students.", "recall": "No recall task was run.",
         "lm_eval": "lm-eval was not run (gendistill eval --lm-eval TASKS).", "scores": "No scores.",
         "pathologies": "No outputs."}


def render_markdown(report: dict, sections: dict) -> str:
    lines = [f"# {report['title']}", "", f"Teacher: **{report['teacher'] or 'none'}**; students: "
             f"{', '.join(report['students']) or 'none'}. Created {report['created']}.", "", "## Summary", ""]
    lines += [f"- {f}" for f in report["findings"]] or ["- Nothing stands out."]
    for key, title in SECTION_TITLES.items():
        lines += ["", f"## {title}", ""]
        if not sections[key]:
            lines.append(EMPTY[key])
        for caption, header, rows in sections[key]:
            lines += [f"**{caption}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
    lines += ["", "## Settings", ""]
    lines += [f"- `{json.dumps(s)}`" for s in report["settings"]]
    lines += [f"- note: {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots and HTML

def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def plots(report: dict) -> dict[str, list[str]]:
    """Section -> base64 PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, list[str]] = {}
    ordered = ([report["teacher"]] if report["teacher"] else []) + report["students"]
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(ordered)}
    gen_mode = "gen_acc" if "gen_acc" in report["modes"] else "gen_acc_sampled"
    columns = (["average"] if report["task_groups"]["multiple_choice"] else []) + report["task_groups"]["multiple_choice"]
    if columns and "ll_acc" in report["modes"]:
        fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(columns) * max(1, len(ordered)) ** 0.5), 4))
        width = 0.8 / (2 * len(ordered))
        for i, m in enumerate(ordered):
            for j, (mode, hatch) in enumerate((("ll_acc", ""), (gen_mode, "//"))):
                xs = [k + (2 * i + j) * width - 0.4 + width / 2 for k in range(len(columns))]
                ys = [100 * (report["scores"][m].get(c, {}).get(mode) or 0) for c in columns]
                ax.bar(xs, ys, width, color=colors[m], alpha=1.0 if j == 0 else 0.55, hatch=hatch,
                       edgecolor="black", linewidth=0.4, label=f"{m} · {'LL' if j == 0 else 'generation'}")
        ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        ax.set_title("Same items: log-likelihood ranking (solid) vs generation (hatched)")
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        out.setdefault("scores", []).append(_png(fig))
    if report["retention"]:
        retention_columns = [c for c in columns + report["task_groups"]["recall"]
                             if any(c in r for r in report["retention"].values())]
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(retention_columns)), 4))
        students = report["students"]
        width = 0.8 / (2 * len(students))
        for i, s in enumerate(students):
            for j, mode in enumerate(("ll_acc", gen_mode)):
                xs = [k + (2 * i + j) * width - 0.4 + width / 2 for k in range(len(retention_columns))]
                ys = [100 * (report["retention"].get(s, {}).get(c, {}).get(mode) or 0) for c in retention_columns]
                ax.bar(xs, ys, width, color=colors[s], alpha=1.0 if j == 0 else 0.55, hatch="" if j == 0 else "//",
                       edgecolor="black", linewidth=0.4, label=f"{s} · {'LL' if j == 0 else 'generation'}")
        ax.axhline(100, color="black", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(retention_columns)), retention_columns, rotation=20, ha="right")
        ax.set_ylabel("retention: student / teacher (%)")
        ax.set_title("Retention of the teacher's accuracy under each mode")
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        out.setdefault("scores", []).append(_png(fig))
    families = sorted({f for per_model in report["recall"].values() for f in per_model})
    if families:
        fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.6), squeeze=False)
        for ax, family in zip(axes[0], families):
            for m in ordered:
                points = sorted((int(n), v) for n, v in report["recall"].get(m, {}).get(family, {}).items()
                                if v is not None)
                if points:
                    ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", color=colors[m], label=m)
            ax.set_xscale("log", base=2)
            lengths = sorted({int(n) for m in ordered for n in report["recall"].get(m, {}).get(family, {})})
            ax.set_xticks(lengths, [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
            ax.minorticks_off()
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("accuracy (%)")
            ax.set_ylim(-5, 105)
            ax.set_title(family)
            ax.legend(fontsize=7)
        out["recall"] = [_png(fig)]
    gold = next((p["letters"]["gold"] for p in report["pathologies"].values() if p["letters"]["gold"]), {})
    if gold:
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"wspace": 0.35})
        names = ordered + ["gold"]
        bottoms = [0.0] * len(names)
        letters = sorted({k for p in report["pathologies"].values() for k in p["letters"]["chosen"]} | set(gold))
        for k_index, k in enumerate(letters + ["none"]):
            values = []
            for m in ordered:  # shares of all multiple-choice outputs, unanswered ones as "none"
                letters_m = report["pathologies"][m]["letters"]
                total = letters_m["answered"] + letters_m["unanswered"]
                count = letters_m["unanswered"] if k == "none" else letters_m["chosen"].get(k, 0.0) * letters_m["answered"]
                values.append(100 * count / total if total else 0.0)
            values.append(0.0 if k == "none" else 100 * gold.get(k, 0.0))
            axes[0].bar(names, values, bottom=bottoms, label=k,
                        color="lightgrey" if k == "none" else plt.cm.Set2(k_index % 8))
            bottoms = [b + v for b, v in zip(bottoms, values)]
        axes[0].set_ylabel("share of outputs (%)")
        axes[0].set_title("Chosen answer letters (greedy)")
        axes[0].legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        drawn = False
        for m in report["students"]:
            positions = (report["pathologies"][m].get("first_departure") or {}).get("positions") or []
            if positions:
                axes[1].hist(positions, bins=range(0, max(positions) + 2), alpha=0.6, color=colors[m], label=m)
                drawn = True
        axes[1].set_title("Where greedy outputs depart from the teacher's")
        axes[1].set_xlabel("first differing position")
        axes[1].set_ylabel("outputs")
        if drawn:
            axes[1].legend(fontsize=7)
        out["pathologies"] = [_png(fig)]
    return out


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}caption{text-align:left;
font-weight:600;padding:4px 0}img{max-width:100%;margin:0.5em 0}.findings li{margin:0.3em 0}code{font-size:0.85em}"""


def render_html(report: dict, sections: dict, images: dict[str, list[str]]) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(report['title'])}</title>"
             f"<style>{_CSS}</style></head><body><h1>{esc(report['title'])}</h1>",
             f"<p>Teacher: <b>{esc(report['teacher'] or 'none')}</b>; students: "
             f"{esc(', '.join(report['students']) or 'none')}. Created {esc(report['created'])}.</p>",
             "<h2 id='summary'>Summary</h2><ul class='findings'>"]
    parts += [f"<li>{esc(f)}</li>" for f in report["findings"]] or ["<li>Nothing stands out.</li>"]
    parts.append("</ul>")
    for key, title in SECTION_TITLES.items():
        parts.append(f"<h2 id='{key}'>{esc(title)}</h2>")
        parts += [f"<img alt='{esc(title)}' src='data:image/png;base64,{png}'>" for png in images.get(key, [])]
        if not sections[key]:
            parts.append(f"<p>{esc(EMPTY[key])}</p>")
        for caption, header, rows in sections[key]:
            parts.append(f"<table><caption>{esc(caption)}</caption><tr>"
                         + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
    parts.append("<h2 id='settings'>Settings</h2><ul>")
    parts += [f"<li><code>{esc(json.dumps(s))}</code></li>" for s in report["settings"]]
    parts += [f"<li>note: {esc(n)}</li>" for n in report["notes"]]
    parts.append("</ul></body></html>")
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
