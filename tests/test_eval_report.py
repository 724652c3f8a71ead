"""Report numbers on constructed score tables and records, and the end-to-end report: a tiny teacher against its
converted (not distilled) Hybrid-KDA students, through `gendistill eval` and `gendistill report`."""
import base64
import json
import math
import re
import sys

import numpy as np
import pytest

from gendistill.cli import main as cli
from gendistill.convert import convert
from gendistill.evaluation import build_report, evaluate
from gendistill.evaluation import stats
from gendistill.evaluation.report import (
    SECTION_TITLES, _ci, _est_pct, _pct, compute_report, plots, render_markdown, tables)
from gendistill.testing import tiny_qwen3, tiny_tokenizer


# ---------------------------------------------------------------- constructed records

def _records(n_ll_correct, extract, tokens, stopped=True):
    out = []
    for i in range(20):
        answer = i % 4
        ll_pred = answer if i < n_ll_correct else (answer + 1) % 4
        extracted = extract(i, answer)
        out.append({"id": f"q{i}", "task": "mc", "kind": "multiple_choice", "answer": answer, "n_choices": 4,
                    "meta": {}, "ll": [0.0] * 4, "ll_pred": ll_pred, "ll_pred_norm": ll_pred, "ll_pred_bytes": ll_pred,
                    "gen": {"greedy": {"text": " ".join(map(str, tokens)), "extracted": extracted,
                                       "correct": extracted == answer, "n_tokens": len(tokens), "stopped": stopped,
                                       "tokens": list(tokens)}}})
    return out


def _loaded(records: dict, tasks: dict, groups: dict | None = None) -> dict:
    models = {m: {"role": "teacher" if m == "T" else "student", "tokenizer": "same", "max_position_embeddings": 4096,
                  **({"group": groups[m]} if groups and m in groups else {})} for m in records}
    return {"models": models, "teacher": "T" if "T" in records else None, "records": records, "tasks": tasks,
            "lm_eval": {}, "settings": [], "notes": []}


MC_META = {"kind": "multiple_choice", "n_items": 20, "recall": None, "ll_target": "letter"}


def constructed_report() -> dict:
    records = {
        "T": _records(16, lambda i, a: a if i < 12 else (a + 1) % 4, [1, 2, 3, 4]),
        "A": _records(15, lambda i, a: 0, [1, 2] + [9] * 14, stopped=False),  # always "A", never stops, loops
        "B": _records(14, lambda i, a: a if i < 10 else None, [1, 2, 3, 4]),  # identical to the teacher's text
        "C": _records(12, lambda i, a: a if i < 4 else (a + 2) % 4, [1, 2, 3]),
    }
    return compute_report(_loaded({m: {"mc": r} for m, r in records.items()}, {"mc": MC_META}))


