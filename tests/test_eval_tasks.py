"""Task specs: loading, validation messages, rendering as lm-eval renders, task lists."""
import json

import pytest

from gendistill.evaluation.tasks import build_context, load_task, parse_task_list, target_delimiter
from gendistill.io import UserError
from gendistill.testing import tiny_tokenizer


def write_task(tmp_path, spec: str, items: list[dict], fewshot: list[dict] | None = None):
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    if fewshot:
        (tmp_path / "shots.jsonl").write_text("".join(json.dumps(i) + "\n" for i in fewshot))
    (tmp_path / "task.yaml").write_text(spec)
    return tmp_path / "task.yaml"


MC = 'name: geo\nkind: multiple_choice\ndata: items.jsonl\nprompt: "Q: {question}\\n{choices}Answer:"\n'
ITEM = {"id": "a", "question": "Where?", "choices": ["Lyon", "Basel"], "answer": 1}


def test_load_and_render(tmp_path):
    shot = {"id": "s", "question": "Who?", "choices": ["Ann", "Bo"], "answer": 0}
    path = write_task(tmp_path, MC + "num_fewshot: 1\nfewshot_data: shots.jsonl\nchat_template: false\n",
                      [ITEM], [shot])
    task = load_task(path)
    assert (task.extract, task.ll_target, task.max_new_tokens) == ("letter", "letter", 16)
    tok = tiny_tokenizer()
    assert build_context(task, ITEM, tok) == "Q: Who?\nA. Ann\nB. Bo\nAnswer: A\n\nQ: Where?\nA. Lyon\nB. Basel\nAnswer:"
    assert target_delimiter(task, tok) == " "
    task.chat_template = True
    chat = build_context(task, ITEM, tok)
    assert chat == ("<|im_start|>user\nQ: Who?\nA. Ann\nB. Bo\nAnswer:<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
                    "<|im_start|>user\nQ: Where?\nA. Lyon\nB. Basel\nAnswer:<|im_end|>\n<|im_start|>assistant\n")
    assert target_delimiter(task, tok) == ""
    # without {choices} in the prompt LL ranks the option texts (as lm-eval's ARC), generation extracts them
    text_task = load_task(write_task(tmp_path, MC.replace("\\n{choices}", ""), [ITEM]))
    assert (text_task.ll_target, text_task.extract) == ("text", "choice_text")


@pytest.mark.parametrize("spec, items, message", [
    (MC, [{**ITEM, "answer": 2}], "'answer' must be an index into choices"),
    (MC, [{**ITEM, "choices": ["only"]}], "at least 2 strings"),
    (MC, [ITEM, ITEM], "duplicate id"),
    (MC, [{k: v for k, v in ITEM.items() if k != "id"}], "non-empty string 'id'"),
    (MC.replace("{question}", "{context}"), [ITEM], "placeholder 'context'"),
    (MC + "extract: guess\n", [ITEM], "extract must be one of"),
    (MC + "extract: regex\nregex: 'no group'\n", [ITEM], "capture group"),
    (MC + "num_fewshot: 2\n", [ITEM], "num_fewshot=2"),
    (MC + "colour: red\n", [ITEM], "unknown keys ['colour']"),
    (MC.replace("kind: multiple_choice", "kind: essay"), [ITEM], "kind must be one of"),
    (MC.replace("name: geo", "name: geo/world"), [ITEM], "becomes a file name"),
])
def test_validation_errors(tmp_path, spec, items, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        load_task(write_task(tmp_path, spec, items))


def test_task_list_parsing():
    assert parse_task_list("a.yaml,niah_single@1k,4k,tasks/,assoc_recall@2048") == [
        "a.yaml", ("niah_single", [1024, 4096]), "tasks/", ("assoc_recall", [2048])]
    with pytest.raises(UserError, match="unknown recall task"):
        parse_task_list("niah@1k")
    with pytest.raises(UserError, match="needs context lengths"):
        parse_task_list("niah_multikey")
    with pytest.raises(UserError, match="bad context length"):
        parse_task_list("niah_single@lots")
