"""Report numbers on constructed score tables and records, and the end-to-end report: a tiny teacher against its
converted (not distilled) Hybrid-KDA students, through `gendistill eval` and `gendistill report`."""
import base64
import json
import re

import pytest

from gendistill.cli import main as cli
from gendistill.convert import convert
from gendistill.evaluation import build_report, evaluate
from gendistill.evaluation.report import (
    SECTION_TITLES, _pct, _pp, compare_rankings, compute_report, gap, kendall_tau, render_markdown, retention, tables)
from gendistill.testing import tiny_qwen3, tiny_tokenizer


# ---------------------------------------------------------------- constructed tables

def test_retention_gap_and_reversals():
    scores = {"T": {"ll_acc": 0.80, "gen_acc": 0.60}, "A": {"ll_acc": 0.79, "gen_acc": 0.40},
              "B": {"ll_acc": 0.75, "gen_acc": 0.50}, "C": {"ll_acc": 0.70, "gen_acc": 0.30}}
    kept = retention(scores, "T")
    assert kept["A"] == pytest.approx({"ll_acc": 0.9875, "gen_acc": 0.40 / 0.60})
    assert set(kept) == {"A", "B", "C"}
    assert gap(scores["A"]) == pytest.approx({"ll_minus_gen_acc": 0.39})
    assert gap({"ll_acc": 0.5}) == {}
    students = {k: v for k, v in scores.items() if k != "T"}
    ranked = compare_rankings(students, "ll_acc", "gen_acc")
    assert ranked["order"] == {"ll_acc": ["A", "B", "C"], "gen_acc": ["B", "A", "C"]}
    assert [(r["ahead_by_ll_acc"], r["ahead_by_gen_acc"]) for r in ranked["reversals"]] == [("A", "B")]
    assert ranked["kendall_tau"] == pytest.approx(1 / 3)  # pairs: one discordant, two concordant
    agree = compare_rankings({"A": {"x": 1, "y": 5}, "B": {"x": 2, "y": 6}}, "x", "y")
    assert agree["reversals"] == [] and agree["kendall_tau"] == 1.0


def test_kendall_tau_b_with_ties():
    # pairs: 4 concordant, 1 discordant, 1 tied in x only -> (4 - 1) / sqrt((6 - 1) * (6 - 0))
    assert kendall_tau([1, 2, 3, 3], [1, 3, 2, 4]) == pytest.approx(3 / 30 ** 0.5)
    assert kendall_tau([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 1], [1, 2]) is None


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


def constructed_report() -> dict:
    records = {
        "T": _records(16, lambda i, a: a if i < 12 else (a + 1) % 4, [1, 2, 3, 4]),
        "A": _records(15, lambda i, a: 0, [1, 2] + [9] * 14, stopped=False),  # always "A", never stops, loops
        "B": _records(14, lambda i, a: a if i < 10 else None, [1, 2, 3, 4]),  # identical to the teacher's text
        "C": _records(12, lambda i, a: a if i < 4 else (a + 2) % 4, [1, 2, 3]),
    }
    models = {m: {"role": "teacher" if m == "T" else "student", "tokenizer": "same", "max_position_embeddings": 4096}
              for m in records}
    return compute_report({"models": models, "teacher": "T", "records": {m: {"mc": r} for m, r in records.items()},
                           "tasks": {"mc": {"kind": "multiple_choice", "n_items": 20, "recall": None}},
                           "lm_eval": {}, "settings": [], "notes": []})


