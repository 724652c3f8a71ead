"""What issue 22 asks of the GPU demo, read from a finished `gendistill demo --scale gpu --out DEMO`:

    python bench/demo_check.py DEMO [--wall SECONDS]

Prints the demo's phase times; the teacher's generation accuracy and answer rate (extractable answers) on every world
task; recall by family and length for teacher and student; the student's retention; a few of the teacher's
multiple-choice outputs that were wrong or gave no answer; then one line per requirement, PASS or FAIL. Exit code 0
whatever the verdicts (a FAIL is a result to report); 2 when DEMO holds no finished demo.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SEEN = ("world_qa_open_seen", "world_qa_mc_seen")
TRAINED_LENGTHS = (1024, 2048, 4096, 8192)  # the world's long documents: a retrieval teacher's training length
BEYOND = 16384
TARGETS = {"accuracy": 0.95, "answered": 0.98, "recall": 0.90, "drop": 0.20, "seconds": 600}


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def partial_records(demo: Path) -> None:
    """What an unfinished demo's evaluation scored so far (eval/ or eval.partial/ records), task by task."""
    for directory in (demo / "eval", demo / "eval.partial"):
        for path in sorted(directory.glob("records/*/*.jsonl")):
            records = [json.loads(line) for line in path.open()]
            gen = [r["gen"].get("greedy") for r in records if r["gen"].get("greedy")]
            if gen:
                correct = sum(g["correct"] for g in gen) / len(gen)
                answered = sum(g["extracted"] is not None for g in gen) / len(gen)
                print(f"  {path.parent.name:8s} {path.stem:26s} gen {pct(correct)} %, answered {pct(answered)} % "
                      f"({len(gen)} items)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path)
    parser.add_argument("--wall", type=float, default=None, help="wall-clock seconds of the whole demo command")
    args = parser.parse_args(argv)
    path = args.demo / "summary.json"
    if not path.exists():
        print(f"{path} missing: the demo did not finish (see its log)")
        partial_records(args.demo)
        return 2
    summary = json.loads(path.read_text())
    report = json.loads((args.demo / "eval" / "report.json").read_text())
    teacher, student = report["teacher"], report["students"][0]
    scores = report["scores"]
    verdicts = []

    def verdict(name: str, ok: bool, detail: str) -> None:
        verdicts.append(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")

    phases = summary.get("phases", {})
    print("== phases (seconds)")
    for name, value in phases.items():
        if isinstance(value, dict):
            parts = ", ".join(f"{k} {v:.0f}" for k, v in (value.get("parts") or {}).items())
            print(f"  {name:12s} {value['seconds']:7.1f} in a second process ({parts}); the demo waited "
                  f"{value['waited']:.1f} for it; exit code {value['exit_code']}")
        else:
            print(f"  {name:12s} {value:7.1f}")
    for label, rows in (("teacher", summary.get("teacher_stages") or []), ("distill", summary.get("stages") or [])):
        print(f"  {label} stages: " + ", ".join(f"{r['name']} {r['seconds']:.0f}s ({r['tokens'] / 1e6:.1f}M tokens, "
                                                f"loss {r['first_loss']:.3f} -> {r['final_loss']:.3f})" for r in rows))
    total = args.wall if args.wall is not None else phases.get("total")
    if args.wall is not None:
        print(f"  wall clock of the demo command: {args.wall:.0f} s (demo's own total {phases.get('total', 0):.0f} s)")
    verdict("fresh-machine demo <= 10 min", total is not None and total <= TARGETS["seconds"], f"{total:.0f} s")

    print("\n== world tasks: generation accuracy % [95 % interval], answer rate % (an answer could be extracted)")
    print(f"  {'task':26s} {'teacher gen':>20s} {'answered':>9s} {'student gen':>20s} {'answered':>9s} "
          f"{'retention':>9s}")
    for row in summary["rows"]:
        task = row["task"]
        if task == "average":
            continue
        answered = [1 - scores[m][task]["no_answer"] if scores[m][task].get("no_answer") is not None else None
                    for m in (teacher, student)]
        ci = [row.get(f"{who}_gen_ci") for who in ("teacher", "student")]
        cells = [pct(row[f"{who}_gen"]) + (f" [{pct(c[0])}, {pct(c[1])}]" if c else "")
                 for who, c in zip(("teacher", "student"), ci)]
        retention = row["student_gen"] / row["teacher_gen"] if row["teacher_gen"] else None
        print(f"  {task:26s} {cells[0]:>20s} {pct(answered[0]):>9s} {cells[1]:>20s} {pct(answered[1]):>9s} "
              f"{pct(retention):>9s}")
        if task in SEEN:
            verdict(f"teacher {task} >= 95 %", row["teacher_gen"] >= TARGETS["accuracy"],
                    f"{pct(row['teacher_gen'])} %")
            if "_mc_" in task:  # an open answer is its first line: always "extractable"
                verdict(f"teacher answers extractable on {task} >= 98 %", answered[0] >= TARGETS["answered"],
                        f"{pct(answered[0])} %")
    ll = [r for r in summary["rows"] if r["task"] != "average" and r.get("teacher_ll") is not None]
    if ll:
        print("  LL accuracy (" + (ll[0].get("ll_metric") or "ll") + "): " + "; ".join(
            f"{r['task']} teacher {pct(r['teacher_ll'])} student {pct(r['student_ll'])}" for r in ll))

    print("\n== recall (generation accuracy %) by length")
    recall = {model: {family: {int(n): v["value"] if isinstance(v, dict) else v for n, v in lengths.items()}
                      for family, lengths in families.items()}
              for model, families in (report.get("recall") or {}).items()}
    for family in sorted({f for model in recall.values() for f in model}):
        lengths = sorted({n for model in recall.values() for n in model.get(family, {})})
        print(f"  {family:16s} " + " ".join(f"{f'{n // 1024}K' if n % 1024 == 0 else n:>6}" for n in lengths))
        for model in (teacher, student):
            values = recall.get(model, {}).get(family, {})
            print(f"  {model:16s} " + " ".join(f"{pct(values.get(n)):>6s}" for n in lengths))
        got = recall.get(teacher, {}).get(family, {})
        trained = [got[n] for n in TRAINED_LENGTHS if n in got]
        if family in ("niah_single", "assoc_recall") and trained:
            verdict(f"teacher {family} >= 90 % at 1K-8K", min(trained) >= TARGETS["recall"],
                    ", ".join(f"{n // 1024}K {pct(got[n])}" for n in TRAINED_LENGTHS if n in got))
        if BEYOND in got and 8192 in got:
            verdict(f"teacher {family} drops beyond its training length", got[8192] - got[BEYOND] >= TARGETS["drop"],
                    f"8K {pct(got[8192])} -> 16K {pct(got[BEYOND])}")

    records = args.demo / "eval" / "records" / teacher / "world_qa_mc_seen.jsonl"
    if records.exists():
        items = {json.loads(line)["id"]: json.loads(line)
                 for line in (args.demo / "world" / "tasks" / "world_qa_mc_seen.jsonl").open()}
        misses = [r for r in map(json.loads, records.open()) if not r["gen"]["greedy"]["correct"]]
        print(f"\n== teacher's wrong or unanswered MC outputs, seen people ({len(misses)} items; the first 12)")
        for r in misses[:12]:
            item = items.get(r["id"], {})
            gold = item.get("choices", ["?"] * 4)[r["answer"]] if "choices" in item else r["answer"]
            print(f"  {r['id']}: {item.get('question', '')!r} gold {gold!r}; options {item.get('choices')}; "
                  f"output {r['gen']['greedy']['text']!r} -> {r['gen']['greedy']['extracted']}")

    print("\n== verdicts")
    for line in verdicts:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
