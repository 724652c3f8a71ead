"""Long-context recall generators: stated length in the model's tokens, needle at the stated depth, answerable."""
import re

import pytest

from gendistill.evaluation.engine import encode
from gendistill.evaluation.recall import recall_task
from gendistill.evaluation.tasks import user_text
from gendistill.testing import tiny_tokenizer


@pytest.mark.parametrize("family", ["niah_single", "niah_multikey", "assoc_recall"])
@pytest.mark.parametrize("length", [1024, 4096])
def test_length_depth_and_answer(family, length):
    tok = tiny_tokenizer()
    task = recall_task(family, length, tok, n=5)
    assert [it["meta"]["depth"] for it in task.items] == [0.0, 0.25, 0.5, 0.75, 1.0]
    for item in task.items:
        prompt = user_text(task, item)
        n_tokens = len(encode(tok, prompt))
        assert length - max(24, length // 100) <= n_tokens <= length, n_tokens
        needle, context = item["meta"]["needle"], item["context"]
        assert context.count(needle) == 1 and item["answer"] in needle and item["meta"]["key"] in item["question"]
        # depth: share of the context's tokens before the needle, other needles (multikey distractors) excluded
        start = prompt.index(context)
        before = prompt[start: prompt.index(needle)]
        distractors = [n for n in re.findall(r"One of the special magic numbers for [\w-]+ is: \d+\.", context)
                       if n != needle]
        assert len(distractors) == (3 if family == "niah_multikey" else 0)
        def tokens(text):
            return len(tok(text, add_special_tokens=False)["input_ids"])
        filler_before = tokens(before) - sum(tokens(" " + d) for d in distractors if d in before)
        filler_total = tokens(context) - tokens(needle) - sum(tokens(" " + d) for d in distractors)
        assert abs(filler_before / filler_total - item["meta"]["depth"]) < 0.02
        if family == "niah_multikey":  # the distractors carry other keys and other values
            assert all(item["meta"]["key"] not in d and item["answer"] not in d for d in distractors)
        if family == "assoc_recall":  # every key appears once, so the question has one answer
            keys = re.findall(r"^([\w-]+): \d+$", context, flags=re.M)
            assert len(keys) == len(set(keys)) and item["meta"]["key"] in keys


def test_deterministic_and_names():
    tok = tiny_tokenizer()
    a, b = recall_task("niah_single", 1024, tok, n=2), recall_task("niah_single", 1024, tok, n=2)
    assert a.items == b.items and a.name == "niah_single@1k"
    assert recall_task("niah_single", 1024, tok, n=2, seed=1).items != a.items