def test_report_on_constructed_records():
    report = constructed_report()
    avg = {m: report["scores"][m]["average"] for m in "TABC"}
    assert avg["T"]["ll_acc"] == 0.8 and avg["T"]["gen_acc"] == 0.6
    assert avg["A"]["ll_acc"] == 0.75 and avg["A"]["gen_acc"] == 0.25  # right only where the gold is A
    # B abstains on half the items and is right whenever it answers: abstention and wrong answers kept apart
    b = report["scores"]["B"]["mc"]
    assert b["gen_acc"] == 0.5 and b["no_answer"] == 0.5 and b["answer_rate"] == 0.5 and b["acc_when_answered"] == 1.0
    assert b["ci"]["acc_when_answered"] == pytest.approx(list(stats.wilson(10, 10)))  # all right: Wilson, not a point
    low, high = b["ci"]["gen_acc"]
    assert low < 0.5 < high
    w_low, w_high = b["wilson"]["gen_acc"]  # the closed-form cross-check agrees with the bootstrap
    assert w_low == pytest.approx(stats.wilson(10, 20)[0]) and abs(w_low - low) < 0.06 and abs(w_high - high) < 0.06
    # every accuracy, retention and gap carries its interval
    kept = report["retention"]["A"]["mc"]
    assert kept["ll_acc"]["value"] == pytest.approx(0.9375) and kept["gen_acc"]["value"] == pytest.approx(0.25 / 0.6)
    assert kept["gen_acc"]["low"] < kept["gen_acc"]["value"] < kept["gen_acc"]["high"]
    # chance-corrected, by hand: 4-way items, chance 1/4
    assert report["chance"]["mc"] == 0.25
    assert report["retention_chance"]["A"]["mc"]["ll_acc"]["value"] == pytest.approx((0.75 - 0.25) / (0.8 - 0.25))
    assert report["retention_chance"]["A"]["mc"]["gen_acc"]["value"] == pytest.approx(0.0)
    behind = report["behind_teacher"]["A"]["mc"]
    assert behind["gen_acc"]["value"] == pytest.approx(0.35) and behind["ll_acc"]["value"] == pytest.approx(0.05)
    # McNemar by hand: under generation T is right and A wrong on 9 items, A right and T wrong on 2
    assert behind["gen_acc"]["test"] == "mcnemar_exact"
    assert behind["gen_acc"]["p"] == pytest.approx(2 * sum(math.comb(11, i) for i in range(3)) / 2 ** 11)
    head = report["headline"]["A"]["mc"]
    assert head["ll_mode"] == "ll_acc" and head["difference"]["value"] == pytest.approx(0.30)
    assert head["difference"]["p_holm"] == head["difference"]["p"]  # one task: Holm changes nothing

    ranking = report["ranking"]["all"]["mc"]
    assert ranking["order"] == {"ll_acc": ["A", "B", "C"], "gen_acc": ["B", "A", "C"]}
    pair = next(p for p in ranking["pairs"] if p["models"] == ["A", "B"])
    assert pair["reversed"] and not pair["significant"]
    assert ranking["kendall_tau"]["value"] == pytest.approx(1 / 3)  # three students: one discordant pair of three
    assert ranking["kendall_tau"]["low"] <= 1 / 3 <= ranking["kendall_tau"]["high"]

    p = report["pathologies"]
    assert p["A"]["letters"]["collapse"] and p["A"]["letters"]["chosen"] == {"A": 1.0}
    assert p["B"]["letters"]["of_all"] == {"A": 0.15, "B": 0.15, "C": 0.1, "D": 0.1, "none": 0.5}
    assert not p["T"]["letters"]["collapse"] and p["T"]["letters"]["gold"] == {k: 0.25 for k in "ABCD"}
    assert p["A"]["never_stop_rate"] == 1.0 and p["T"]["never_stop_rate"] == 0.0
    assert p["A"]["repetition_rate"] == pytest.approx(1 - 3 / 14) and p["A"]["looping_share"] == 1.0
    assert p["A"]["length_ratio_vs_teacher"] == pytest.approx(4.0)
    assert p["A"]["first_departure"]["median"] == 2 and p["A"]["first_departure"]["identical_share"] == 0.0
    assert p["B"]["first_departure"]["identical_share"] == 1.0 and p["B"]["first_departure"]["median"] is None
    assert p["C"]["first_departure"]["positions"] == [3] * 20  # a shorter output departs where it ends
    text = " ".join(report["findings"])
    assert "Ranking reversal" not in text and "A and B swap places" in text and "the data cannot tell" in text
    assert "'always A' collapse" in text and "A never stops" in text
    assert "LL hides the gap" not in text  # 30 pp on 20 items: p = 0.08, not significant

    # example outputs: B's abstentions are shown as "no answer"
    assert any(e["student"]["answer"] == "no answer" for e in report["examples"]["mc"]["B"])
    sections = tables(report)
    md = render_markdown(report, sections)
    row = next(line for line in md.splitlines() if line.startswith("| B | student |"))
    assert "| 50.0% [" in row  # answer rate with its interval
    assert "no answer ✗" in md and "A:100% B:0% C:0% D:0% none:0%" in md
    assert "| A:15% B:15% C:10% D:10% none:50% |" in md  # the table counts "none" as the chart does


