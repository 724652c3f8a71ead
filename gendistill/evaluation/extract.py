"""Answer extraction from generated text, and exact-match scoring.

Rules are ordered from most to least explicit, so a stated final answer ("The answer is (B).") wins over letters
that merely appear, and a refusal ("I don't know") is no answer rather than whatever letter it happens to contain.
"""
from __future__ import annotations

import re
import string

from gendistill.evaluation.tasks import LETTERS, Task

_REFUSAL = re.compile(
    r"\b(i\s+(?:do\s+not|don't|cannot|can't|am\s+not\s+able|'m\s+not\s+able|am\s+unable|'m\s+unable|"
    r"am\s+not\s+sure|'m\s+not\s+sure|have\s+no\s+idea)|unable\s+to\s+(?:answer|determine|tell)|"
    r"cannot\s+(?:be\s+)?(?:answer|determine)|not\s+enough\s+information|none\s+of\s+the\s+(?:above|options|choices))",
    re.IGNORECASE,
)
# "answer is (B)", "Answer: B", "answer is option C", "\boxed{D}"; the letter itself must be a capital.
_EXPLICIT_LETTER = re.compile(
    r"(?i:answer)\s*(?:(?i:is)|:|=)?\s*(?:(?i:option|choice)\s*)?[:\-]?\s*[\(\[*]*\s*([A-Z])\s*[\)\]*]*(?![A-Za-z])"
    r"|\\boxed\{\s*([A-Z])\s*\}"
)
# A letter at the very start, alone or with punctuation: "B", "B.", "(B)", "B) Lyon", "B: Lyon" (not "A good...").
_LEADING_LETTER = re.compile(r"^\s*[\(\[*]*[ \t]*([A-Z])[ \t]*(?:[\)\]*.:,\n]|$)")
# A letter marked as one anywhere: "(B)", "option B", "choice B".
_MARKED_LETTER = re.compile(r"\(([A-Z])\)|\b(?i:option|choice)\s+([A-Z])\b")
_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_EXPLICIT_NUMBER = re.compile(r"(?i:answer)\s*(?:(?i:is)|:|=)?\s*[:\-]?\s*(" + _NUMBER + r")|####\s*(" + _NUMBER
                              + r")|\\boxed\{\s*(" + _NUMBER + r")\s*\}")
_ANY_NUMBER = re.compile(_NUMBER)
_ANSWER_PREFIX = re.compile(r"^\s*(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*", re.IGNORECASE)


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text))


def _last_group(matches) -> str | None:
    found = None
    for match in matches:
        found = next(g for g in match.groups() if g is not None)
    return found


def extract_letter(text: str, choices: list[str]) -> int | None:
    """Index of the chosen option, or None (no answer, refusal, or ambiguous)."""
    valid = LETTERS[: len(choices)]
    explicit = [m for m in _EXPLICIT_LETTER.finditer(text) if (m.group(1) or m.group(2)) in valid]
    if explicit:  # the last stated answer: chain-of-thought may mention others first
        return valid.index(_last_group(explicit))
    if is_refusal(text):
        return None
    leading = _LEADING_LETTER.match(text)
    if leading and leading.group(1) in valid:
        return valid.index(leading.group(1))
    marked = {g for m in _MARKED_LETTER.finditer(text) for g in m.groups() if g is not None and g in valid}
    if len(marked) == 1:
        return valid.index(marked.pop())
    return match_choice_text(text, choices)


def _norm(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def match_choice_text(text: str, choices: list[str]) -> int | None:
    """The choice whose text the output gives: equal after normalisation, else the only one contained in it
    (or the longest, when it contains all the others: "Lyon, France" over "Lyon")."""
    out = _norm(text)
    normed = [_norm(c) for c in choices]
    equal = [i for i, c in enumerate(normed) if c and c == out]
    if len(equal) == 1:
        return equal[0]
    inside = [i for i, c in enumerate(normed) if c and re.search(rf"(?<!\w){re.escape(c)}(?!\w)", out)]
    if len(inside) == 1:
        return inside[0]
    if inside:
        longest = max(inside, key=lambda i: len(normed[i]))
        if all(normed[i] in normed[longest] for i in inside):
            return longest
    return None


def extract_choice(text: str, choices: list[str]) -> int | None:
    """choice_text extraction: the option's text first, then the letter rules (models often answer "B")."""
    if is_refusal(text) and not _EXPLICIT_LETTER.search(text):
        return None
    found = match_choice_text(text, choices)
    return found if found is not None else extract_letter(text, choices)


def normalize_number(text: str) -> str | None:
    text = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_number(text: str) -> str | None:
    """A stated answer ("answer is 42", "#### 42", "\\boxed{42}"), else the last number in the text."""
    explicit = list(_EXPLICIT_NUMBER.finditer(text))
    if explicit:
        return normalize_number(_last_group(explicit))
    numbers = _ANY_NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def extract_first_line(text: str) -> str | None:
    for line in text.splitlines():
        line = _ANSWER_PREFIX.sub("", line).strip()
        if line:
            return line
    return None


def extract_answer(task: Task, item: dict, text: str) -> int | str | None:
    """What the model answered: an option index for multiple choice, a string for open items, None if nothing."""
    if task.extract == "letter":
        return extract_letter(text, item["choices"])
    if task.extract == "choice_text":
        return extract_choice(text, item["choices"])
    if task.extract == "number":
        found = extract_number(text)
    elif task.extract == "regex":
        match = re.search(task.regex, text)
        found = match.group(1).strip() if match and match.group(1) is not None else None
    else:
        found = extract_first_line(text)
    if task.is_mc and found is not None:  # an open-style extraction on a multiple-choice item: map to an option
        if found in LETTERS[: len(item["choices"])]:
            return LETTERS.index(found)
        return match_choice_text(found, item["choices"])
    return found


def is_correct(task: Task, item: dict, extracted: int | str | None) -> bool:
    """Exact match: the option index for multiple choice; numeric equality for numbers; otherwise the answer or an
    alias equal after SQuAD-style normalisation (case, punctuation, articles, spaces)."""
    if extracted is None:
        return False
    if task.is_mc:
        return extracted == item["answer"]
    golds = [str(item["answer"])] + [str(a) for a in item.get("aliases") or []]
    if task.extract == "number":
        value = normalize_number(str(extracted))
        return value is not None and any(normalize_number(g) == value for g in golds)
    return any(_norm(str(extracted)) == _norm(g) for g in golds)
