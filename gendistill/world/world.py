"""The synthetic knowledge world: fictional people, their biographies, chat data, eval tasks and a tokenizer.

Everything is drawn from `random.Random` instances seeded by strings derived from the world seed (str seeds are
hashed with SHA-512, so the result does not depend on PYTHONHASHSEED), and nothing iterates over a set: the same
seed gives byte-identical files.

Knowledge-extraction setup in the spirit of Allen-Zhu & Li, "Physics of Language Models 3.1": every person gets
several biographies (varied templates per attribute, shuffled attribute order, full name in every sentence),
half of the people ("seen") also have their Q&A in the chat data, the other half ("extraction") are known only
from their biographies. Each person has a unique surname and the tokenizer makes every name one token, so a tiny
model can bind facts to one key; a value is the same tokens in a biography and at the start of an answer
(`_train_world_tokenizer`). Eval questions use phrasings that never appear in the chat data, for both splits, so
the only difference between the splits is whether the person's Q&A was seen. The training questions are a small
grammar (TRAIN_QUESTIONS) and the eval phrasings are held-out cells of it: the test is whether the teacher answers
a new combination of known question words, not whether it understands words it never saw.

Python: `build_world(seed, n_entities, scale, **preset_changes) -> World` (presets in PRESETS: tiny, cpu, gpu),
`World.save(dir)`, `load_world(dir) -> World`. CLI: `gendistill world build --out DIR [--seed N] [--entities N]
[--scale ...]`.

Built world directory (`World.save`, written atomically):

    pretrain.jsonl       {"text": biography}, one biography per line, shuffled (all people)
    chat.jsonl           {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}, seen people only:
                         short answers ("Lyon."), full-sentence answers on request, multiple-choice questions in
                         the eval prompt format answered with the option's text
    chat_noisy.jsonl     the same questions, lower quality: wrong values, rambling answers, Q&A as plain text in
                         the user turn, missing assistant turns (kinds listed per line in world.json)
    longctx.jsonl        {"text": document} of exactly preset.long_doc_tokens - 1 tokens (with the trainer's
                         end-of-text token, one training window): retrieval episodes in the recall tasks' wording,
                         conversations and biographies (`_make_long_docs`); only presets with long_docs (gpu, tiny)
    tasks/<task>.yaml    eval task specs (docs/DESIGN.md "Eval task format"), tasks in TASK_NAMES:
    tasks/<task>.jsonl     world_qa_{mc,open}_{seen,extraction}
    tasks/world_qa_{mc,open}_fewshot.jsonl   few-shot examples (seen people held out of the eval items)
    tokenizer/           byte-level BPE trained on the world's text, ChatML template (AutoTokenizer.from_pretrained);
                         a value's first word is the same token after a space and at the start of an answer
    world.json           seed, scale, preset, people with their split, value pools, token counts, noisy kinds
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from gendistill.io import UserError, atomic_dir

FORMAT_VERSION = 3  # 2: MC answered with the option text, value-word tokenizer, question grammar; 3: long documents
ATTRIBUTES = ["birth_date", "birth_city", "university", "field", "employer", "employer_city"]
SPLITS = ["seen", "extraction"]
SEEN_FRACTION = 0.5
LETTERS = "ABCD"
# The prompt of the multiple-choice tasks; the MC conversations in the chat data use it too. The teacher answers with
# the chosen option's text ("Nago Works."), not its letter, and the task specs say so (extract: choice_text,
# ll_target: text: the cloze formulation of lm-eval's ARC/HellaSwag, which OLMES uses for small models). Pointing at an
# option by letter is a skill of its own that the cpu teacher never learned (development probes: 8-layer hidden-128
# teacher, one or three lettered MC questions per seen fact in the chat data, all parameters or attention only: MC at
# chance, 15-28 %, under both log-likelihood and generation, with one favourite letter; the same teacher picks the
# right option text 95 % of the time on seen people).
MC_PROMPT = "Question: {question}\n{choices}Answer:"
OPEN_PROMPT = "{question}"
SENTENCE_REQUEST = "Answer with a full sentence. "


@dataclass(frozen=True)
class Preset:
    n_entities: int
    bios_per_entity: int  # biography augmentation: the knowledge-extraction result needs several per person
    n_syllables: int  # names are built from this many consonant-vowel syllables: fewer -> smaller vocabulary
    n_cities: int
    n_universities: int
    n_fields: int
    n_employers: int
    open_questions_per_fact: int  # distinct training phrasings per (person, attribute) in the chat data
    sentence_answer_prob: float  # chance of an extra "answer with a full sentence" conversation per fact
    eval_entities_per_split: int | None  # cap on people per eval split (all attributes each); None = all
    fewshot_entities: int  # seen people whose facts serve as few-shot examples (kept out of the eval items)
    vocab_size: int
    # Held-out phrasings each fact of the seen split is asked with (at most len(EVAL_QUESTIONS[attr]) = 2; the
    # extraction split always one). Items of one fact share meta.cluster and the report resamples them together: a
    # second phrasing adds how a model's answers vary by phrasing, not a second independent fact.
    eval_phrasings: int = 1
    mc_questions_per_fact: int = 1  # MC conversations per (person, attribute) in the chat data, each its own options
    # Long-context retrieval documents (longctx.jsonl, `_make_long_docs`): how many, and their exact length in tokens
    # once the trainer appends the end-of-text token, which is a long stage's seq_len (a teacher recipe's stage that
    # reads WORLD/longctx.jsonl alone; the bundled ones have none). 0: none.
    long_docs: int = 0
    long_doc_tokens: int = 8192


PRESETS: dict[str, Preset] = {
    # Token counts below are with the world's own tokenizer, seed 0 (world.json "tokens" has them per build).
    # CI: 30 people, ~0.3 s to build; 3.4K pretraining tokens, 8.9K chat tokens, vocabulary 933; three 1K-token
    # long-context documents so that the tests exercise them.
    "tiny": Preset(30, 2, 10, 6, 5, 6, 5, 2, 0.25, None, 2, 1024, long_docs=3, long_doc_tokens=1024),
    # The 2-core CPU demo: 64 people, 320 biographies = 18.0K pretraining tokens (56 each), 1,395 chats = 35.0K
    # tokens (noisy mix 42.8K), vocabulary 1,146 (every first name and surname is one token). An 8-layer
    # hidden-128 Qwen3 (~1.7M parameters) trains at ~5K tokens/s on 2 free cores, i.e. ~600K tokens in two
    # minutes. Development probes (plain AdamW 3e-3, biographies and chats mixed from the start): 60 people,
    # 600 steps of 1K tokens -> facts 60-80 % right inside biographies but chat QA only 10-35 %; 100 people,
    # 800 steps of 2K tokens -> 70-80 % on trained phrasings, ~45 % on held-out ones. Memorising is limited by
    # optimizer steps more than by tokens, so the teacher wants small batches and many steps. Six open questions
    # per fact (of ~30-50 phrasings per attribute) rather than two or three: held-out phrasings 85-90 % -> 93-96 %
    # on the seen people with the same teacher recipe.
    # Eval: both held-out phrasings of every fact of the 28 seen eval people, 336 items per seen task in 168 clusters,
    # and the 32 extraction people's 192 facts once: the demo's noise budget (seen-task intervals within about +-5 pp;
    # gendistill/demo.py).
    "cpu": Preset(64, 5, 16, 16, 10, 12, 12, 6, 0.25, 40, 4, 1536, 2),
    # One GPU: 1,000 people, 6,000 biographies = 0.34M pretraining tokens, 0.55M chat tokens (noisy 0.66M), six open
    # questions per fact as on CPU. With 3,000 people (three questions per fact) the 28-layer teacher's 24M
    # pretraining tokens left its loss at 0.40, and it answered only 49 % of the seen people's questions.
    # Eval: 200 people per split, 1,200 items per task (one phrasing each): +-2.8 pp at worst (50 %), the demo's
    # +-3 pp budget at GPU scale.
    # Three MC conversations per fact instead of one: the 28-layer teacher trained with one answered the seen people's
    # open questions almost always right, but asked the same facts as MC it often answered with a value that was none
    # of the options (it answers from memory, and in the MC format, seen once per fact, its memory was off where in the
    # open format, seen six times, it was not). 1,024 long documents of 8,192 tokens (`_make_long_docs`): a long stage
    # of 8M tokens reads each once.
    "gpu": Preset(1000, 6, 40, 48, 30, 16, 40, 6, 0.25, 200, 8, 6144, mc_questions_per_fact=3, long_docs=1024,
                  long_doc_tokens=8192),
}

# --- vocabulary tables: few words, regular shapes -------------------------------------------------------
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
FIRST_NAME_ENDINGS = {"male": ["n", "r", "k"], "female": ["a", "ia", "ine"]}
LAST_NAME_SUFFIXES = ["son", "berg", "ford", "ley", "mann", "vik"]
CITY_SUFFIXES = ["ton", "burg", "holm", "dale", "port", "mere"]
UNIVERSITY_KINDS = ["University", "Institute", "College"]
EMPLOYER_KINDS = ["Labs", "Systems", "Works", "Group", "Motors", "Foods", "Media", "Bank"]
FIELDS = ["physics", "chemistry", "biology", "history", "law", "medicine", "music", "economics", "mathematics",
          "philosophy", "geology", "linguistics", "architecture", "astronomy", "nursing", "sociology"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
PRONOUNS = {"male": ("He", "His", "his"), "female": ("She", "Her", "her")}

# Biography sentences. {s}: subject (full name or pronoun), {sp}: possessive subject, {pp}: possessive pronoun.
# Every sentence starts with the subject. The templates also use the words questions ask with ("day", "town",
# "school", "subject", "company", "city"): words the biographies never use keep untrained embeddings through
# pretraining, and the chat SFT (which leaves the embeddings alone, recipes/demo/teacher-*.yaml) then has a hard time
# telling "On which day was X born?" from "In which town was X born?".
BIO_TEMPLATES: dict[str, list[str]] = {
    "birth_date": ["{s} was born on {v}.", "{s} came into the world on {v}.", "{sp} date of birth is {v}.",
                   "{sp} birthday is {v}.", "{s} entered life on {v}.", "{sp} day of birth was {v}.",
                   "{s} was born on the day of {v}."],
    "birth_city": ["{s} was born in {v}.", "{sp} place of birth is {v}.", "{s} comes from {v}.",
                   "{s} spent {pp} childhood in {v}.", "{sp} birthplace is {v}.", "{s} was born in the city of {v}.",
                   "{s} grew up in the town of {v}."],
    "university": ["{s} studied at {v}.", "{s} attended {v}.", "{s} graduated from {v}.",
                   "{s} received {pp} degree from {v}.", "{sp} university was {v}.", "{s} went to school at {v}.",
                   "{sp} college was {v}."],
    "field": ["{s} studied {v}.", "{s} majored in {v}.", "{sp} field of study was {v}.",
              "{s} earned a degree in {v}.", "{s} chose {v} as {pp} major.", "{sp} subject was {v}.",
              "{s} took {v} as {pp} subject."],
    "employer": ["{s} works for {v}.", "{s} is employed by {v}.", "{s} has a job at {v}.",
                 "{sp} employer is {v}.", "{s} joined the staff of {v}.", "{sp} company is {v}.",
                 "{s} works at the company {v}."],
    "employer_city": ["{s} works in {v}.", "{sp} office is in {v}.", "{s} goes to work in {v}.",
                      "{sp} workplace is located in {v}.", "{s} is based in {v} for work.",
                      "{s} works in the city of {v}.", "{sp} office is in the town of {v}."],
}

# Question phrasings. TRAIN ones appear in the chat data; EVAL ones only in the eval tasks (held out, never trained).
# A tiny model only answers a paraphrase it never saw if the training questions vary enough for it to key on the
# words that name the attribute ("day", "school", "company", "work ... city") rather than on whole sentences: with
# six fixed phrasings per attribute the cpu teacher answered some held-out ones with the wrong attribute (mostly the
# birth city). So the training questions are a small grammar -- noun questions ("What is {n}'s {noun}?") over every
# noun of an attribute, and wh-questions whose {w}/{W} (which/what) and {x} (the noun after it) slots are filled in
# every way -- and the cells of it that are eval phrasings are dropped: those stay held out.
ATTRIBUTE_NOUNS: dict[str, list[str]] = {
    "birth_date": ["birth date", "date of birth", "birthday", "day of birth"],
    "birth_city": ["birthplace", "birth city", "city of birth", "place of birth", "home town"],
    "university": ["university", "school", "college", "alma mater"],
    "field": ["field of study", "major", "subject", "field"],
    "employer": ["employer", "company", "firm"],
    "employer_city": ["work city", "city of work", "office city", "workplace city"],
}
NOUN_FRAMES = ["What is the {a} of {n}?", "What is {n}'s {a}?", "Tell me the {a} of {n}.", "Tell me {n}'s {a}.",
               "Name the {a} of {n}.", "Do you know the {a} of {n}?"]
WH_NOUNS: dict[str, list[str]] = {"birth_date": ["date", "day"], "birth_city": ["city", "town"],
                                  "university": ["university", "school", "college"], "field": ["field", "subject"],
                                  "employer": ["company", "firm"], "employer_city": ["city", "town"]}
WH_QUESTIONS: dict[str, list[str]] = {
    "birth_date": ["When was {n} born?", "When is {n}'s birthday?", "When did {n} come into the world?",
                   "{W} {x} was {n} born on?", "On {w} {x} was {n} born?"],
    "birth_city": ["Where was {n} born?", "Where is {n} from?", "Where does {n} come from?",
                   "{W} {x} was {n} born in?", "In {w} {x} was {n} born?", "{W} {x} is {n} from?",
                   "{W} {x} does {n} come from?"],
    "university": ["Where did {n} study?", "Where did {n} get a degree?", "Where did {n} go to university?",
                   "{W} {x} did {n} attend?", "{W} {x} did {n} go to?", "{W} {x} did {n} graduate from?",
                   "At {w} {x} did {n} study?"],
    "field": ["What did {n} study?", "What did {n} major in?", "What was {n}'s major?", "{W} {x} did {n} study?",
              "{W} {x} did {n} major in?", "In {w} {x} did {n} earn a degree?"],
    "employer": ["Who does {n} work for?", "Who employs {n}?", "{W} {x} employs {n}?", "{W} {x} does {n} work for?",
                 "{W} {x} is {n} employed by?", "For {w} {x} does {n} work?"],
    "employer_city": ["Where does {n} go to work?", "Where is the office of {n}?", "Where is {n}'s office?",
                      "{W} {x} does {n} work in?", "In {w} {x} does {n} work?", "In {w} {x} is the office of {n}?",
                      "In {w} {x} is {n}'s office?"],
}
EVAL_QUESTIONS: dict[str, list[str]] = {
    "birth_date": ["What is {n}'s date of birth?", "On which day was {n} born?"],
    "birth_city": ["What city was {n} born in?", "Which city is {n} from?"],
    "university": ["At which university did {n} study?", "What school did {n} go to?"],
    "field": ["What subject did {n} major in?", "What is {n}'s field of study?"],
    "employer": ["Who is the employer of {n}?", "Which company is {n} employed by?"],
    "employer_city": ["In what city is {n}'s workplace?", "Which city does {n} work in?"],
}



def _train_questions(attribute: str) -> list[str]:
    phrasings = [q.format(n="{n}", w=w.lower(), W=w, x=x) for q in WH_QUESTIONS[attribute] for w in ("Which", "What")
                 for x in WH_NOUNS[attribute]]
    phrasings += [frame.format(a=noun, n="{n}") for noun in ATTRIBUTE_NOUNS[attribute] for frame in NOUN_FRAMES]
    held_out = set(EVAL_QUESTIONS[attribute])
    return [q for q in dict.fromkeys(phrasings) if q not in held_out]


TRAIN_QUESTIONS: dict[str, list[str]] = {attr: _train_questions(attr) for attr in ATTRIBUTES}

# Filler for the noisy mix's rambling answers.
RAMBLE_OPENERS = ["That is a good question.", "Let me think about this for a moment.", "Thanks for asking!",
                  "Well, I have heard a lot about {n} over the years.", "Hmm, this one is not so easy."]
RAMBLE_CLOSERS = ["I hope this helps, and let me know if you have more questions.",
                  "Of course, I could be wrong about this.", "There is a lot more one could say about {n}.",
                  "People often ask me about this, and the answer is always interesting."]
NOISE_KINDS = ["clean", "wrong_value", "ramble", "plain_text", "no_assistant"]
NOISE_WEIGHTS = [0.45, 0.2, 0.15, 0.1, 0.1]

TASK_NAMES = [f"world_qa_{kind}_{split}" for kind in ("mc", "open") for split in SPLITS]


@dataclass
class Person:
    id: str
    name: str
    gender: str
    split: str  # "seen" | "extraction"
    birth_date: str
    birth_city: str
    university: str
    field: str
    employer: str
    employer_city: str

    def value(self, attribute: str) -> str:
        return getattr(self, attribute)


@dataclass
class World:
    seed: int
    scale: str
    preset: Preset
    people: list[Person]
    value_pools: dict[str, list[str]]  # attribute -> the values MC distractors are drawn from
    fewshot_ids: list[str]  # seen people used for few-shot examples only
    pretrain_texts: list[str]
    chats: list[list[dict]]
    noisy_chats: list[list[dict]]
    noisy_kinds: list[str]  # NOISE_KINDS entry per noisy conversation
    task_specs: dict[str, dict]  # task name -> YAML spec
    task_items: dict[str, list[dict]]  # jsonl stem (tasks and few-shot files) -> items
    tokenizer: object  # transformers PreTrainedTokenizerFast
    tokens: dict[str, int] = dataclasses.field(default_factory=dict)  # token counts with the world's tokenizer
    long_docs: list[str] = dataclasses.field(default_factory=list)  # long-context documents (`_make_long_docs`)

    def split(self, name: str) -> list[Person]:
        return [p for p in self.people if p.split == name]

    def person(self, person_id: str) -> Person:
        return next(p for p in self.people if p.id == person_id)

    def summary(self) -> dict:
        return {
            "format": FORMAT_VERSION, "seed": self.seed, "scale": self.scale, "preset": dataclasses.asdict(self.preset),
            "sizes": {
                "people": len(self.people), "seen": len(self.split("seen")),
                "extraction": len(self.split("extraction")), "fewshot_people": len(self.fewshot_ids),
                "pretrain_docs": len(self.pretrain_texts), "chats": len(self.chats), "long_docs": len(self.long_docs),
                "noisy_chats": len(self.noisy_chats),
                "task_items": {name: len(items) for name, items in self.task_items.items()},
                "vocab": len(self.tokenizer) if self.tokenizer is not None else None,
            },
            "tokens": self.tokens,
            "noisy_kind_counts": {k: self.noisy_kinds.count(k) for k in NOISE_KINDS},
        }

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write the world directory (layout in the module docstring) in one atomic rename."""
        out = Path(out)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            _write_jsonl(tmp / "pretrain.jsonl", [{"text": t} for t in self.pretrain_texts])
            _write_jsonl(tmp / "chat.jsonl", [{"messages": m} for m in self.chats])
            _write_jsonl(tmp / "chat_noisy.jsonl", [{"messages": m} for m in self.noisy_chats])
            if self.long_docs:
                _write_jsonl(tmp / "longctx.jsonl", [{"text": t} for t in self.long_docs])
            (tmp / "tasks").mkdir()
            for stem, items in self.task_items.items():
                _write_jsonl(tmp / "tasks" / f"{stem}.jsonl", items)
            for name, spec in self.task_specs.items():
                header = f"# {_TASK_DESCRIPTIONS[name]}\n# Generated by `gendistill world build` (seed {self.seed}).\n"
                # JSON scalars are valid YAML and keep "\n" in the prompt on one readable line.
                body = "".join(f"{key}: {json.dumps(value)}\n" for key, value in spec.items())
                (tmp / "tasks" / f"{name}.yaml").write_text(header + body)
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            meta = self.summary() | {
                "fewshot_ids": self.fewshot_ids,
                "value_pools": self.value_pools,
                "people": [dataclasses.asdict(p) for p in self.people],
                "noisy_kinds": self.noisy_kinds,
            }
            (tmp / "world.json").write_text(json.dumps(meta, indent=1) + "\n")
        return out


