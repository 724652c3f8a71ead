"""Answer extraction and exact match on crafted outputs."""
import pytest

from gendistill.evaluation.extract import extract_answer, extract_letter, extract_number, is_correct
from gendistill.evaluation.tasks import Task

CHOICES = ["Lyon", "Basel", "Zurich", "Geneva"]


@pytest.mark.parametrize("text, expected", [
    ("B", 1), ("B.", 1), ("(C)", 2), ("D) Geneva", 3), ("A: Lyon", 0), ("  c", None),
    ("The answer is (B).", 1), ("The answer is B", 1), ("Answer: D", 3), ("answer: (c)", None),
    ("The answer is option C.", 2), ("\\boxed{D}", 3),
    # the last stated answer wins over letters mentioned on the way
    ("A looks tempting, but B is wrong too. The answer is (C).", 2),
    ("Let me think. Option A is Lyon. Answer: D", 3),
    # "A" as an article is not a letter answer
    ("A good question. I think it is Zurich.", 2),
    ("A city in France.", None),
    # refusals are no answer, even when they mention a letter
    ("I don't know.", None), ("I cannot answer this; maybe A?", None), ("I'm not sure between (A) and (B).", None),
    ("None of the above.", None),
    # a letter outside the options, or several marked letters, is no answer
    ("E", None), ("Either (A) or (B).", None),
    # the option's text is an answer too
    ("It is Basel.", 1), ("geneva", 3), ("", None),
])
def test_letter_extraction(text, expected):
    assert extract_letter(text, CHOICES) == expected


@pytest.mark.parametrize("text, expected", [
    ("42", "42"), ("The answer is 1,234.", "1234"), ("3 apples plus 4 pears make 7.", "7"),
    ("#### 12", "12"), ("so \\boxed{-3.50}", "-3.5"), ("$5.00", "5"), ("no number here", None),
    ("The answer is 8. Check: 2 + 6 = 8, then 9", "8"),
])
def test_number_extraction(text, expected):
    assert extract_number(text) == expected


def _task(**kw) -> Task:
    return Task(name="t", prompt="{question}", items=[], **kw)


def test_extract_kinds_and_exact_match():
    mc = _task(kind="multiple_choice", extract="choice_text")
    item = {"id": "1", "question": "q", "choices": ["Lyon", "Lyon, France", "Basel"], "answer": 1}
    assert extract_answer(mc, item, "Lyon, France.") == 1  # the longer choice containing the shorter one
    assert extract_answer(mc, item, "B") == 1  # falls back to the letter rules
    assert extract_answer(mc, item, "I don't know") is None
    assert is_correct(mc, item, 1) and not is_correct(mc, item, 0) and not is_correct(mc, item, None)

    open_task = _task(kind="open", extract="first_line")
    item = {"id": "2", "question": "q", "answer": "Lyon", "aliases": ["Lyons"]}
    assert extract_answer(open_task, item, "\nAnswer: The Lyon.\nMore text") == "The Lyon."
    assert is_correct(open_task, item, "The Lyon.")  # articles and punctuation ignored
    assert is_correct(open_task, item, "lyons")
    assert not is_correct(open_task, item, "Lyon France")

    regex_task = _task(kind="open", extract="regex", regex=r"code (\w+)")
    assert extract_answer(regex_task, {"answer": "x"}, "the code K7 works") == "K7"
    assert extract_answer(regex_task, {"answer": "x"}, "nothing") is None

    numbers = _task(kind="open", extract="number")
    item = {"id": "3", "question": "q", "answer": "1200"}
    assert is_correct(numbers, item, extract_answer(numbers, item, "It costs $1,200.00 in total."))
    assert not is_correct(numbers, item, extract_answer(numbers, item, "It costs 1201."))