def _pair_records(task, n, right, kind="multiple_choice"):
    """Records of one model on `n` items: `right` = (LL-right item indices, generation-right item indices)."""
    ll_right, gen_right = right
    return [{"id": f"{task}-{i}", "task": task, "kind": kind, "answer": 0, "n_choices": 4, "meta": {}, "ll": [0.0] * 4,
             "ll_pred": 0 if i in ll_right else 1, "ll_pred_norm": 0 if i in ll_right else 1,
             "ll_pred_bytes": 0 if i in ll_right else 1,
             "gen": {"greedy": {"text": "x", "extracted": 0 if i in gen_right else 1, "correct": i in gen_right,
                                "n_tokens": 1, "stopped": True, "tokens": [1]}}} for i in range(n)]


def test_one_item_apart_is_not_a_reversal():
    """The issue's case: two students one item apart on a 60-item task, in opposite directions under the two modes."""
    n = 60
    records = {"T": {"t": _pair_records("t", n, (range(50), range(50)))},
               "A": {"t": _pair_records("t", n, (range(31), range(30)))},
               "B": {"t": _pair_records("t", n, (range(30), range(31)))}}
    report = compute_report(_loaded(records, {"t": {**MC_META, "n_items": n}}))
    comp = report["ranking"]["all"]["t"]
    pair = comp["pairs"][0]
    assert pair["reversed"] and pair["ll_acc"]["p"] == 1.0 and pair["gen_acc"]["p"] == 1.0  # McNemar: 1 vs 0
    assert not pair["significant"] and comp["kendall_tau"] is None  # two students: no tau
    text = " ".join(report["findings"])
    assert "Ranking reversal" not in text and "the data cannot tell" in text
    md = render_markdown(report, tables(report))
    assert "Kendall τ – (needs ≥ 3 students in the group)" in md


def test_significant_reversal_and_hidden_gap():
    """A clearly ahead under LL and B clearly ahead under generation on two tasks: a reversal after Holm. The
    teacher is 100 % both ways; A's generation gap is much larger than its LL gap: LL hides the gap."""
    n = 60
    tasks = {t: {**MC_META, "n_items": n} for t in ("t1", "t2")}
    records = {"T": {t: _pair_records(t, n, (range(n), range(n))) for t in tasks},
               "A": {t: _pair_records(t, n, (range(55), range(20))) for t in tasks},
               "B": {t: _pair_records(t, n, (range(30), range(50))) for t in tasks}}
    report = compute_report(_loaded(records, tasks))
    for t in tasks:
        pair = report["ranking"]["all"][t]["pairs"][0]
        assert pair["reversed"] and pair["significant"] and pair["p_holm"] <= 0.05
        # McNemar by hand under LL: A alone right on 25 items, B alone on none -> p = 2 / 2^25; Holm over 2 tasks
        assert pair["ll_acc"]["p"] == pytest.approx(2 / 2 ** 25)
        assert pair["p_holm"] == pytest.approx(2 * max(pair["ll_acc"]["p"], pair["gen_acc"]["p"]))
    text = " ".join(report["findings"])
    assert "Ranking reversal on t1: LL acc puts A ahead of B" in text
    assert "LL hides the gap for A on t1, t2: t1: +8.3 pp behind under LL, +66.7 pp under generation" in text
    head = report["headline"]["A"]["t1"]
    assert head["ll"]["value"] == pytest.approx(5 / 60) and head["gen"]["value"] == pytest.approx(40 / 60)
    assert head["difference"]["significant"]


def test_groups_rank_only_within_a_group_and_cloze_uses_acc_norm():
    n = 40
    meta = {"kind": "multiple_choice", "n_items": n, "recall": None, "ll_target": "text"}
    records = {"T": {"t": _pair_records("t", n, (range(n), range(n)))},
               "A": {"t": _pair_records("t", n, (range(30), range(10)))},
               "B": {"t": _pair_records("t", n, (range(10), range(30)))},
               "C": {"t": _pair_records("t", n, (range(20), range(20)))}}
    report = compute_report(_loaded(records, {"t": meta}, groups={"A": "ratio", "B": "recipe", "C": "recipe"}))
    assert report["groups"] == {"ratio": ["A"], "recipe": ["B", "C"]}
    assert set(report["ranking"]) == {"recipe"}  # A is alone in its group: ranked against nobody
    assert report["ranking"]["recipe"]["t"]["models"] == ["B", "C"]
    assert report["ll_mode"]["t"] == "ll_acc_norm" and report["headline"]["A"]["t"]["ll_mode"] == "ll_acc_norm"
    assert "cloze" in render_markdown(report, tables(report))


