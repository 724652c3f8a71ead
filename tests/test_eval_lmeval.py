"""lm-eval bridge, offline, on a local YAML task (`dataset_path: json`): lm-eval's LL accuracy equals ours on the
same items, and its left-padded `generate_until` path runs on the Hybrid-KDA student and matches our engine."""
import pytest
import yaml

from gendistill.convert import convert
from gendistill.evaluation.engine import Sampling
from gendistill.evaluation.lmeval import export_task, lm_eval_name, run_lm_eval
from gendistill.evaluation.report import task_scores
from gendistill.evaluation.scoring import decode_modes, score_task
from gendistill.evaluation.tasks import Task
from gendistill.testing import tiny_qwen3, tiny_tokenizer


CITIES = ["Lyon", "Basel on the Rhine", "Zürich", "Genève, a city by the lake", "Bern"]


def make_task(chat: bool) -> Task:
    # option texts of very different lengths (and non-ASCII) so that acc and acc_norm can disagree
    items = [{"id": f"q{i}", "question": f"Where was person number {i} born?",
              "choices": [CITIES[(i + k) % 5] for k in range(4)], "answer": i % 4} for i in range(16)]
    return Task(name=f"geo-{'chat' if chat else 'plain'}", kind="multiple_choice", prompt="Question: {question}\nAnswer:",
                items=items, chat_template=chat, max_new_tokens=6, stop=["\n"], extract="choice_text", ll_target="text")


@pytest.mark.parametrize("kind, chat", [("qwen3", False), ("hybrid_kda", True)])
def test_lm_eval_matches_our_scores(tmp_path, kind, chat):
    teacher = tiny_qwen3(seed=4)
    model = teacher if kind == "qwen3" else convert(teacher).eval()
    tok, task = tiny_tokenizer(), make_task(chat)
    config = yaml.safe_load(export_task(task, tmp_path / "probe").read_text())
    assert config["dataset_path"] == "json" and config["output_type"] == "multiple_choice"

    records = score_task(model, tok, task, decode_modes("greedy", [], Sampling()), batch_size=5, progress=False)
    ours = task_scores(records)
    out = run_lm_eval(model, tok, [task], export_dir=tmp_path / "tasks", batch_size=5, log_samples=True)
    theirs = out["results"][lm_eval_name(task)]
    assert theirs["acc,none"] == pytest.approx(ours["ll_acc"])
    assert theirs["acc_norm,none"] == pytest.approx(ours["ll_acc_norm"])
    by_id = {r["id"]: r for r in records}
    for sample in out["samples"][lm_eval_name(task)]:  # the per-choice log-likelihoods themselves agree
        assert [resp[0][0] for resp in sample["resps"]] == pytest.approx(by_id[sample["doc"]["id"]]["ll"], abs=1e-4)
    # generate_until: lm-eval left-pads its batches and calls model.generate; the outputs are our engine's
    generated = {s["doc"]["id"]: s["resps"][0][0] for s in out["samples"][lm_eval_name(task, generative=True)]}
    assert generated == {r["id"]: r["gen"]["greedy"]["text"] for r in records}
    # the comparisons can fail: outputs differ between items, and length normalisation changes some choices
    assert len(set(generated.values())) >= 3
    assert any(r["ll_pred"] != r["ll_pred_norm"] for r in records)


def test_eval_with_lm_eval_tasks_in_report(tmp_path):
    """`evaluate(..., lm_eval_tasks=[our task YAML])`: lm-eval's numbers land in the report beside ours."""
    import json

    from gendistill.evaluation import evaluate

    task = make_task(chat=True)
    (tmp_path / "geo.jsonl").write_text("".join(json.dumps(i) + "\n" for i in task.items[:8]))
    (tmp_path / "geo.yaml").write_text(yaml.safe_dump({
        "name": "geo", "kind": "multiple_choice", "data": "geo.jsonl", "prompt": task.prompt, "ll_target": "text",
        "extract": "choice_text", "max_new_tokens": 4}))
    student = convert(tiny_qwen3(seed=4)).eval()
    report = evaluate({"student": (student, tiny_tokenizer())}, tasks=str(tmp_path / "geo.yaml"), out=tmp_path / "out",
                      lm_eval_tasks=[str(tmp_path / "geo.yaml")], progress=False)
    lm = report["lm_eval"]["student"]
    assert lm["gd_geo"]["acc,none"] == pytest.approx(report["scores"]["student"]["geo"]["ll_acc"])
    assert lm["gd_geo_gen"]["sample_len"] == 8 and "exact_match,none" in lm["gd_geo_gen"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"| gd_geo | acc,none | {lm['gd_geo']['acc,none']:.4f} |" in md