def test_report_on_constructed_records():
    report = constructed_report()
    avg = {m: report["scores"][m]["average"] for m in "TABC"}
    assert avg["T"]["ll_acc"] == 0.8 and avg["T"]["gen_acc"] == 0.6
    assert avg["A"]["ll_acc"] == 0.75 and avg["A"]["gen_acc"] == 0.25  # right only where the gold is A
    assert avg["B"]["gen_acc"] == 0.5 and avg["B"]["no_answer"] == 0.5
    assert report["retention"]["A"]["average"] == pytest.approx({"ll_acc": 0.9375, "ll_acc_norm": 0.9375,
                                                                 "gen_acc": 0.25 / 0.6})
    assert report["behind_teacher"]["A"]["average"]["gen_acc"] == pytest.approx(0.35)
    assert report["gap"]["A"]["average"]["ll_minus_gen_acc"] == pytest.approx(0.5)
    assert report["retention_gap"]["A"]["average"]["ll_acc_minus_gen_acc"] == pytest.approx(0.9375 - 0.25 / 0.6)
    ranking = {tuple(c["modes"]): c for c in report["ranking"]["average"]}[("ll_acc", "gen_acc")]
    assert [(r["ahead_by_ll_acc"], r["ahead_by_gen_acc"]) for r in ranking["reversals"]] == [("A", "B")]
    assert ranking["kendall_tau"] == pytest.approx(1 / 3)

    p = report["pathologies"]
    assert p["A"]["letters"]["collapse"] and p["A"]["letters"]["chosen"] == {"A": 1.0}
    assert not p["T"]["letters"]["collapse"] and p["T"]["letters"]["gold"] == {k: 0.25 for k in "ABCD"}
    assert p["A"]["never_stop_rate"] == 1.0 and p["T"]["never_stop_rate"] == 0.0
    assert p["A"]["repetition_rate"] == pytest.approx(1 - 3 / 14) and p["A"]["looping_share"] == 1.0
    assert p["A"]["length_ratio_vs_teacher"] == pytest.approx(4.0)
    assert p["A"]["first_departure"]["median"] == 2 and p["A"]["first_departure"]["identical_share"] == 0.0
    assert p["B"]["first_departure"]["identical_share"] == 1.0 and p["B"]["first_departure"]["median"] is None
    assert p["C"]["first_departure"]["positions"] == [3] * 20  # a shorter output departs where it ends
    text = " ".join(report["findings"])
    assert "Ranking reversal" in text and "'always A' collapse" in text and "A never stops" in text

    md = render_markdown(report, tables(report))
    row = next(line for line in md.splitlines() if line.startswith("| A | student |"))
    assert _pct(0.25 / 0.6) in row and _pp(0.5) in row and "| 75.0% |" in row


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
    rc = cli(["eval", "--teacher", str(root / "teacher"), "--model", str(root / "s1"), "--model", str(root / "s2"),
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
    assert sorted(p.name for p in (out / "records" / "s2").iterdir()) == ["arith.jsonl", "mc.jsonl",
                                                                          "niah_single@512.jsonl"]
    for title in ["Summary", *SECTION_TITLES.values(), "Settings"]:
        assert f"## {title}" in md and f">{title}</h2>" in page
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 4 and all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)

    # the Markdown (and HTML) tables show report.json's numbers
    rows = {r["model"]: r for r in _md_table(md, "Average over 1 multiple-choice task(s)")}
    assert set(rows) == {"teacher", "s1", "s2"}
    for model, row in rows.items():
        scores = report["scores"][model]["average"]
        for mode, label in [("ll_acc", "LL acc"), ("ll_acc_norm", "LL acc_norm"), ("gen_acc", "Gen acc (greedy)"),
                            ("gen_acc_sampled", "Gen acc (sampled)")]:
            assert row[label] == _pct(scores[mode]) and f"<td>{row[label]}</td>" in page
        assert row["gap LL − Gen acc (greedy)"] == _pp(report["gap"][model]["average"]["ll_minus_gen_acc"])
        if model != "teacher":
            assert row["retention LL acc"] == _pct(report["retention"][model]["average"]["ll_acc"])
    mc = report["scores"]["s1"]["mc"]
    assert mc["n"] == 8 and set(mc["gen_acc_by_seed"]) == {"seed1", "seed2"}
    assert mc["gen_acc_sampled"] == pytest.approx(sum(mc["gen_acc_by_seed"].values()) / 2)
    records = [json.loads(line) for line in (out / "records" / "s1" / "mc.jsonl").read_text().splitlines()]
    assert mc["ll_acc"] == sum(r["ll_pred"] == r["answer"] for r in records) / 8
    assert mc["gen_acc"] == sum(r["gen"]["greedy"]["correct"] for r in records) / 8
    teacher_ll = report["scores"]["teacher"]["mc"]["ll_acc"]
    if teacher_ll:
        assert report["retention"]["s1"]["mc"]["ll_acc"] == pytest.approx(mc["ll_acc"] / teacher_ll)

    recall_rows = {r["model"]: r for r in _md_table(md, "niah_single")}
    assert {m: recall_rows[m]["512"] for m in rows} == {m: _pct(report["recall"][m]["niah_single"]["512"])
                                                        for m in rows}
    ranking = _md_table(md, "average")
    assert len(ranking) == len(report["ranking"]["average"]) == 4  # 2 LL modes x 2 generation modes
    taus = {(r["LL mode"], r["generation mode"]): r["Kendall τ"] for r in ranking}
    first = report["ranking"]["average"][0]
    assert taus[("LL acc", "Gen acc (greedy)")] == (
        "–" if first["kendall_tau"] is None else f"{first['kendall_tau']:+.2f}")
    paths = {r["model"]: r for r in _md_table(md, "Greedy outputs over all tasks; gold letters: "
                                                  "A:25% B:25% C:25% D:25%")}
    for model, row in paths.items():
        p = report["pathologies"][model]
        assert row["never stop"] == _pct(p["never_stop_rate"]) and row["repetition rate"] == _pct(p["repetition_rate"])
    assert report["pathologies"]["s1"]["first_departure"]["n_compared"] == 8 + 4 + 2
    assert report["pathologies"]["s1"]["first_departure"]["unit"] == "token"


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
        assert merged["retention"]["s3"]["mc"]["ll_acc"] == pytest.approx(s3["ll_acc"] / teacher["ll_acc"])
    assert "s3" in merged["scores"] and "arith" not in merged["scores"]["s3"]
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