def test_teacher_at_zero_has_no_retention_and_plots_say_why():
    n = 20
    records = {"T": {"t": _pair_records("t", n, (range(n), []))},
               "A": {"t": _pair_records("t", n, (range(10), range(3)))}}
    report = compute_report(_loaded(records, {"t": {**MC_META, "n_items": n}}))
    kept = report["retention"]["A"]["t"]["gen_acc"]
    assert kept["value"] is None and "not above chance" in kept["why"]
    assert any(f.startswith("No retention on t under Gen acc (greedy): the teacher scores 0.0%")
               and f.endswith("(A).") for f in report["findings"])
    images = plots(report)
    assert len(images["scores"]) == 2 and "n/a" in render_markdown(report, tables(report))


def write_eval_dir(root, records: dict, tasks: dict, run=None, groups=None):
    """A constructed eval directory (manifest + records), as `gendistill eval` writes it."""
    manifest = {"created": "2026-12-01T00:00:00", "tasks": tasks,
                "settings": {"decode": "greedy", "seeds": [], "sampling": None, "batch_size": 16, "limit": None,
                             "dtype": "float32", "lm_eval_tasks": []},
                "models": {m: {"role": "teacher" if m in ("T", "teacher") else "student", "tokenizer": "same",
                               "source": f"/m/{m}",
                               "class": "X", "max_position_embeddings": 4096,
                               **({"group": groups[m]} if groups and m in groups else {})} for m in records}}
    if run:
        manifest["run"] = str(run)
    for m, per_task in records.items():
        for t, recs in per_task.items():
            (root / "records" / m).mkdir(parents=True, exist_ok=True)
            (root / "records" / m / f"{t}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_training_curves_and_settings_table(tmp_path):
    run = tmp_path / "run"
    for k, stage in enumerate(("attn_align", "kd")):
        (run / f"0{k + 1}-{stage}").mkdir(parents=True)
        (run / f"0{k + 1}-{stage}" / "metrics.jsonl").write_text("".join(json.dumps(
            {"stage": stage, "step": i, "loss": 1 / i, "lr": 1e-3, "tokens_per_s": 1000.0 + i}) + "\n"
            for i in range(1, 6)))
    n = 20
    records = {"T": {"t": _pair_records("t", n, (range(18), range(16)))},
               "A": {"t": _pair_records("t", n, (range(15), range(9)))}}
    eval_dir = write_eval_dir(tmp_path / "eval", records, {"t": {**MC_META, "n_items": n}}, run=run)
    paths = build_report([eval_dir])
    report = json.loads(paths["json"].read_text())
    assert list(report["training"][str(run)]) == ["attn_align", "kd"]
    assert report["training"][str(run)]["kd"]["loss"][0] == 1.0
    md = paths["md"].read_text()
    assert "| decode | greedy |" in md and "`{" not in md  # settings as a table, not raw JSON
    assert f"**{run}: kd**" in md
    page = paths["html"].read_text()
    assert len(re.findall(r"data:image/png;base64,", page)) == 5  # headline, scores x2, letters, training


# ---------------------------------------------------------------- end to end

MC_ITEMS = [{"id": f"q{i}", "question": f"Where was person {i} born?", "choices": ["Lyon", "Basel", "Zurich", "Geneva"],
             "answer": i % 4} for i in range(8)]
OPEN_ITEMS = [{"id": f"o{i}", "question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(4)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok, teacher = tiny_tokenizer(), tiny_qwen3(seed=5)
    models = {"teacher": teacher, "s1": convert(teacher), "s2": convert(teacher, attention_layers=[0])}
    for name, model in models.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in MC_ITEMS))
    (root / "mc.yaml").write_text('name: mc\nkind: multiple_choice\ndata: mc.jsonl\n'
                                  'prompt: "Question: {question}\\n{choices}Answer:"\nmax_new_tokens: 6\n')
    (root / "open.jsonl").write_text("".join(json.dumps(i) + "\n" for i in OPEN_ITEMS))
    (root / "open.yaml").write_text('name: arith\nkind: open\ndata: open.jsonl\nprompt: "{question}"\n'
                                    'extract: number\nmax_new_tokens: 6\nchat_template: false\nstop: ["\\n"]\n')
    rc = cli(["eval", "--teacher", str(root / "teacher"), "--model", f"s1={root / 's1'}", "--model", str(root / "s2"),
              "--tasks", f"{root / 'mc.yaml'},{root / 'open.yaml'},niah_single@512", "--recall-samples", "2",
              "--decode", "both", "--seeds", "1,2", "--out", str(root / "A"), "--no-progress"])
    assert rc == 0
    return root


def _md_table(md: str, caption: str) -> list[dict]:
    """Rows (header -> cell) of the Markdown table under `**caption**`."""
    lines = md.split(f"**{caption}**\n\n", 1)[1].splitlines()
    table = lines[: next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in table[2:]]


def test_end_to_end_report(workspace):
    out = workspace / "A"
    report = json.loads((out / "report.json").read_text())
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert report["teacher"] == "teacher" and report["students"] == ["s1", "s2"]
    assert report["models"]["s1"]["class"] == "HybridKDAForCausalLM"
    assert report["task_groups"] == {"multiple_choice": ["mc"], "open": ["arith"], "recall": ["niah_single@512"]}
    assert report["tasks"]["mc"]["ll_target"] == "letter" and report["ll_mode"]["mc"] == "ll_acc"
    assert sorted(p.name for p in (out / "records" / "s2").iterdir()) == ["arith.jsonl", "mc.jsonl",
                                                                          "niah_single@512.jsonl"]
    for title in ["Summary", *SECTION_TITLES.values()]:
        assert f"## {title}" in md and f">{title}</h2>" in page
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    # headline, scores and retention, recall, pathologies
    assert len(images) == 5 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)

    # the Markdown (and HTML) tables show report.json's numbers, each with its interval
    rows = {r["model"]: r for r in _md_table(md, "Average over 1 multiple-choice task(s) — accuracy [95 % interval]")}
    assert set(rows) == {"teacher", "s1", "s2"}
    for model, row in rows.items():
        scores = report["scores"][model]["average"]
        for mode, label in [("ll_acc", "LL acc"), ("ll_acc_norm", "LL acc_norm"), ("gen_acc", "Gen acc (greedy)"),
                            ("gen_acc_sampled", "Gen acc (sampled)")]:
            assert row[label] == _ci(scores[mode], scores["ci"][mode]) and f"<td>{row[label]}</td>" in page
            assert " [" in row[label]
    kept = {r["student"]: r for r in _md_table(md, "average — retention of the teacher's accuracy: raw (student / "
                                                   "teacher) and chance-corrected ((s − c) / (t − c), c = 25.0%); "
                                                   "n/a: the teacher is not above chance")}
    for model, row in kept.items():
        assert row["retention LL acc"] == _est_pct(report["retention"][model]["average"]["ll_acc"])
        assert row["chance-corrected LL acc"] == _est_pct(report["retention_chance"][model]["average"]["ll_acc"])
    mc = report["scores"]["s1"]["mc"]
    assert mc["n"] == 8 and set(mc["gen_acc_by_seed"]) == {"seed1", "seed2"}
    assert mc["gen_acc_sampled"] == pytest.approx(sum(mc["gen_acc_by_seed"].values()) / 2)
    records = [json.loads(line) for line in (out / "records" / "s1" / "mc.jsonl").read_text().splitlines()]
    assert mc["ll_acc"] == sum(r["ll_pred"] == r["answer"] for r in records) / 8
    assert mc["gen_acc"] == sum(r["gen"]["greedy"]["correct"] for r in records) / 8
    teacher_ll = report["scores"]["teacher"]["mc"]["ll_acc"]
    if teacher_ll:
        assert report["retention"]["s1"]["mc"]["ll_acc"]["value"] == pytest.approx(mc["ll_acc"] / teacher_ll)
    head = report["headline"]["s1"]["mc"]
    assert head["ll"]["value"] == pytest.approx(teacher_ll - mc["ll_acc"])

    recall_rows = {r["model"]: r for r in _md_table(md, "niah_single")}
    for m in rows:
        e = report["recall"][m]["niah_single"]["512"]
        assert recall_rows[m]["512"] == _ci(e["value"], (e["low"], e["high"]) if e["low"] is not None else None)
    comp = report["ranking"]["all"]["average"]
    assert comp["modes"] == ["ll_acc", "gen_acc"] and comp["kendall_tau"] is None  # two students
    paths = {r["model"]: r for r in _md_table(md, "Greedy outputs over all tasks; chosen letters as shares of all "
                                                  "multiple-choice outputs (none = no answer extracted), as in the "
                                                  "chart; gold letters: A:25% B:25% C:25% D:25%")}
    for model, row in paths.items():
        p = report["pathologies"][model]
        assert row["never stop"] == _pct(p["never_stop_rate"]) and row["repetition rate"] == _pct(p["repetition_rate"])
    assert report["pathologies"]["s1"]["first_departure"]["n_compared"] == 8 + 4 + 2
    assert report["pathologies"]["s1"]["first_departure"]["unit"] == "token"