_TASK_DESCRIPTIONS = {
    f"world_qa_{kind}_{split}": (
        f"Knowledge QA, {'multiple choice (4 choices from the same attribute)' if kind == 'mc' else 'open generation'},"
        f" {'people whose Q&A was in the chat data' if split == 'seen' else 'people known only from biographies'}"
        f" (held-out question phrasings)."
    )
    for kind in ("mc", "open") for split in SPLITS
}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- building ---------------------------------------------------------------------------------------------

def build_world(seed: int = 0, n_entities: int | None = None, scale: str = "cpu", tokenizer: bool = True,
                **preset_changes) -> World:
    """Generate the world for `seed` at a size preset (`tiny` | `cpu` | `gpu`); `n_entities` overrides its size, and
    `preset_changes` any other `Preset` field (`long_docs=12`, `mc_questions_per_fact=3`).

    `tokenizer=False` skips tokenizer training (and the token counts and the long documents, which are sized in
    tokens) for callers that only need the data."""
    if scale not in PRESETS:
        raise UserError(f"unknown world scale {scale!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[scale]
    if n_entities is not None:
        if n_entities < 8:
            raise UserError(f"--entities must be at least 8 (got {n_entities}): each split needs people for "
                            "few-shot examples and for the eval items")
        preset = dataclasses.replace(preset, n_entities=n_entities)
    unknown = sorted(set(preset_changes) - {f.name for f in dataclasses.fields(Preset)})
    if unknown:
        raise UserError(f"unknown world preset field(s) {', '.join(unknown)}; known: "
                        f"{', '.join(f.name for f in dataclasses.fields(Preset))}")
    preset = dataclasses.replace(preset, **preset_changes)
    if preset.long_docs < 0 or preset.long_doc_tokens < 64 or preset.mc_questions_per_fact < 0:
        raise UserError("long_docs and mc_questions_per_fact must be 0 or more, long_doc_tokens at least 64 "
                        f"(got {preset.long_docs}, {preset.mc_questions_per_fact}, {preset.long_doc_tokens})")

    people, value_pools = _make_people(seed, preset)
    seen = [p for p in people if p.split == "seen"]
    extraction = [p for p in people if p.split == "extraction"]
    # People order is already random; small custom worlds keep at least three quarters of `seen` for eval.
    fewshot_ids = [p.id for p in seen[: min(preset.fewshot_entities, max(1, len(seen) // 4))]]

    bios = _make_biographies(random.Random(f"{seed}/bios"), people, preset.bios_per_entity)
    chats = _make_chats(random.Random(f"{seed}/chat"), seen, value_pools, preset)
    noisy, noisy_kinds = _make_noisy_chats(random.Random(f"{seed}/noisy"), seen, value_pools, preset)
    specs, items = _make_tasks(random.Random(f"{seed}/tasks"), seen, extraction, fewshot_ids, value_pools, preset)

    world = World(seed=seed, scale=scale, preset=preset, people=people, value_pools=value_pools,
                  fewshot_ids=fewshot_ids, pretrain_texts=[b for _, b in bios], chats=[c for _, c in chats],
                  noisy_chats=noisy,
                  noisy_kinds=noisy_kinds, task_specs=specs, task_items=items, tokenizer=None)
    if tokenizer:
        world.tokenizer = _train_world_tokenizer(world)
        # Sized in the world's tokens, so they need the tokenizer (trained without them: the long documents reuse
        # the world's text and the recall tasks' wording, and must not change how names and values are tokenised).
        rendered = _render_chats(world.tokenizer, world.chats)
        world.long_docs = _make_long_docs(random.Random(f"{seed}/long"), world.tokenizer, bios,
                                          [(person, text) for (person, _), text in zip(chats, rendered)], preset)
        world.tokens = _count_tokens(world, rendered)
    return world


def _syllable_word(rng: random.Random, syllables: list[str], n: int, suffix: str = "") -> str:
    return ("".join(rng.choice(syllables) for _ in range(n)) + suffix).capitalize()


def _distinct(rng: random.Random, count: int, make, used: set[str]) -> list[str]:
    """`count` new distinct strings from `make()`, also distinct from everything in `used`."""
    out: list[str] = []
    for _ in range(200 * count + 1000):
        if len(out) == count:
            return out
        word = make()
        if word not in used:
            used.add(word)
            out.append(word)
    raise UserError(f"could not draw {count} distinct names; use fewer entities or a larger --scale")


def _random_date(rng: random.Random) -> str:
    return f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1950, 1999)}"


def _make_people(seed: int, preset: Preset) -> tuple[list[Person], dict[str, list[str]]]:
    rng = random.Random(f"{seed}/people")
    all_syllables = [c + v for c in CONSONANTS for v in VOWELS]
    syllables = sorted(rng.sample(all_syllables, preset.n_syllables))
    used: set[str] = set()

    cities = _distinct(rng, preset.n_cities,
                       lambda: _syllable_word(rng, syllables, 2, rng.choice(CITY_SUFFIXES)), used)
    universities = _distinct(rng, preset.n_universities,
                             lambda: f"{_syllable_word(rng, syllables, 3)} {rng.choice(UNIVERSITY_KINDS)}", used)
    employers = _distinct(rng, preset.n_employers,
                          lambda: f"{_syllable_word(rng, syllables, 2)} {rng.choice(EMPLOYER_KINDS)}", used)
    fields = rng.sample(FIELDS, preset.n_fields)
    # Each employer sits in one city (the employer's city is a function of the employer, a two-hop fact);
    # distinct cities while there are enough, so the employer-city MC has at least four candidates.
    employer_city = dict(zip(employers, rng.sample(cities, len(employers)) if len(employers) <= len(cities)
                             else [rng.choice(cities) for _ in employers]))

    n = preset.n_entities
    # Every person has their own surname (one key a tiny model can bind six facts to); first names repeat.
    n_first = max(6, math.ceil(1.5 * math.sqrt(n)))
    first_names = {g: _distinct(rng, n_first, lambda g=g: _syllable_word(rng, syllables, 2,
                                                                         rng.choice(FIRST_NAME_ENDINGS[g])), used)
                   for g in ("male", "female")}
    surnames = _distinct(rng, n, lambda: _syllable_word(rng, syllables, 2, rng.choice(LAST_NAME_SUFFIXES)), used)

    people: list[Person] = []
    n_seen = round(n * SEEN_FRACTION)
    for i, surname in enumerate(surnames):
        gender = rng.choice(["male", "female"])
        employer = rng.choice(employers)
        people.append(Person(
            id=f"p{i:05d}", name=f"{rng.choice(first_names[gender])} {surname}", gender=gender,
            split="seen" if i < n_seen else "extraction",  # draws are i.i.d., so this split is random
            birth_date=_random_date(rng),
            birth_city=rng.choice(cities), university=rng.choice(universities), field=rng.choice(fields),
            employer=employer, employer_city=employer_city[employer],
        ))
    rng.shuffle(people)  # interleave the splits so list order carries no information

    dates = {p.birth_date for p in people}
    while len(dates) < 4:  # a very small world still needs three distractor dates
        dates.add(_random_date(rng))
    value_pools = {
        "birth_date": sorted(dates),
        "birth_city": sorted(cities),
        "university": sorted(universities),
        "field": sorted(fields),
        "employer": sorted(employers),
        "employer_city": sorted(set(employer_city.values())),
    }
    return people, value_pools


def _bio_sentence(template: str, person: Person, attribute: str, use_name: bool) -> str:
    subject, possessive, pronoun_possessive = PRONOUNS[person.gender]
    if use_name:
        subject, possessive = person.name, f"{person.name}'s"
    return template.format(s=subject, sp=possessive, pp=pronoun_possessive, v=person.value(attribute))


def _make_biographies(rng: random.Random, people: list[Person], per_person: int) -> list[tuple[str, str]]:
    """(person id, biography), shuffled."""
    bios = []
    for person in people:
        for _ in range(per_person):
            order = rng.sample(ATTRIBUTES, len(ATTRIBUTES))  # shuffled attribute order per biography
            # Every sentence names the person (no pronoun subjects): "full name" augmentation is what lets a model
            # answer questions about people it only read biographies of (Physics of LMs 3.1).
            sentences = [_bio_sentence(rng.choice(BIO_TEMPLATES[attr]), person, attr, use_name=True) for attr in order]
            bios.append((person.id, " ".join(sentences)))
    rng.shuffle(bios)
    return bios


def render_choices(choices: list[str]) -> str:
    """The `{choices}` block of the MC prompt, as docs/DESIGN.md defines it: "A. ..\\nB. ..\\n"."""
    return "".join(f"{LETTERS[i]}. {c}\n" for i, c in enumerate(choices))


def _mc_choices(rng: random.Random, answer: str, pool: list[str], position: int) -> list[str]:
    distractors = rng.sample([v for v in pool if v != answer], 3)
    return distractors[:position] + [answer] + distractors[position:]


def _sentence_answer(person: Person, attribute: str) -> str:
    return _bio_sentence(BIO_TEMPLATES[attribute][0], person, attribute, use_name=True)


def _chat(user: str, assistant: str | None) -> list[dict]:
    messages = [{"role": "user", "content": user}]
    if assistant is not None:
        messages.append({"role": "assistant", "content": assistant})
    return messages


def _clean_conversations(rng: random.Random, person: Person, attribute: str, pools: dict[str, list[str]],
                         preset: Preset) -> list[tuple[str, str]]:
    """(user, assistant) pairs about one fact: short answers, maybe a sentence answer, one MC question (answered with
    the option's text)."""
    value = person.value(attribute)
    phrasings = [q.format(n=person.name) for q in TRAIN_QUESTIONS[attribute]]
    pairs = [(q, f"{value}.") for q in rng.sample(phrasings, preset.open_questions_per_fact)]
    if rng.random() < preset.sentence_answer_prob:
        pairs.append((SENTENCE_REQUEST + rng.choice(phrasings), _sentence_answer(person, attribute)))
    for _ in range(preset.mc_questions_per_fact):
        position = rng.randrange(4)
        choices = _mc_choices(rng, value, pools[attribute], position)
        pairs.append((MC_PROMPT.format(question=rng.choice(phrasings), choices=render_choices(choices)),
                      f"{value}."))
    return pairs


def _make_chats(rng: random.Random, seen: list[Person], pools: dict[str, list[str]],
                preset: Preset) -> list[tuple[str, list[dict]]]:
    """(person id, conversation) for every clean conversation, shuffled."""
    chats = [(person.id, _chat(user, answer)) for person in seen for attr in ATTRIBUTES
             for user, answer in _clean_conversations(rng, person, attr, pools, preset)]
    rng.shuffle(chats)
    return chats


def _make_noisy_chats(rng: random.Random, seen: list[Person], pools: dict[str, list[str]],
                      preset: Preset) -> tuple[list, list[str]]:
    """Same people and questions as the clean mix, about as many conversations, most of them degraded."""
    rows: list[tuple[list[dict], str]] = []
    for person in seen:
        for attr in ATTRIBUTES:
            for user, answer in _clean_conversations(rng, person, attr, pools, preset):
                kind = rng.choices(NOISE_KINDS, NOISE_WEIGHTS)[0]
                rows.append((_degrade(rng, kind, person, attr, user, answer, pools), kind))
    rng.shuffle(rows)
    return [r[0] for r in rows], [r[1] for r in rows]


def _degrade(rng: random.Random, kind: str, person: Person, attribute: str, user: str, answer: str,
             pools: dict[str, list[str]]) -> list[dict]:
    value = person.value(attribute)
    is_mc = user.startswith("Question: ")
    if kind == "clean":
        return _chat(user, answer)
    if kind == "wrong_value":
        if is_mc:  # another of the listed options
            options = [line.split(". ", 1)[1] for line in user.splitlines()[1:-1]]
            return _chat(user, f"{rng.choice([o for o in options if o != value])}.")
        wrong = rng.choice([v for v in pools[attribute] if v != value])
        return _chat(user, answer.replace(value, wrong))
    if kind == "ramble":
        opener = " ".join(rng.sample(RAMBLE_OPENERS, 2)).format(n=person.name)
        core = f"the answer is {answer}" if is_mc else _sentence_answer(person, attribute)
        return _chat(user, f"{opener} As far as I know, {core} {rng.choice(RAMBLE_CLOSERS).format(n=person.name)}")
    if kind == "plain_text":  # the answer is in the user turn as raw text: nothing for the assistant to learn
        return _chat(f"{user} {answer}" if is_mc else f"Question: {user}\nAnswer: {answer}", None)
    if kind == "no_assistant":
        return _chat(user, None)
    raise ValueError(kind)


def _make_tasks(rng: random.Random, seen: list[Person], extraction: list[Person], fewshot_ids: list[str],
                pools: dict[str, list[str]], preset: Preset) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    cap = preset.eval_entities_per_split
    eval_people = {
        "seen": [p for p in seen if p.id not in fewshot_ids][:cap],
        "extraction": extraction[:cap],
    }
    specs: dict[str, dict] = {}
    items: dict[str, list[dict]] = {}
    for split, people in eval_people.items():
        phrasings = preset.eval_phrasings if split == "seen" else 1
        facts = [(p, attr, q) for p in people for attr in ATTRIBUTES for q in _eval_phrasings(rng, attr, phrasings)]
        questions = [q.format(n=p.name) for p, _, q in facts]
        # Balanced answer positions: each letter within one of every other, in random order.
        positions = [i % 4 for i in range(len(facts))]
        rng.shuffle(positions)
        for kind in ("mc", "open"):
            name = f"world_qa_{kind}_{split}"
            items[name] = [_item(rng, name, kind, p, attr, q, pos, pools,
                                 phrasing=EVAL_QUESTIONS[attr].index(template) if phrasings > 1 else None)
                           for (p, attr, template), q, pos in zip(facts, questions, positions)]
            specs[name] = _spec(name, kind)
    # Few-shot examples: facts of seen people kept out of the eval items, asked with training phrasings.
    fewshot_people = [p for p in seen if p.id in fewshot_ids]
    for kind in ("mc", "open"):
        stem = f"world_qa_{kind}_fewshot"
        items[stem] = [_item(rng, stem, kind, p, attr, rng.choice(TRAIN_QUESTIONS[attr]).format(n=p.name),
                             rng.randrange(4), pools)
                       for p in fewshot_people for attr in ATTRIBUTES]
        rng.shuffle(items[stem])
    return specs, items


def _eval_phrasings(rng: random.Random, attribute: str, n: int) -> list[str]:
    """The held-out phrasings one fact is asked with: one drawn at random, or the first `n`."""
    if n <= 1:
        return [rng.choice(EVAL_QUESTIONS[attribute])]
    return EVAL_QUESTIONS[attribute][:n]


def _item(rng: random.Random, task: str, kind: str, person: Person, attribute: str, question: str, position: int,
          pools: dict[str, list[str]], phrasing: int | None = None) -> dict:
    value = person.value(attribute)
    suffix = "" if phrasing is None else f"/{phrasing}"
    item = {"id": f"{task}/{person.id}/{attribute}{suffix}", "question": question}
    if kind == "mc":
        item |= {"choices": _mc_choices(rng, value, pools[attribute], position), "answer": position}
    else:
        # The chat data answers "Lyon."; the period is accepted in case the scorer compares literally.
        aliases = [f"{value}."]
        if attribute == "birth_date":
            day, month, year = value.split()
            aliases += [f"{month} {day}, {year}", f"{month} {day}, {year}."]
        item |= {"answer": value, "aliases": aliases}
    # cluster: the fact; items asking one fact in several phrasings are resampled together by the report
    item["meta"] = {"person": person.id, "name": person.name, "attribute": attribute, "split": person.split,
                    "cluster": f"{person.id}/{attribute}"}
    return item


def _spec(name: str, kind: str) -> dict:
    mc = kind == "mc"
    return {
        "name": name,
        "kind": "multiple_choice" if mc else "open",
        "data": f"{name}.jsonl",
        "prompt": MC_PROMPT if mc else OPEN_PROMPT,
        "chat_template": True,
        "num_fewshot": 0,
        "fewshot_data": f"world_qa_{kind}_fewshot.jsonl",
        "max_new_tokens": 12 if mc else 24,
        "extract": "choice_text" if mc else "first_line",
        "regex": None,
    } | ({"ll_target": "text"} if mc else {})  # LL ranks the options' texts, what the teacher answers (MC_PROMPT)


# --- long-context retrieval documents -----------------------------------------------------------------------
# A teacher's long stage reads these so that it finds needles and recalls associations across its whole training
# length (the bundled GPU recipe's did, and wiped the teacher: teacher-gpu.yaml; `world teacher --recipe` adds one).
# Each document is exactly `long_doc_tokens` - 1 tokens, so that with the end-of-text token the trainer appends it
# fills one training window: no window mixes two documents, position ids run 0..L-1, and attention is
# plain causal (no packed-document mask). A document is a run of segments, each ending with a newline:
#   - retrieval episodes in the wording of the recall tasks (gendistill.evaluation.recall: NIAH single, NIAH multikey,
#     associative recall), with keys and values of their own, of log-uniformly drawn lengths from LONG_MIN_EPISODE
#     tokens to the rest of the document (the first from a quarter of the document); the haystack is the recall
#     tasks' filler sentences or the world's biographies; after the first question (the one the recall tasks ask)
#     an episode may ask about further needles;
#   - the chat data's conversations (rendered with the chat template) and biographies between episodes, so that the
#     stage rehearses the QA format and the facts while it trains the attention on retrieval. A document's
#     biographies are never of a person whose conversation it holds: no answer can be copied from the context.
# The last few tokens are a cut-off sentence (the way a document is cut by a window) that makes the length exact.
LONG_EPISODES = ["niah_single", "niah_multikey", "assoc_recall"]
LONG_EPISODE_WEIGHTS = [0.4, 0.3, 0.3]
LONG_MIN_EPISODE = 512  # tokens (a quarter of the document if that is less)
LONG_SHORT_SHARE = (0.05, 0.25)  # conversations and biographies before an episode, as a share of its span
LONG_CHAT_PROB = 0.6  # a short segment is a conversation (else a biography)
# After the question the recall task asks, an episode may ask about further needles of the same context: up to all
# four needles of a multikey episode, up to seven more lines of an associative-recall list (more answers to learn
# from per document; the lines themselves are random, so only the answers can be predicted).
LONG_EXTRA_QUESTIONS = {"niah_multikey": 3, "assoc_recall": 7}
# Words that end a document to its exact length: at least one of them is a single token with any world tokenizer.
_ONE_TOKEN_WORDS = [" the", " is", " in", " of", " was", " and", " at", " on", " his", " her"]


class _TokenCounter:
    """Token counts of text pieces, cached. A document's count is the sum of its pieces' because every piece starts
    where the byte-level pre-tokenizer starts a new word (a space, a newline, a special token or punctuation after a
    word) and merges never cross those boundaries; `_make_long_docs` checks the sum on every finished document."""

    def __init__(self, tokenizer):
        self.backend = tokenizer.backend_tokenizer
        self.cache: dict[str, int] = {}

    def many(self, texts: list[str]) -> list[int]:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for text, enc in zip(missing, self.backend.encode_batch_fast(missing, add_special_tokens=False)):
                self.cache[text] = len(enc.ids)
        return [self.cache[t] for t in texts]

    def __call__(self, text: str) -> int:
        return self.many([text])[0]


class _LongDocBuilder:
    def __init__(self, rng: random.Random, counter: _TokenCounter, bios: list[tuple[str, str]],
                 chats: list[tuple[str, str]], min_episode: int = LONG_MIN_EPISODE,
                 episode_weights: list[float] = LONG_EPISODE_WEIGHTS,
                 short_share: tuple[float, float] = LONG_SHORT_SHARE,
                 extra_questions: dict[str, int] = LONG_EXTRA_QUESTIONS):
        """The layout settings default to the world's (above); bench/retrieval_probe.py makes denser drills."""
        from gendistill.evaluation import recall

        self.rng, self.count, self.recall = rng, counter, recall
        self.min_episode, self.episode_weights = min_episode, episode_weights
        self.short_share, self.extra_questions = short_share, extra_questions
        self.bios, self.chats = bios, chats  # (person id, text)
        # Counted up front in two batches: one call per piece would cost more than the counting itself.
        counter.many([b + "\n" for _, b in bios] + [" " + b for _, b in bios] + [c for _, c in chats])
        counter.many(recall.FILLER + [" " + f for f in recall.FILLER])
        self.finishers = [w for w in _ONE_TOKEN_WORDS if counter(w) == 1]
        if not self.finishers:
            raise RuntimeError("the world tokenizer has none of the one-token words that end a long document")
        head, between = recall.NIAH_PROMPT.split("{context}")
        self.niah = (head, between.replace("{question}", ""), counter(head), counter(between.replace("{question}", "")))
        head, between = recall.AR_PROMPT.split("{context}")
        self.ar = (head, between.replace("{question}", ""), counter(head), counter(between.replace("{question}", "")))
        self.answer_end = counter(".") + counter("\n")

    def _keys(self, n: int) -> list[str]:
        """Keys in the recall tasks' style (two three-syllable words), drawn from this document's own stream."""
        syllables = self.recall.SYLLABLES
        keys: dict[str, None] = {}
        while len(keys) < n:
            s = self.rng.choices(syllables, k=6)
            keys["".join(s[:3]) + "-" + "".join(s[3:])] = None
        return list(keys)

    # -- short segments: conversations and biographies, from disjoint people within a document
    def _short(self, doc: dict, chat: bool) -> str | None:
        for _ in range(20):
            person, text = self.rng.choice(self.chats if chat else self.bios)
            if chat and person not in doc["bio_people"] and person not in doc["chat_people"]:
                doc["chat_people"].add(person)
                return text
            if not chat and person not in doc["chat_people"]:
                doc["bio_people"].add(person)
                return text
        return None

    def _bio_unit(self, doc: dict) -> str:
        return self._short(doc, chat=False) or self.rng.choice(self.recall.FILLER)

    # -- retrieval episodes of at most `budget` tokens: (text, tokens), ("", 0) if none fits
    def _qa(self, template: str, pairs: list[tuple[str, object]]) -> tuple[str, int]:
        """Question lines answered in place ("... is 4821937."), each ending with a newline."""
        questions = [template.format(key=k) for k, _ in pairs]
        answers = [f" {v}" for _, v in pairs]
        text = "".join(f"{q}{a}.\n" for q, a in zip(questions, answers))
        return text, sum(self.count.many(questions + answers)) + len(pairs) * self.answer_end

    def _context_tokens(self, units: list[str], sep: str) -> int:
        return sum(self.count.many(units[:1] + [sep + u for u in units[1:]]))

    def _niah(self, doc: dict, budget: int, multikey: bool) -> tuple[str, int]:
        rng, recall = self.rng, self.recall
        n = 4 if multikey else 1
        keys = self._keys(n)
        values = rng.sample(range(1_000_000, 10_000_000), n)
        needles = [recall.NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        extra = rng.randint(0, self.extra_questions["niah_multikey"]) if multikey else 0
        asked = [0] + rng.sample(range(1, n), extra)
        qa, qa_tokens = self._qa(recall.NIAH_QUESTION, [(keys[i], values[i]) for i in asked])
        head, between, head_tokens, between_tokens = self.niah
        fixed = head_tokens + between_tokens + qa_tokens + sum(self.count.many([" " + x for x in needles]))
        bios = rng.random() < 0.5  # haystack: the world's biographies, or the recall tasks' filler sentences
        units, used = [], 0
        while True:
            unit = self._bio_unit(doc) if bios else rng.choice(recall.FILLER)
            cost = self.count(" " + unit)
            if fixed + used + cost > budget:
                break
            units.append(unit)
            used += cost
        for needle in needles:
            units.insert(rng.randint(0, len(units)), needle)
        while True:  # the first unit has no space before it, which can change its count by a token
            tokens = head_tokens + self._context_tokens(units, " ") + between_tokens + qa_tokens
            if tokens <= budget:
                return head + " ".join(units) + between + qa, tokens
            fillers = [i for i, u in enumerate(units) if u not in needles]
            if not fillers:
                return "", 0
            units.pop(fillers[-1])

    def _assoc(self, budget: int) -> tuple[str, int]:
        rng, recall = self.rng, self.recall
        head, between, head_tokens, between_tokens = self.ar
        depths = [rng.random() for _ in range(1 + rng.randint(0, self.extra_questions["assoc_recall"]))]
        fixed = head_tokens + between_tokens
        keys, values, costs, m, used = [], [], [], 0, 0
        while True:
            if m == len(keys):  # a line is about 17 tokens: draw a few more than fit, then more if they all fit
                taken = set(keys)
                new_keys = [k for k in self._keys(max(8, (budget - fixed - used) // 15)) if k not in taken]
                new_values = [rng.randrange(1000, 100_000) for _ in new_keys]
                costs += self.count.many([("\n" if keys or i else "") + f"{k}: {v}"
                                          for i, (k, v) in enumerate(zip(new_keys, new_values))])
                keys, values = keys + new_keys, values + new_values
            if fixed + used + costs[m] > budget:
                break
            used += costs[m]
            m += 1
        while m > 0:
            asked = list(dict.fromkeys(min(m - 1, int(d * m)) for d in depths))
            qa, qa_tokens = self._qa(recall.AR_QUESTION, [(keys[i], values[i]) for i in asked])
            if fixed + sum(costs[:m]) + qa_tokens <= budget:
                lines = "\n".join(f"{k}: {v}" for k, v in zip(keys[:m], values[:m]))
                return head + lines + between + qa, fixed + sum(costs[:m]) + qa_tokens
            m -= 1
        return "", 0

    # -- a whole document
    def document(self, target: int) -> str:
        rng = self.rng
        doc = {"chat_people": set(), "bio_people": set()}
        min_episode = min(self.min_episode, target // 4)
        parts, used = [], 0

        def add_short(limit: int) -> None:
            nonlocal used
            while True:
                text = self._short(doc, chat=rng.random() < LONG_CHAT_PROB)
                if text is None:
                    return
                text = text if text.endswith("\n") else text + "\n"
                cost = self.count(text)
                if used + cost > limit:
                    return
                parts.append(text)
                used += cost

        while target - used >= min_episode:
            remaining = target - used
            # The first span of a document is at least a quarter of it, so that half the documents hold an
            # episode longer than half of it: needles far from their question are what the stage is for.
            low = min_episode if used else max(min_episode, target // 4)
            span = int(math.exp(rng.uniform(math.log(min(low, remaining)), math.log(remaining))))
            if remaining - span < min_episode:
                span = remaining
            start = used
            short_budget = int(span * rng.uniform(*self.short_share))
            if span - short_budget >= min_episode:
                add_short(start + short_budget)
            budget = start + span - used
            kind = rng.choices(LONG_EPISODES, self.episode_weights)[0]
            if kind == "assoc_recall":
                text, tokens = self._assoc(budget)
            else:
                text, tokens = self._niah(doc, budget, multikey=kind == "niah_multikey")
            if not text:
                break
            parts.append(text)
            used += tokens
        add_short(target)
        # The exact end: the first words of a biography or filler sentence, then one-token words.
        for word in self._bio_unit(doc).split(" "):
            cost = self.count(" " + word)
            if used + cost > target:
                break
            parts.append(" " + word)
            used += cost
        while used < target:
            parts.append(rng.choice(self.finishers))
            used += 1
        return "".join(parts)


def _make_long_docs(rng: random.Random, tokenizer, bios: list[tuple[str, str]], chats: list[tuple[str, str]],
                    preset: Preset) -> list[str]:
    """`preset.long_docs` documents of exactly `preset.long_doc_tokens` - 1 tokens (layout above); `chats` are
    (person id, conversation rendered with the chat template)."""
    if not preset.long_docs:
        return []
    builder = _LongDocBuilder(rng, _TokenCounter(tokenizer), bios, chats)
    target = preset.long_doc_tokens - 1
    docs = [builder.document(target) for _ in range(preset.long_docs)]
    lengths = [len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch_fast(docs, add_special_tokens=False)]
    wrong = [(i, n) for i, n in enumerate(lengths) if n != target]
    if wrong:  # a piece boundary the tokenizer merges across: a bug in the builder, not in anything the user gave
        raise RuntimeError(f"long documents of the wrong length (index, tokens; want {target}): {wrong[:5]}")
    return docs


# --- tokenizer ----------------------------------------------------------------------------------------------

def _tokenizer_corpus(world: World) -> list[str]:
    texts = list(world.pretrain_texts)
    for messages in world.chats + world.noisy_chats:
        texts += [m["content"] for m in messages]
    texts += ["user\nassistant\nsystem\n"] * 10  # role names of the chat template
    return texts


def value_words(value_pools: dict[str, list[str]]) -> list[str]:
    """The first word of every attribute value ("Lyon", "Nago" of "Nago Works", "physics", the day "24")."""
    return sorted({value.split()[0] for values in value_pools.values() for value in values})


def _train_world_tokenizer(world: World):
    """Byte-level BPE with the ChatML template, like `gendistill.tokenizer.train_tokenizer`, with one difference: the
    space before a value's first word is a token of its own, so the value is the same token in a biography
    ("... works for| |Nago| Works.") as at the start of an answer ("<|im_start|>assistant\n|Nago| Works."). With
    plain byte-level BPE these are two unrelated tokens ("ĠNago" and "Nago"), and a tiny model then cannot answer
    questions about people it only read biographies of (cpu world, development probe: 10 % of the extraction
    questions answered while 83 % of the same facts were still completed right inside biographies). It costs one
    token per value mention. Names keep their leading space: questions and biographies both write them after one."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gendistill.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS

    words = "|".join(re.escape(w) for w in sorted(value_words(world.value_pools), key=lambda w: (-len(w), w)))
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(rf" (?=(?:{words})\b)"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=world.preset.vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_tokenizer_corpus(world), trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 bos_token=None, padding_side="left")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _render_chats(tokenizer, chats: list[list[dict]]) -> list[str]:
    """The world tokenizer's chat template applied to each conversation (`render_chatml`: the template is ours)."""
    from gendistill.tokenizer import CHAT_TEMPLATE, render_chatml

    if tokenizer.chat_template != CHAT_TEMPLATE:
        return tokenizer.apply_chat_template(chats, tokenize=False) if chats else []
    return [render_chatml(c) for c in chats]


def _count_tokens(world: World, rendered_chats: list[str]) -> dict[str, int]:
    tok = world.tokenizer

    def count(texts: list[str]) -> int:
        encodings = tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)  # no offsets: faster
        return sum(len(e.ids) for e in encodings)

    return {
        "pretrain": count(world.pretrain_texts),
        "chat": count(rendered_chats),
        "chat_noisy": count(_render_chats(tok, world.noisy_chats)),
        "mean_biography": round(count(world.pretrain_texts) / max(1, len(world.pretrain_texts)), 1),
        "long": len(world.long_docs) * (world.preset.long_doc_tokens - 1),  # each one's length checked as it is made
    }


# --- loading ------------------------------------------------------------------------------------------------

def load_world(path: str | Path) -> World:
    """Read a directory written by `World.save`."""
    from transformers import AutoTokenizer

    path = Path(path)
    meta_path = path / "world.json"
    if not meta_path.exists():
        raise UserError(f"{path} is not a world directory (no world.json); build one with `gendistill world build`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise UserError(f"{meta_path} has format {meta.get('format')}, expected {FORMAT_VERSION}; rebuild the world")
    tasks_dir = path / "tasks"
    specs = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(tasks_dir.glob("*.yaml"))}
    items = {p.stem: _read_jsonl(p) for p in sorted(tasks_dir.glob("*.jsonl"))}
    return World(
        seed=meta["seed"], scale=meta["scale"], preset=Preset(**meta["preset"]),
        people=[Person(**p) for p in meta["people"]], value_pools=meta["value_pools"],
        fewshot_ids=meta["fewshot_ids"],
        pretrain_texts=[r["text"] for r in _read_jsonl(path / "pretrain.jsonl")],
        chats=[r["messages"] for r in _read_jsonl(path / "chat.jsonl")],
        noisy_chats=[r["messages"] for r in _read_jsonl(path / "chat_noisy.jsonl")],
        noisy_kinds=meta["noisy_kinds"], task_specs=specs, task_items=items,
        tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"), tokens=meta["tokens"],
        long_docs=[r["text"] for r in _read_jsonl(path / "longctx.jsonl")] if (path / "longctx.jsonl").exists() else [],
    )
