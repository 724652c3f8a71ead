"""lm-eval tasks as a source of items (`--tasks lm-eval:NAME`), offline: local lm-eval YAML tasks over JSONL files
(`dataset_path: json`) scored both ways, item by item equal to `lm_eval.simple_evaluate` on the same model; a
generative task judged by lm-eval's own regex filter and metric; offline errors before any model loads; one failing
task keeps the others' records; code runs only sandboxed and only when allowed."""
import json

import pytest
import yaml

from gendistill.convert import convert
from gendistill.evaluation import evaluate
from gendistill.evaluation.engine import Sampling
from gendistill.evaluation.lmeval import run_lm_eval
from gendistill.evaluation.lmeval_tasks import (MC_INSTRUCTION, PAPER_SUITE, CodeSource, build_lm_eval_tasks,
                                                suite_entries)
from gendistill.evaluation.sandbox import isolation, run_python
from gendistill.evaluation.scoring import decode_modes, score_task
from gendistill.evaluation.tasks import Task
from gendistill.io import UserError
from gendistill.recipes import ROOT as BUNDLED
from gendistill.testing import tiny_qwen3, tiny_tokenizer

CITIES = ["Lyon", "Basel on the Rhine", "Zürich", "Genève, a city by the lake", "Bern"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _yaml(path, config):
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


@pytest.fixture
def task_dir(tmp_path):
    """Three lm-eval tasks: multiple choice with random few-shot draws (acc, acc_norm), multiple input (WinoGrande's
    shape: one context per choice) and generate_until with a regex filter."""
    d = tmp_path / "lm_tasks"
    d.mkdir()
    rows = [{"question": f"Where was person number {i} born?", "options": [CITIES[(i + k) % 5] for k in range(4)],
             "label": i % 4} for i in range(14)]
    _jsonl(d / "geo.jsonl", rows[:8])
    _jsonl(d / "geo_train.jsonl", rows[8:])
    files = {"test": str(d / "geo.jsonl"), "train": str(d / "geo_train.jsonl")}
    _yaml(d / "geo.yaml", {
        "task": "gd_geo", "dataset_path": "json", "dataset_kwargs": {"data_files": files},
        "test_split": "test", "training_split": "train", "fewshot_split": "train", "num_fewshot": 2,
        "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{options}}", "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]})
    _jsonl(d / "fill.jsonl", [{"contexts": [f"Person {i} took the train because the {w}" for w in ("bus", "car")],
                               "rest": "was late.", "label": i % 2} for i in range(6)])
    _yaml(d / "fill.yaml", {
        "task": "gd_fill", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(d / "fill.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "label",
        "doc_to_choice": "contexts", "doc_to_target": "rest", "metric_list": [{"metric": "acc"}]})
    _jsonl(d / "arith.jsonl", [{"question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(6)])
    _yaml(d / "arith.yaml", {
        "task": "gd_arith", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(d / "arith.jsonl")}}, "test_split": "test",
        "output_type": "generate_until", "doc_to_text": "Q: {{question}}\nA:", "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False},
        "filter_list": [{"name": "first-number", "filter": [{"function": "regex", "regex_pattern": "(\\d+)"},
                                                            {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]})
    return d


@pytest.mark.parametrize("kind, chat", [("qwen3", False), ("hybrid_kda", True)])
def test_multiple_choice_both_ways_agrees_with_simple_evaluate(task_dir, tmp_path, kind, chat):
    teacher = tiny_qwen3(seed=4)
    model = teacher if kind == "qwen3" else convert(teacher).eval()
    tok = tiny_tokenizer()
    tasks, refused = build_lm_eval_tasks(["lm-eval:gd_geo", "lm-eval:gd_fill"], include=[task_dir], chat=chat)
    assert refused == [] and [t.name for t in tasks] == ["gd_geo", "gd_fill"]
    lm = run_lm_eval(model, tok, [task_dir / "geo.yaml", task_dir / "fill.yaml"], export_dir=tmp_path / "x",
                     batch_size=4, chat_template=chat, log_samples=True)
    for task in tasks:
        records = score_task(model, tok, task, decode_modes("greedy", [], Sampling()), batch_size=4, progress=False)
        samples = {s["doc_id"]: s for s in lm["samples"][task.name]}
        assert len(samples) == len(records) == len(task.items)
        requests = task.adapter.ll_requests(task.items, tok)
        for record, item, pairs in zip(records, task.items, requests):
            sample = samples[item["meta"]["doc_id"]]
            assert [tuple(a[:2]) for a in sample["arguments"]] == pairs  # lm-eval's own contexts and continuations
            assert record["ll"] == pytest.approx([r[0][0] for r in sample["resps"]], abs=1e-4)
            assert float(record["ll_pred"] == record["answer"]) == sample["acc"]
            if "acc_norm" in sample:
                assert float(record["ll_pred_norm"] == record["answer"]) == sample["acc_norm"]
            gen = record["gen"]["greedy"]
            assert gen["correct"] == (gen["extracted"] == record["answer"])
    geo, fill = tasks
    # the generation prompt lists the options by letter and keeps lm-eval's cue last
    prompt = geo.adapter.prompts(geo.items[:1], tok)[0]
    assert MC_INSTRUCTION in prompt and "A. " + geo.items[0]["choices"][0] in prompt
    assert ("<|im_start|>" in prompt) == chat
    # few-shot: lm-eval's random draws differ between items, and generation shows the same examples, answered by letter
    draws = [tuple(s["question"] for s in geo.adapter.shots[i["meta"]["doc_id"]]) for i in geo.items]
    assert len(set(draws)) > 1 and all(len(d) == 2 for d in draws)
    lm_context = geo.adapter.ll_requests(geo.items[:1], tok)[0][0][0]
    for shot in geo.adapter.shots[0]:
        assert shot["question"].split("\n\n", 1)[1].split("\n")[0] in lm_context
    # multiple input: the whole sentences are the options
    assert "A. Person 0 took the train because the bus was late." in fill.adapter.prompts(fill.items[:1], tok)[0]


def test_generative_task_uses_lm_eval_filters_and_metrics(task_dir, tmp_path):
    model, tok = tiny_qwen3(seed=4), tiny_tokenizer()
    (task,), _ = build_lm_eval_tasks(["lm-eval:gd_arith"], include=[task_dir], chat=False)
    assert task.kind == "open" and task.max_new_tokens == 8 and task.stop == ["\n\n"]
    records = score_task(model, tok, task, decode_modes("greedy", [], Sampling()), batch_size=3, progress=False)
    lm = run_lm_eval(model, tok, [task_dir / "arith.yaml"], export_dir=tmp_path / "x", batch_size=3,
                     chat_template=False, log_samples=True)
    samples = {s["doc_id"]: s for s in lm["samples"]["gd_arith"]}
    for record in records:
        sample, gen = samples[int(record["id"].split("/")[1])], record["gen"]["greedy"]
        assert sample["resps"][0][0] == gen["text"]  # lm-eval's generate_until and gendistill's engine agree
        assert sample["filtered_resps"][0] == gen["extracted"]
        assert float(gen["correct"]) == sample["exact_match"] == gen["lm_eval"]["first-number"]["exact_match"]
    # the judge itself: lm-eval's regex filter takes the first number, its exact_match compares it with the target
    item = task.items[2]  # "What is 2 plus 1?" -> "3"
    assert task.adapter.judge(item, "It is 3, not 4")["correct"] is True
    wrong = task.adapter.judge(item, "It is 4, not 3")
    assert wrong["correct"] is False and wrong["extracted"] == "4"
    assert task.adapter.judge(item, "no digits")["extracted"] == "[invalid]"


def test_offline_without_cache_fails_before_any_model_loads(task_dir, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 (conftest) and a hub dataset that is not cached: one UserError naming it, nothing written,
    no model loaded; the same for lm-eval's own harness (`--lm-eval`)."""
    import gendistill.evaluation.runner as runner

    _yaml(task_dir / "remote.yaml", {
        "task": "gd_remote", "dataset_path": "gendistill-test/not-a-dataset", "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "{{c}}", "doc_to_target": 0})

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(runner, "load_model", no_model)
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:
        evaluate(["unused"], tasks="lm-eval:gd_geo,lm-eval:gd_remote", out=out, lm_eval_include=[str(task_dir)],
                 progress=False)
    message = str(err.value)
    assert "lm-eval:gd_remote" in message and "gd_geo" not in message and "(offline)" in message and "cache" in message
    with pytest.raises(UserError, match=r"(?s)--lm-eval tasks.*gd_remote.*\(offline\).*cache"):
        evaluate(["unused"], tasks="lm-eval:gd_geo", out=out,
                 lm_eval_include=[str(task_dir)], lm_eval_tasks=[str(task_dir / "remote.yaml")], progress=False)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


class _Broken:
    """An adapter whose task fails while it is scored."""

    def prompts(self, items, tokenizer):
        raise RuntimeError("this task breaks")


def test_failing_task_keeps_the_others_records(task_dir, tmp_path):
    student = convert(tiny_qwen3(seed=4)).eval()
    broken = Task(name="broken", kind="open", prompt="{q}", items=[{"id": "a", "answer": "x"}], adapter=_Broken())
    out = tmp_path / "out"
    evaluate({"student": (student, tiny_tokenizer())}, tasks=[broken, "lm-eval:gd_geo,lm-eval:humaneval"], out=out,
             lm_eval_include=[str(task_dir)], limit=3, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    failed = {f["task"]: f for f in manifest["failed"]}
    assert set(failed) == {"broken", "humaneval"}
    assert failed["broken"]["model"] == "student" and "this task breaks" in failed["broken"]["error"]
    # refused, not run: its dataset (not cached, offline) was never asked for
    assert failed["humaneval"]["model"] is None and "--allow-code-execution" in failed["humaneval"]["error"]
    assert [p.name for p in (out / "records" / "student").iterdir()] == ["gd_geo.jsonl"]
    assert manifest["tasks"]["gd_geo"]["lm_eval"]["num_fewshot"] == 2 and "broken" not in manifest["tasks"]
    assert (out / "report.md").is_file()


def test_interrupted_run_keeps_finished_records(task_dir, tmp_path):
    class Interrupt:
        def prompts(self, items, tokenizer):
            raise KeyboardInterrupt

    stop = Task(name="stop", kind="open", prompt="{q}", items=[{"id": "a", "answer": "x"}], adapter=Interrupt())
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        evaluate({"student": (tiny_qwen3(seed=1), tiny_tokenizer())}, tasks=["lm-eval:gd_arith", stop], out=out,
                 lm_eval_include=[str(task_dir)], progress=False)
    partial = tmp_path / "out.partial"
    assert not out.exists() and (partial / "records" / "student" / "gd_arith.jsonl").is_file()
    assert json.loads((partial / "manifest.json").read_text())["incomplete"] is True


def test_paper_suite_names_and_shots():
    names = {name: entry.num_fewshot for name, entry in suite_entries(["paper"])}
    assert names == {"arc_easy": 0, "arc_challenge": 0, "hellaswag": 0, "winogrande": 0, "mmlu": 5,
                     "ceval-valid": 5, "cmmlu": 0, "bbh_cot_zeroshot": 0, "gsm8k_cot": 4, "ifeval": 0, "humaneval": 0}
    assert len(PAPER_SUITE) == len(names)
    with pytest.raises(UserError, match="no tasks to run.*allow-code-execution"):
        evaluate(["unused"], tasks="lm-eval:humaneval", out="unused", progress=False)


def test_sandbox_runs_code_isolated(tmp_path):
    ok = run_python("import os, sys\nassert 'HF_HUB_OFFLINE' not in os.environ\nprint(os.getcwd())\n")
    assert ok.passed and ok.status == "passed"
    assert run_python("assert 1 == 2").status == "failed"
    slow = run_python("while True:\n    pass\n", timeout=1.0)
    assert slow.status == "timeout" and not slow.passed
    if "network namespace" in isolation():  # only loopback, and it is down
        probe = run_python("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=2)\n")
        assert "Network is unreachable" in probe.output or "unreachable" in probe.output.lower()


def test_humaneval_judge_executes_tests():
    doc = {"prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"}
    source = CodeSource([doc], chat=False)
    item = {"id": "humaneval/0", "meta": {"doc_id": 0}}
    assert source.judge(item, "    return a + b\n")["correct"] is True
    wrong = source.judge(item, "    return a * b\n```\nmore text")
    assert wrong["correct"] is False and wrong["extracted"] == "failed"
    assert source.prompts([item], tiny_tokenizer()) == ["def add(a, b):\n"]


def test_shipped_world_tasks(monkeypatch):
    """The bundled lm_eval_tasks (the GPU demo world's QA as lm-eval tasks) build from the repository root; the open
    task's regex filter takes the teacher's "Lyon." as "Lyon"."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    (mc, open_qa), _ = build_lm_eval_tasks(["lm-eval:world_lm_mc", "lm-eval:world_lm_open"],
                                           include=[BUNDLED / "lm_eval_tasks"], limit=3)
    assert (mc.kind, open_qa.kind, len(mc.items), open_qa.max_new_tokens) == ("multiple_choice", "open", 3, 24)
    prompt = mc.adapter.prompts(mc.items[:1], tiny_tokenizer())[0]
    assert "D. " + mc.items[0]["choices"][3] in prompt
    item = open_qa.items[0]
    assert open_qa.adapter.judge(item, f"{item['answer']}.")["correct"] is True
    assert open_qa.adapter.judge(item, "Somewhere else.")["correct"] is False


def test_lm_eval_yaml_path(task_dir):
    """`lm-eval:path/to/task.yaml` loads that file, without indexing lm-eval's registry."""
    (task,), _ = build_lm_eval_tasks([f"lm-eval:{task_dir / 'arith.yaml'}"], limit=2)
    assert task.name == "gd_arith" and len(task.items) == 2


def test_cli_lm_eval_tasks_and_refusal(task_dir, tmp_path, capsys):
    """The CLI: --lm-eval-include and lm-eval: tasks run; a code task without --allow-code-execution is refused and
    listed; a hub id that is neither cached nor reachable is an error before any task is scored."""
    from gendistill.cli import main as cli

    model_dir = tmp_path / "student"
    tiny_qwen3(seed=2).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    assert cli(["eval", "--model", str(model_dir), "--tasks", "lm-eval:gd_arith,lm-eval:humaneval",
                "--lm-eval-include", str(task_dir), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "not run: humaneval" in printed and (out / "records" / "student" / "gd_arith.jsonl").is_file()
    assert cli(["eval", "--model", str(model_dir), "--teacher", "gendistill-test/not-a-model", "--tasks",
                "lm-eval:gd_arith", "--lm-eval-include", str(task_dir), "--out", str(tmp_path / "o2")]) == 2
    assert "gendistill-test/not-a-model" in capsys.readouterr().err and not (tmp_path / "o2").exists()