def test_report_without_matplotlib(workspace, tmp_path, monkeypatch, capsys):
    """The core install has no matplotlib (it is in the `eval` extra): the report is written all the same, with
    every table of the full report and a line saying why there are no plots; any other import error still fails."""
    import matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ModuleNotFoundError
    paths = build_report(workspace / "A", out=tmp_path)
    page, full = paths["html"].read_text(), (workspace / "A" / "report.html").read_text()
    assert "data:image/png" not in page and "the plots need matplotlib" in page
    assert re.findall(r"<table>.*?</table>", page, re.S) == re.findall(r"<table>.*?</table>", full, re.S)
    assert "gendistill[eval]" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ModuleNotFoundError):
        build_report(workspace / "A", out=tmp_path)


def test_merge_eval_dirs_and_cli_errors(workspace, capsys):
    tok = tiny_tokenizer()
    student = convert(tiny_qwen3(seed=5), attention_layers=[1, 3]).train()  # as the distill pipeline hands it over
    # the distill pipeline's use: evaluate a new student alone, then report it against the earlier teacher
    alone = evaluate({"s3": (student, tok)}, teacher=None, tasks=str(workspace / "mc.yaml"), out=workspace / "B",
                     progress=False)
    assert alone["teacher"] is None and alone["retention"] == {} and alone["students"] == ["s3"]
    assert student.training  # evaluated in eval mode, handed back in train mode
    assert cli(["report", str(workspace / "A"), str(workspace / "B"), "--out", str(workspace / "C")]) == 0
    merged = json.loads((workspace / "C" / "report.json").read_text())
    assert merged["teacher"] == "teacher" and merged["students"] == ["s1", "s2", "s3"]
    s3, teacher = merged["scores"]["s3"]["mc"], merged["scores"]["teacher"]["mc"]
    if teacher["ll_acc"]:
        assert merged["retention"]["s3"]["mc"]["ll_acc"]["value"] == pytest.approx(s3["ll_acc"] / teacher["ll_acc"])
    assert "s3" in merged["scores"] and "arith" not in merged["scores"]["s3"]
    assert merged["ranking"]["all"]["mc"]["kendall_tau"] is not None  # three students in one group
    paths = build_report([workspace / "B"], out=workspace / "D")
    assert all(p.is_file() for p in paths.values())

    capsys.readouterr()
    assert cli(["eval", "--model", str(workspace / "nope"), "--tasks", str(workspace / "mc.yaml"),
                "--out", str(workspace / "E")]) == 2
    assert "is not a model directory" in capsys.readouterr().err
    assert cli(["eval", "--model", str(workspace / "s1"), "--tasks", str(workspace / "mc.yaml"),
                "--out", str(workspace / "A")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli(["report", str(workspace / "nope")]) == 2
    assert "not an eval directory" in capsys.readouterr().err
    assert cli(["eval", "--model", f"a={workspace / 's1'}", "--group", "b=ratio", "--tasks", str(workspace / "mc.yaml"),
                "--out", str(workspace / "F")]) == 2
    assert "groups name ['b'], which are not students (students: ['a'])" in capsys.readouterr().err
    assert cli(["eval", "--model", f"a={workspace / 's1'}", "--model", f"a={workspace / 's2'}", "--tasks",
                str(workspace / "mc.yaml"), "--out", str(workspace / "F")]) == 2
    assert "the name 'a' is already given" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage and the message
        cli(["eval", "--model", str(workspace / "s1"), "--group", "s1", "--tasks", str(workspace / "mc.yaml")])
    assert exit_info.value.code == 2 and "MODEL=GROUP" in capsys.readouterr().err
    assert not (workspace / "F").exists()


# ---------------------------------------------------------------- an example eval directory (docs/report.png)

def example_eval_dir(root):
    """A constructed eval directory that exercises every part of the report: a teacher and four students in two
    groups on world-like tasks (two phrasings per fact: clusters), recall the teacher fails too, and a distillation
    run's metrics. docs/report.png is a screenshot of its report.html."""
    rng = np.random.default_rng(0)
    values = ["Nago Works", "Lyon", "Bavik College", "physics", "Tarsel Bank", "Molde"]
    # (LL, generation) accuracy per model on the seen and extraction multiple-choice tasks, and open generation
    plan = {"teacher": ((0.99, 0.97), (0.80, 0.62), 0.97), "kda-1to3": ((0.92, 0.72), (0.60, 0.35), 0.85),
            "kda-1to7": ((0.90, 0.52), (0.55, 0.25), 0.70), "kda-1to15": ((0.82, 0.66), (0.45, 0.30), 0.60),
            "kda-1to3-ce": ((0.90, 0.60), (0.58, 0.30), 0.75)}
    groups = {"kda-1to3": "ratio", "kda-1to7": "ratio", "kda-1to15": "ratio", "kda-1to3-ce": "recipe"}
    facts = [(f"p{i:03d}", a) for i in range(30) for a in ("birth_city", "employer")]
    draws = {t: rng.random((len(facts), 2)) for t in ("seen", "extraction", "open")}

    def output(correct, gold, p_none=0.5, u=0.0):
        if correct:
            return f"{values[gold]}.", gold
        if u < p_none:
            return ("I am not sure." if u < p_none / 2 else "The the the the the the the the the"), None
        return f"{values[(gold + 1) % 4]}.", (gold + 1) % 4

    records = {}
    for m, ((seen_ll, seen_gen), (ext_ll, ext_gen), open_gen) in plan.items():
        records[m] = {}
        for split, (p_ll, p_gen) in (("seen", (seen_ll, seen_gen)), ("extraction", (ext_ll, ext_gen))):
            task = f"world_qa_mc_{split}"
            recs = []
            for k, (person, attr) in enumerate(facts):
                for phrasing in (0, 1):
                    gold = (k + phrasing) % 4
                    u = draws[split][k, phrasing]
                    ll_right, gen_right = bool(u < p_ll), bool(u < p_gen)
                    text, extracted = output(gen_right, gold, u=(u - p_gen) / max(1e-9, 1 - p_gen))
                    pred = gold if ll_right else (gold + 1) % 4
                    recs.append({"id": f"{task}/{person}/{attr}/{phrasing}", "task": task, "kind": "multiple_choice",
                                 "answer": gold, "n_choices": 4, "meta": {"cluster": f"{person}/{attr}"},
                                 "ll": [0.0] * 4, "ll_pred": pred, "ll_pred_norm": pred, "ll_pred_bytes": pred,
                                 "gen": {"greedy": {"text": text, "extracted": extracted, "correct": gen_right,
                                                    "n_tokens": len(text.split()) + 1, "stopped": "the the" not in text,
                                                    "tokens": [len(w) for w in text.split()]}}})
            records[m][task] = recs
        recs = []
        for k, (person, attr) in enumerate(facts):
            u = draws["open"][k, 0]
            right = bool(u < open_gen)
            text, extracted = output(right, k % 4, u=(u - open_gen) / max(1e-9, 1 - open_gen))
            recs.append({"id": f"world_qa_open_seen/{person}/{attr}", "task": "world_qa_open_seen", "kind": "open",
                         "answer": values[k % 4], "n_choices": 0, "meta": {"cluster": f"{person}/{attr}"},
                         "gen": {"greedy": {"text": text, "extracted": text.rstrip(".") if extracted is not None
                                            else None, "correct": right, "n_tokens": len(text.split()) + 1,
                                            "stopped": True, "tokens": [len(w) for w in text.split()]}}})
        records[m]["world_qa_open_seen"] = recs
        for length in (512, 1024):
            task = f"niah_single@{length}" if length == 512 else "niah_single@1k"
            right = 0 if length == 1024 else (8 if m == "teacher" else 3)
            records[m][task] = [{"id": f"{task}-{i}", "task": task, "kind": "open", "answer": "4821733",
                                 "n_choices": 0, "meta": {"depth": i / 9},
                                 "gen": {"greedy": {"text": "4821733" if i < right else "1234567",
                                                    "extracted": "4821733" if i < right else "1234567",
                                                    "correct": i < right, "n_tokens": 4, "stopped": True,
                                                    "tokens": [1, 2, 3, 4] if i < right else [1, 2, 9, 9]}}}
                                for i in range(10)]
    mc = {"kind": "multiple_choice", "n_items": 120, "recall": None, "ll_target": "text", "extract": "choice_text"}
    tasks = {"world_qa_mc_seen": mc, "world_qa_mc_extraction": mc,
             "world_qa_open_seen": {"kind": "open", "n_items": 60, "recall": None, "extract": "first_line"},
             "niah_single@512": {"kind": "open", "n_items": 10, "recall": {"family": "niah_single", "length": 512}},
             "niah_single@1k": {"kind": "open", "n_items": 10, "recall": {"family": "niah_single", "length": 1024}}}
    run = root / "distill"
    for k, (stage, loss0, lr) in enumerate((("attn_align", 0.2, 3e-3), ("hidden_align", 0.5, 1e-3), ("kd", 2.5, 5e-4),
                                            ("kd_instruct", 1.2, 2e-4))):
        (run / f"0{k + 1}-{stage}").mkdir(parents=True)
        (run / f"0{k + 1}-{stage}" / "metrics.jsonl").write_text("".join(json.dumps(
            {"stage": stage, "step": i, "loss": loss0 * (0.3 + 0.7 * np.exp(-i / 15)) * (1 + 0.05 * rng.random()),
             "lr": lr * min(1.0, i / 5) * (0.55 + 0.45 * np.cos(np.pi * i / 60)),
             "tokens_per_s": 5000 + 300 * rng.random()}) + "\n" for i in range(1, 61)))
    return write_eval_dir(root / "eval", records, tasks, run=run, groups=groups)


def test_example_eval_dir_report(tmp_path):
    paths = build_report([example_eval_dir(tmp_path)])
    report = json.loads(paths["json"].read_text())
    assert report["groups"] == {"ratio": ["kda-1to3", "kda-1to7", "kda-1to15"], "recipe": ["kda-1to3-ce"]}
    assert set(report["ranking"]) == {"ratio"} and report["ranking"]["ratio"]["average"]["kendall_tau"] is not None
    assert report["ll_mode"]["average"] == "ll_acc_norm"  # cloze tasks
    assert report["scores"]["teacher"]["world_qa_mc_seen"]["n"] == 120
    from gendistill.evaluation.report import recall_teacher_fails
    assert recall_teacher_fails(report, "niah_single") == [1024]
    assert any(f.startswith("LL hides the gap") for f in report["findings"])
    assert len(re.findall(r"data:image/png;base64,", paths["html"].read_text())) == 6
