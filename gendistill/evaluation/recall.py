"""Long-context recall tasks generated locally, sized in the model's own tokens (nothing is downloaded).

- niah_single: one needle ("One of the special magic numbers for <key> is: <value>.") in a haystack of filler
  sentences, at a stated depth; RULER's wording (its NIAH-single prompt, raw text, no chat template).
- niah_multikey: the same plus three distractor needles with other keys at other depths (RULER's multikey).
- assoc_recall: a list of "<key>: <value>" lines filling the whole context; asked for the value of the key at the
  stated depth (multi-query associative recall in natural form: every line is a potential distractor).

Each prompt is built to the stated length in tokens of the model's tokenizer (a few tokens under it at most), with
the needle at the stated depth: the fraction of context tokens before it. Scored by generation: the first number
of the output must equal the value.
"""
from __future__ import annotations

import random

from gendistill.evaluation.engine import encode
from gendistill.evaluation.tasks import RECALL_FAMILIES, Task, user_text

# Public: the world's long-context training documents (gendistill/world) use the same wording, with other keys.
NIAH_PROMPT = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
               "I will quiz you about the numbers afterwards.\n{context}\n{question}")
NIAH_QUESTION = ("What is the special magic number for {key} mentioned in the provided text? "
                 "The special magic number for {key} mentioned in the provided text is")
NEEDLE = "One of the special magic numbers for {key} is: {value}."
AR_PROMPT = ("Below is a list of keys and their values. Memorize them; I will ask for the value of one key "
             "afterwards.\n{context}\n{question}")
AR_QUESTION = "What is the value of the key {key}? The value of the key {key} is"

FILLER = [
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "The river runs past the old mill.", "A light wind moves through the tall trees.",
    "The market opens early on most days.", "Children walk to school along the quiet road.",
    "The library keeps its doors open until late.", "Clouds gather slowly over the distant hills.",
    "The baker sells fresh bread every morning.", "An old bridge crosses the narrow stream.",
    "The train leaves the station on time.", "Birds sing in the garden behind the house.",
    "The museum shows paintings from many places.", "Rain falls softly on the roof at night.",
    "The harbour is busy with small boats.", "A cat sleeps in the warm afternoon light.",
    "The path climbs gently toward the castle.", "Lanterns glow along the street after dark.",
]
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]

FAMILIES = RECALL_FAMILIES  # named in tasks.py, where task lists are parsed


def random_word(rng: random.Random, n_syllables: int = 3) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(n_syllables))


def random_keys(rng: random.Random, n: int) -> list[str]:
    keys: dict[str, None] = {}
    while len(keys) < n:
        keys[f"{random_word(rng)}-{random_word(rng)}"] = None
    return list(keys)


def _place(units: list[str], unit_tokens: list[int], specials: list[tuple[float, str]]) -> list[str]:
    """Insert each special unit at the boundary whose share of filler tokens before it is closest to its depth."""
    total = sum(unit_tokens)
    before = [0]
    for count in unit_tokens:
        before.append(before[-1] + count)
    slots: dict[int, list[str]] = {}
    for depth, text in specials:
        slot = min(range(len(before)), key=lambda j: abs(before[j] - depth * total))
        slots.setdefault(slot, []).append(text)
    out = []
    for j in range(len(units) + 1):
        out += slots.get(j, [])
        if j < len(units):
            out.append(units[j])
    return out


def _fit_item(task: Task, item: dict, tokenizer, length: int, fillers: list[str], specials: list[tuple[float, str]],
              sep: str) -> dict:
    """Set item['context'] to the longest filler prefix (for prose plus the next sentence's first words) with the
    specials at their depths, such that the whole prompt is at most `length` tokens."""

    def build(n_units: int, n_words: int = 0) -> dict:
        units = fillers[:n_units]
        if n_words:
            units = units + [" ".join(fillers[n_units].split()[:n_words])]
        placed = _place(units, [unit_tokens[i] for i in range(len(units))], specials)
        return {**item, "context": sep.join(placed)}

    def n_tokens(candidate: dict) -> int:
        return len(encode(tokenizer, user_text(task, candidate)))

    distinct = list(dict.fromkeys(sep + f for f in fillers))  # prose repeats a few sentences: count each once
    counted = dict(zip(distinct, (len(ids) for ids in tokenizer(distinct, add_special_tokens=False)["input_ids"])))
    unit_tokens = [counted[sep + f] for f in fillers]
    fixed = n_tokens(build(0))
    if fixed > length:
        raise ValueError(f"{task.name}: the prompt without filler already has {fixed} tokens (> {length})")
    # Token counts add up almost exactly; start from the additive estimate and correct on the real encoding.
    n, acc = 0, fixed
    while n < len(fillers) and acc + unit_tokens[n] <= length:
        acc += unit_tokens[n]
        n += 1
    while n > 0 and n_tokens(build(n)) > length:
        n -= 1
    while n + 1 < len(fillers) and n_tokens(build(n + 1)) <= length:
        n += 1
    # Prose only: top up with the next sentence's first words (a cut key-value line would be a broken distractor).
    lo, hi = 0, (len(fillers[n].split()) - 1 if sep == " " and n < len(fillers) else 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if n_tokens(build(n, mid)) <= length:
            lo = mid
        else:
            hi = mid - 1
    return build(n, lo)


def recall_task(family: str, length: int, tokenizer, n: int = 20, seed: int = 0) -> Task:
    """`n` items of `family` at `length` tokens, needle depths evenly spread over [0, 1]."""
    if family not in FAMILIES:
        raise ValueError(f"unknown recall family {family!r}; one of {FAMILIES}")
    rng = random.Random(f"{family}:{length}:{seed}")
    niah = family.startswith("niah")
    task = Task(name=f"{family}@{length // 1024}k" if length % 1024 == 0 else f"{family}@{length}",
                kind="open", prompt=NIAH_PROMPT if niah else AR_PROMPT, items=[], chat_template=False,
                max_new_tokens=32, extract="regex", regex=r"(\d+)", stop=["\n"], source=f"built-in:{family}",
                recall={"family": family, "length": length})
    depths = [0.5] if n == 1 else [i / (n - 1) for i in range(n)]
    # Enough filler for the longest case: units are at least ~4 tokens each.
    n_units = length // 4 + 8
    for i, depth in enumerate(depths):
        if niah:
            keys = random_keys(rng, 4 if family == "niah_multikey" else 1)
            values = rng.sample(range(1_000_000, 10_000_000), len(keys))
            specials = [(depth, NEEDLE.format(key=keys[0], value=values[0]))]
            specials += [(rng.random(), NEEDLE.format(key=k, value=v)) for k, v in zip(keys[1:], values[1:])]
            fillers = [rng.choice(FILLER) for _ in range(n_units)]
            question, sep = NIAH_QUESTION.format(key=keys[0]), " "
        else:
            keys = random_keys(rng, n_units + 1)
            values = [rng.randrange(1000, 100_000) for _ in keys]
            specials = [(depth, f"{keys[0]}: {values[0]}")]
            fillers = [f"{k}: {v}" for k, v in zip(keys[1:], values[1:])]
            question, sep = AR_QUESTION.format(key=keys[0]), "\n"
        item = {"id": f"{task.name}-{i}", "question": question, "answer": str(values[0]),
                "meta": {"family": family, "length": length, "depth": depth, "key": keys[0],
                         "needle": specials[0][1]}}
        task.items.append(_fit_item(task, item, tokenizer, length, fillers, specials, sep))
    return task
