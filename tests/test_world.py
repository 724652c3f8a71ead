"""The synthetic world: deterministic per seed, splits that don't leak, well-formed tasks, tokenizer, CLI."""
from __future__ import annotations

import collections
import filecmp
import re
from pathlib import Path

import pytest
import yaml

from gendistill.cli import main as cli_main
from gendistill.evaluation import recall
from gendistill.io import UserError
from gendistill.world import ATTRIBUTES, MC_PROMPT, TASK_NAMES, build_world, load_world, render_choices
from gendistill.world.world import EVAL_QUESTIONS, TRAIN_QUESTIONS

DESIGN_SPEC_KEYS = ["name", "kind", "data", "prompt", "chat_template", "num_fewshot", "fewshot_data",
                    "max_new_tokens", "extract", "regex"]


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0, scale="tiny")


@pytest.fixture(scope="module")
def world_dir(world, tmp_path_factory):
    return world.save(tmp_path_factory.mktemp("w") / "world")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _chat_texts(world) -> list[str]:
    return [m["content"] for messages in world.chats + world.noisy_chats for m in messages]


def _mentions(text: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", text) is not None


def test_same_seed_gives_identical_files_and_other_seed_differs(world_dir, tmp_path):
    again = build_world(seed=0, scale="tiny").save(tmp_path / "again")
    assert _files(again) == _files(world_dir)
    expected = ["chat.jsonl", "chat_noisy.jsonl", "longctx.jsonl", "pretrain.jsonl", "world.json"] + \
        [f"tasks/{n}.{ext}" for n in TASK_NAMES for ext in ("jsonl", "yaml")] + \
        [f"tasks/world_qa_{k}_fewshot.jsonl" for k in ("mc", "open")]
    assert set(expected) <= set(_files(world_dir))
    assert any(f.startswith("tokenizer/") for f in _files(world_dir))
    _, mismatch, errors = filecmp.cmpfiles(world_dir, again, _files(world_dir), shallow=False)
    assert mismatch == [] and errors == []

    other = build_world(seed=1, scale="tiny").save(tmp_path / "other")
    for name in ["pretrain.jsonl", "chat.jsonl", "chat_noisy.jsonl", "longctx.jsonl", "world.json",
                 "tasks/world_qa_mc_seen.jsonl"]:
        assert (other / name).read_bytes() != (world_dir / name).read_bytes(), name


def test_people_and_splits(world):
    names = [p.name for p in world.people]
    assert len(world.people) == 30 and len(set(names)) == len(names)
    seen, extraction = world.split("seen"), world.split("extraction")
    assert len(seen) == len(extraction) == 15
    assert set(world.fewshot_ids) <= {p.id for p in seen}
    # The employer's city is a function of the employer.
    city_of = collections.defaultdict(set)
    for p in world.people:
        city_of[p.employer].add(p.employer_city)
    assert all(len(cities) == 1 for cities in city_of.values())
    # Every biography names its person and states all six facts.
    for p in world.people[:5]:
        bios = [t for t in world.pretrain_texts if t.startswith(p.name) or t.startswith(p.name + "'s")]
        assert len(bios) == world.preset.bios_per_entity
        for bio in bios:
            assert bio.count(".") >= len(ATTRIBUTES)
            for attr in ATTRIBUTES:
                assert p.value(attr) in bio, (attr, bio)


def test_chat_data_does_not_leak_eval_entities_or_phrasings(world):
    texts = _chat_texts(world)
    assert texts
    for p in world.split("extraction"):
        assert not any(_mentions(t, p.name) for t in texts), f"extraction person {p.name} appears in chat data"
    for p in world.split("seen"):
        assert any(_mentions(t, p.name) for t in texts), f"seen person {p.name} missing from chat data"
    # Held-out phrasings are disjoint from the training ones, and no eval question text occurs in any chat.
    for attr in ATTRIBUTES:
        assert not set(EVAL_QUESTIONS[attr]) & set(TRAIN_QUESTIONS[attr])
    joined = "\n".join(texts)
    clean = "\n".join(m["content"] for messages in world.chats for m in messages)
    in_clean_chat = {p.name for p in world.people if _mentions(clean, p.name)}
    for name in TASK_NAMES:
        for item in world.task_items[name]:
            assert item["question"] not in joined, item["question"]
            person = world.person(item["meta"]["person"])
            assert person.split == item["meta"]["split"] == name.rsplit("_", 1)[1]
            assert person.id not in world.fewshot_ids  # few-shot people never give away an eval answer
            if person.split == "seen":
                assert person.name in in_clean_chat, person.name
    # Few-shot examples come from seen people only.
    for stem in ("world_qa_mc_fewshot", "world_qa_open_fewshot"):
        assert world.task_items[stem]
        assert all(world.person(i["meta"]["person"]).split == "seen" for i in world.task_items[stem])


def test_clean_chats_answer_correctly_and_noisy_mix_has_each_kind_of_noise(world):
    values = {p.name: p for p in world.people}
    for messages in world.chats:
        assert [m["role"] for m in messages] == ["user", "assistant"]
        user, answer = messages[0]["content"], messages[1]["content"]
        person = next(p for name, p in values.items() if _mentions(user, name))
        if user.startswith("Question: "):  # multiple choice, answered with the text of the option that is true
            lines = dict(line.split(". ", 1) for line in user.splitlines()[1:-1])
            assert set(lines) == set("ABCD")
            assert answer.endswith(".") and answer[:-1] in lines.values()
            assert answer[:-1] in [person.value(a) for a in ATTRIBUTES]
        else:
            assert any(person.value(a) in answer for a in ATTRIBUTES), (user, answer)
    kinds = collections.Counter(world.noisy_kinds)
    assert len(world.noisy_kinds) == len(world.noisy_chats)
    assert set(kinds) == {"clean", "wrong_value", "ramble", "plain_text", "no_assistant"}
    for messages, kind in zip(world.noisy_chats, world.noisy_kinds):
        roles = [m["role"] for m in messages]
        if kind in ("plain_text", "no_assistant"):
            assert roles == ["user"]
        else:
            assert roles == ["user", "assistant"]
        if kind == "ramble":
            assert "As far as I know" in messages[1]["content"] and len(messages[1]["content"].split()) > 15
    # Some noisy answers state a value the person does not have.
    wrong = 0
    for messages, kind in zip(world.noisy_chats, world.noisy_kinds):
        if kind == "wrong_value" and not messages[0]["content"].startswith("Question: "):
            person = next(p for name, p in values.items() if _mentions(messages[0]["content"], name))
            wrong += not any(person.value(a) in messages[1]["content"] for a in ATTRIBUTES)
    assert wrong > 0


def test_mc_items_have_four_distinct_choices_and_balanced_positions(world):
    for split in ("seen", "extraction"):
        items = world.task_items[f"world_qa_mc_{split}"]
        assert len(items) == len({i["id"] for i in items})
        counts = collections.Counter(i["answer"] for i in items)
        assert set(counts) == {0, 1, 2, 3} and max(counts.values()) - min(counts.values()) <= 1, counts
        assert {i["meta"]["attribute"] for i in items} == set(ATTRIBUTES)
        for item in items:
            person = world.person(item["meta"]["person"])
            attr = item["meta"]["attribute"]
            assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
            assert item["choices"][item["answer"]] == person.value(attr)
            assert all(c in world.value_pools[attr] for c in item["choices"])  # same attribute's values
            prompt = MC_PROMPT.format(question=item["question"], choices=render_choices(item["choices"]))
            assert prompt.endswith("D. " + item["choices"][3] + "\nAnswer:")


def test_open_items_and_specs_follow_the_eval_task_format(world, world_dir):
    for split in ("seen", "extraction"):
        for item in world.task_items[f"world_qa_open_{split}"]:
            person = world.person(item["meta"]["person"])
            assert item["answer"] == person.value(item["meta"]["attribute"])
            assert f"{item['answer']}." in item["aliases"]
    tasks = world_dir / "tasks"
    for name in TASK_NAMES:
        spec = yaml.safe_load((tasks / f"{name}.yaml").read_text())
        mc = "_mc_" in name
        # MC: the teacher answers with the option's text, and LL ranks the options' texts (world.MC_PROMPT)
        assert list(spec) == DESIGN_SPEC_KEYS + (["ll_target"] if mc else [])
        assert spec["name"] == name and spec["chat_template"] is True
        assert spec["kind"] == ("multiple_choice" if mc else "open")
        assert spec["extract"] == ("choice_text" if mc else "first_line")
        assert spec.get("ll_target") == ("text" if mc else None)
        assert (tasks / spec["data"]).is_file() and (tasks / spec["fewshot_data"]).is_file()
        for line in (tasks / spec["data"]).read_text().splitlines():
            item = yaml.safe_load(line)  # JSON is YAML
            fields = dict(item, choices=render_choices(item["choices"])) if "choices" in item else item
            assert item["question"] in spec["prompt"].format(**fields)


def test_tokenizer_round_trips_world_text_and_renders_chat_template(world):
    tok = world.tokenizer
    assert len(tok) <= world.preset.vocab_size
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    texts = world.pretrain_texts + _chat_texts(world)
    for text, ids in zip(texts, tok(texts, add_special_tokens=False)["input_ids"]):
        assert tok.decode(ids) == text
    # A small world vocabulary: biographies take few tokens per word.
    bio = world.pretrain_texts[0]
    assert len(tok(bio)["input_ids"]) < 2 * len(bio.split())

    rendered = tok.apply_chat_template(world.chats[0], tokenize=False)
    user, answer = (m["content"] for m in world.chats[0])
    assert rendered == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"
    prompt = tok.apply_chat_template(world.chats[0][:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids.count(tok.eos_token_id) == 2


def test_chatml_rendering_is_the_chat_template(world):
    from gendistill.tokenizer import render_chatml

    chats = world.chats + world.noisy_chats
    assert [render_chatml(c) for c in chats] == world.tokenizer.apply_chat_template(chats, tokenize=False)
    assert render_chatml(chats[0][:1], add_generation_prompt=True) == \
        world.tokenizer.apply_chat_template(chats[0][:1], tokenize=False, add_generation_prompt=True)


def test_load_world_restores_what_was_saved(world, world_dir):
    loaded = load_world(world_dir)
    assert loaded.people == world.people and loaded.preset == world.preset
    assert loaded.pretrain_texts == world.pretrain_texts
    assert loaded.chats == world.chats and loaded.noisy_chats == world.noisy_chats
    assert loaded.task_items == world.task_items and loaded.task_specs == world.task_specs
    assert loaded.tokens == world.tokens and loaded.tokens["pretrain"] > 0
    assert loaded.long_docs == world.long_docs and len(loaded.long_docs) == world.preset.long_docs > 0
    text = world.pretrain_texts[0]
    assert loaded.tokenizer(text)["input_ids"] == world.tokenizer(text)["input_ids"]
    assert loaded.tokenizer.apply_chat_template(world.chats[0], tokenize=False) == \
        world.tokenizer.apply_chat_template(world.chats[0], tokenize=False)


def test_cpu_preset_stays_small_enough_for_the_cpu_teacher():
    world = build_world(seed=0, scale="cpu")
    assert len(world.people) == 64 and len(world.tokenizer) <= 1536
    # One MC conversation per fact and no long documents: what the 5-minute CPU demo's teacher is tuned for.
    assert world.preset.mc_questions_per_fact == 1 and world.long_docs == []
    mc = sum(m[0]["content"].startswith("Question: ") for m in world.chats)
    assert mc == len(world.split("seen")) * len(ATTRIBUTES)
    # The budget stated beside PRESETS; growing it slows the 2-core demo's teacher.
    assert 10_000 < world.tokens["pretrain"] < 25_000, world.tokens
    assert world.tokens["chat"] < 45_000, world.tokens
    # Every name is one token, and surnames are unique: one key per person for a tiny model to bind facts to.
    surnames = [p.name.split()[1] for p in world.people]
    assert len(set(surnames)) == len(surnames)
    for person in world.people:
        for part in person.name.split():
            assert len(world.tokenizer(" " + part)["input_ids"]) == 1, part


def test_values_are_one_token_sequence_wherever_they_occur(world):
    """An answer starts a turn with no space before it; in a biography the same value follows a space. Both must give
    the same tokens, or what the model read is not what it is asked to say."""
    tok = world.tokenizer
    for attr in ATTRIBUTES:
        for value in world.value_pools[attr]:
            alone = tok(value, add_special_tokens=False)["input_ids"]
            after_space = tok("in " + value, add_special_tokens=False)["input_ids"]
            assert after_space[-len(alone):] == alone, (value, tok.convert_ids_to_tokens(after_space))
    # Names keep the usual byte-level form (one token after a space, as in the questions).
    name = world.people[0].name
    assert len(tok(" " + name.split()[1])["input_ids"]) == 1


def test_training_questions_cover_the_attribute_words_and_biographies_use_them(world):
    """The question grammar asks with every attribute noun and the held-out eval phrasings are none of its cells;
    the biographies use the words questions ask with, so their embeddings are trained before the SFT."""
    for attr in ATTRIBUTES:
        assert len(TRAIN_QUESTIONS[attr]) >= 20
        assert all("{n}" in q for q in TRAIN_QUESTIONS[attr] + EVAL_QUESTIONS[attr])
    bios = " ".join(world.pretrain_texts)
    for word in ("day", "town", "city", "school", "subject", "company"):
        assert f" {word} " in bios, word


def test_cli_builds_a_world_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "w"
    assert cli_main(["world", "build", "--out", str(out), "--scale", "tiny", "--seed", "3"]) == 0
    assert {"pretrain.jsonl", "chat.jsonl", "chat_noisy.jsonl", "world.json", "tasks", "tokenizer"} <= \
        {p.name for p in out.iterdir()}
    assert load_world(out).seed == 3
    before = (out / "world.json").read_bytes()
    capsys.readouterr()

    assert cli_main(["world", "build", "--out", str(out), "--scale", "tiny", "--seed", "4"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    assert (out / "world.json").read_bytes() == before

    assert cli_main(["world", "build", "--out", str(out), "--scale", "tiny", "--seed", "4", "--overwrite"]) == 0
    assert load_world(out).seed == 4
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no temporary directories left behind


def test_cli_teacher_refuses_a_directory_that_is_no_world(tmp_path, capsys):
    # Training itself is covered by the demo test (tests/test_demo.py trains the mini teacher through train_teacher).
    assert cli_main(["world", "teacher", "--world", str(tmp_path), "--out", str(tmp_path / "t")]) == 2
    assert "not a world directory" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


# --- long-context documents ---------------------------------------------------------------------------------

_CHAT = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>\n<\|im_start\|>assistant\n(.*?)<\|im_end\|>\n", re.S)
_NIAH = re.compile(re.escape(recall.NIAH_PROMPT.split("{context}")[0]) + r"(.*?)\n(What is the special magic number "
                   r"for (\S+) mentioned in the provided text\? The special magic number for \3 mentioned in the "
                   r"provided text is) (\d+)\.\n", re.S)
_AR = re.compile(re.escape(recall.AR_PROMPT.split("{context}")[0]) + r"(.*?)\n(What is the value of the key (\S+)\? "
                 r"The value of the key \3 is) (\d+)\.\n", re.S)


@pytest.fixture(scope="module")
def long_world():
    return build_world(seed=0, scale="tiny", long_docs=12, long_doc_tokens=2048)


def test_long_documents_are_exactly_one_window_and_deterministic(long_world):
    tok = long_world.tokenizer
    assert len(long_world.long_docs) == 12
    lengths = {len(tok(d, add_special_tokens=False)["input_ids"]) for d in long_world.long_docs}
    assert lengths == {2047}  # + the end-of-text token the trainer appends = one 2048-token window
    assert long_world.tokens["long"] == 12 * 2047
    again = build_world(seed=0, scale="tiny", long_docs=12, long_doc_tokens=2048)
    assert again.long_docs == long_world.long_docs
    assert build_world(seed=1, scale="tiny", long_docs=12, long_doc_tokens=2048).long_docs != long_world.long_docs
    # The long documents come from a stream of their own: everything else is as without them.
    plain = build_world(seed=0, scale="tiny", long_docs=0)
    assert plain.long_docs == [] and plain.chats == long_world.chats
    assert plain.pretrain_texts == long_world.pretrain_texts
    assert plain.tokenizer.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_long_documents_ask_in_the_recall_tasks_words_and_their_answers_are_right(long_world):
    kinds = collections.Counter()
    for doc in long_world.long_docs:
        for match in _NIAH.finditer(doc):
            context, question, key, value = match.groups()
            # The episode up to its first answer is a recall task prompt (recall.py), then " <value>."
            assert match.group(0) == recall.NIAH_PROMPT.format(context=context, question=question) + f" {value}.\n"
            needles = re.findall(rf"One of the special magic numbers for {re.escape(key)} is: (\d+)\.", context)
            assert needles == [value], (key, needles)
            kinds["niah_multikey" if context.count("special magic numbers for") > 1 else "niah_single"] += 1
        for match in _AR.finditer(doc):
            context, question, key, value = match.groups()
            assert match.group(0) == recall.AR_PROMPT.format(context=context, question=question) + f" {value}.\n"
            lines = dict(line.split(": ") for line in context.split("\n"))
            assert lines[key] == value and len(lines) == context.count("\n") + 1  # keys are unique
            kinds["assoc_recall"] += 1
        # Later questions of an episode ask about other needles of the same context.
        for key, value in re.findall(r"\.\nWhat is the special magic number for (\S+) mentioned in the provided "
                                     r"text\? The special magic number for \S+ mentioned in the provided text is "
                                     r"(\d+)\.", doc):
            assert f"One of the special magic numbers for {key} is: {value}." in doc
    assert set(kinds) == {"niah_single", "niah_multikey", "assoc_recall"}, kinds


def test_long_documents_rehearse_chats_and_biographies_without_giving_answers_away(long_world):
    bios, chats = set(long_world.pretrain_texts), {tuple(m["content"] for m in c) for c in long_world.chats}
    seen_in_chats = 0
    for doc in long_world.long_docs:
        asked = _CHAT.findall(doc)
        assert all(pair in chats for pair in asked)
        seen_in_chats += len(asked)
        rest = _CHAT.sub("", doc)
        for user, _ in asked:
            person = next(p for p in long_world.people if _mentions(user, p.name))
            assert not _mentions(rest, person.name), f"{person.name}: a biography in the same document as the question"
        assert len({u for u, _ in asked}) == len(asked)
    assert seen_in_chats > 12
    assert sum(bio in doc for doc in long_world.long_docs for bio in bios) > 12


def test_more_mc_conversations_per_fact_each_with_its_own_options():
    world = build_world(seed=0, scale="tiny", mc_questions_per_fact=3, long_docs=0)
    mc = [m for m in world.chats if m[0]["content"].startswith("Question: ")]
    assert len(mc) == 3 * len(world.split("seen")) * len(ATTRIBUTES)
    assert len({m[0]["content"] for m in mc}) > 2.5 * len(world.split("seen")) * len(ATTRIBUTES)
    with pytest.raises(UserError, match="unknown world preset field"):
        build_world(seed=0, scale="tiny", mc_per_fact=3)
