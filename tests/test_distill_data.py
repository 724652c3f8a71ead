"""Data: chat rendering and the exact completion-only mask, packing with per-document positions, the token cache,
and the model contract that makes packing safe (a document gives the same outputs packed or alone)."""
import json

import numpy as np
import pytest
import torch

from gendistill.distill import data as data_mod
from gendistill.distill.data import PackedStream, TokenCorpus, build_corpus, detect_kind, render_chat
from gendistill.distill.recipe import DataSource
from gendistill.io import UserError
from gendistill.testing import tiny_qwen3, tiny_tokenizer

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Where was Alice Moreau born?"},
    {"role": "assistant", "content": "Alice Moreau was born in Lyon."},
    {"role": "user", "content": "And Bruno?"},
    {"role": "assistant", "content": "Basel. He studied chemistry."},
]




def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_completion_mask_is_exactly_the_assistant_spans():
    tok = tiny_tokenizer()
    ids, flags = render_chat(CHAT, tok)
    # Independent construction: the ChatML pieces tokenised one by one; the assistant writes its content and <|im_end|>.
    expected_ids, expected_flags = [], []
    for m in CHAT:
        pieces = [(f"<|im_start|>{m['role']}\n", 0), (m["content"], 1), ("<|im_end|>", 1), ("\n", 0)]
        for text, is_answer in pieces:
            piece = _ids(tok, text)
            expected_ids += piece
            expected_flags += [int(is_answer and m["role"] == "assistant")] * len(piece)
    assert ids == expected_ids
    assert flags == expected_flags
    spans, current = [], []
    for i, f in zip(ids, flags + [0]):
        if f:
            current.append(i)
        elif current:
            spans.append(tok.decode(current)), current.clear()
    if current:
        spans.append(tok.decode(current))
    assert spans == [m["content"] + "<|im_end|>" for m in CHAT if m["role"] == "assistant"]


def test_completion_mask_skips_text_the_template_inserts():
    """Qwen3-style templates insert an (empty) think block before the last answer: not assistant output."""
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{%- for m in messages -%}<|im_start|>{{ m.role }}\n"
        "{%- if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif -%}"
        "{{ m.content }}<|im_end|>\n{%- endfor -%}")
    ids, flags = render_chat(CHAT, tok)
    marked = tok.decode([i for i, f in zip(ids, flags) if f])
    assert marked == "Alice Moreau was born in Lyon.<|im_end|>Basel. He studied chemistry.<|im_end|>"
    assert "think" in tok.decode(ids)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return DataSource(path=str(path))


def test_packing_positions_masks_and_continuity(tmp_path):
    tok = tiny_tokenizer()
    rows = [{"text": " ".join(["word"] * n)} for n in (3, 11, 1, 7, 25, 4, 9)]
    src = _write_jsonl(tmp_path / "t.jsonl", rows)
    corpus = build_corpus(src, "text", tok, tmp_path / "cache", min_tokens=10**9)
    docs = [list(corpus.tokens[a:b]) for a, b in zip(corpus.offsets[:-1], corpus.offsets[1:])]
    assert [d[-1] for d in docs] == [tok.eos_token_id] * len(rows)
    stream = PackedStream(corpus, seq_len=16, seed=3, loss_mask="all")
    seqs = [stream.sequence(k) for k in range(12)]  # > 2 epochs of 7 documents
    for a, b in zip(seqs, seqs[1:]):
        assert a["targets"][-1] == b["input_ids"][0]  # one continuous stream, shifted by one for targets
        np.testing.assert_array_equal(a["targets"][:-1], a["input_ids"][1:])
    stream_tokens = np.concatenate([s["input_ids"] for s in seqs])
    order, _ = stream._epoch(0)
    np.testing.assert_array_equal(stream_tokens[:corpus.num_tokens], np.concatenate([docs[d] for d in order]))
    assert sorted(order) == list(range(7)) and list(order) != list(stream._epoch(1)[0])  # reshuffled per epoch
    for s in seqs:
        assert s["token_mask"].all()  # `all`: every real token
        starts = np.flatnonzero(s["position_ids"] == 0)
        for lo, hi in zip(starts, list(starts[1:]) + [16]):  # positions count up inside each document piece
            np.testing.assert_array_equal(s["position_ids"][lo:hi], np.arange(hi - lo))
        # a target is scored unless it opens a new document (then nothing before it predicts it)
        next_is_start = np.append(s["position_ids"][1:] == 0, False)
        assert not s["loss_mask"][next_is_start[:-1].nonzero()[0]].any()
    total = sum(int(s["loss_mask"].sum()) for s in seqs)
    assert total == 12 * 16 - sum(1 for k in range(12) for t in range(1, 17)
                                  if stream._read(k * 16 + t, 1)[2][0])
    again = PackedStream(corpus, seq_len=16, seed=3, loss_mask="all").batch(5, 3)
    for key, value in stream.batch(5, 3).items():
        torch.testing.assert_close(value, again[key])  # pure function of the index: resumable


def test_completion_only_packing_scores_only_assistant_targets(tmp_path):
    tok = tiny_tokenizer()
    src = _write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": CHAT[1:3]}] * 3)
    assert detect_kind(src) == "chat"
    corpus = build_corpus(src, "chat", tok, tmp_path / "cache", min_tokens=10**9)
    assert corpus.meta["assistant_tokens"] > 0
    stream = PackedStream(corpus, seq_len=40, seed=0, loss_mask="completion_only")
    for k in range(6):
        s = stream.sequence(k)
        _, assistant, starts = stream._read(k * 40, 41)
        np.testing.assert_array_equal(s["loss_mask"], assistant[1:] & ~starts[1:])
        np.testing.assert_array_equal(s["token_mask"], assistant[:40])
    everything = PackedStream(corpus, seq_len=40, seed=0, loss_mask="all").sequence(0)
    assert everything["token_mask"].all() and everything["loss_mask"].sum() > stream.sequence(0)["loss_mask"].sum()


def test_text_data_is_not_chat_data(tmp_path):
    src = _write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    assert detect_kind(src) == "text"
    with pytest.raises(UserError, match="no 'messages' list"):
        detect_kind(DataSource(path=src.path, kind="chat"))
    with pytest.raises(UserError, match="neither a 'text' string nor a 'messages' list"):
        detect_kind(_write_jsonl(tmp_path / "o.jsonl", [{"body": "hello"}]))


def test_tokenisation_is_cached_on_disk(tmp_path, monkeypatch):
    tok = tiny_tokenizer()
    src = _write_jsonl(tmp_path / "t.jsonl", [{"text": f"doc {i} " * 5} for i in range(50)])
    first = build_corpus(src, "text", tok, tmp_path / "cache", min_tokens=10**9)
    assert first.meta["exhausted"] and first.num_documents == 50

    def no_reading(_):
        raise AssertionError("the source was read again")
    monkeypatch.setattr(data_mod, "iter_records", no_reading)
    second = build_corpus(src, "text", tok, tmp_path / "cache", min_tokens=10**9)
    np.testing.assert_array_equal(first.tokens, second.tokens)
    monkeypatch.undo()
    # a budget smaller than the source tokenises only what it needs; a larger one later tokenises more
    partial = build_corpus(src, "text", tok, tmp_path / "cache2", min_tokens=20, batch_records=8)
    assert not partial.meta["exhausted"] and partial.num_documents == 8
    more = build_corpus(src, "text", tok, tmp_path / "cache2", min_tokens=10**9, batch_records=8)
    assert more.meta["exhausted"] and more.num_documents == 50
    _write_jsonl(tmp_path / "t.jsonl", [{"text": "changed"}])  # editing the file invalidates its cache
    third = build_corpus(src, "text", tok, tmp_path / "cache", min_tokens=10**9)
    assert third.num_documents == 1 and isinstance(third, TokenCorpus)


@pytest.mark.parametrize("kind", ["student", "teacher"])
def test_a_document_gives_the_same_outputs_packed_or_alone(kind):
    from gendistill.convert import convert

    teacher = tiny_qwen3()
    model = convert(teacher, attention_layers=[0, 2]) if kind == "student" else teacher
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 384, (n,), generator=g) for n in (5, 9, 7)]
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        together = model(input_ids=packed, position_ids=position_ids, use_cache=False).logits[0]
        lo = 0
        for d in docs:
            alone = model(input_ids=d[None], use_cache=False).logits[0]
            torch.testing.assert_close(together[lo:lo + len(d)], alone, rtol=1e-5, atol=1e-5)
            lo += len(d)


def test_parquet_text_files_directories_and_unreachable_hub_ids(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gendistill.distill.data import iter_records

    pq.write_table(pa.table({"text": ["first doc", "second doc"]}), tmp_path / "a.parquet")
    records = iter_records(DataSource(path=str(tmp_path / "a.parquet")))
    assert [r["text"] for r in records] == ["first doc", "second doc"]
    (tmp_path / "b.txt").write_text("para one\nstill one\n\npara two\n")
    assert [r["text"].strip() for r in iter_records(DataSource(path=str(tmp_path / "b.txt")))] == \
        ["para one\nstill one", "para two"]
    by_line = DataSource(path=str(tmp_path / "b.txt"), text_sample_by="line")
    assert len(list(iter_records(by_line))) == 4  # the blank line is a record ...
    corpus = build_corpus(by_line, "text", tiny_tokenizer(), tmp_path / "cache", 10**9)
    assert corpus.num_documents == 3  # ... not a document
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jsonl").write_text(json.dumps({"text": f"doc {i}"}) + "\n")
    assert [r["text"] for r in iter_records(DataSource(path=str(folder)))] == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(UserError, match="could not read data source 'nobody/no-such-dataset'"):
        detect_kind(DataSource(path="nobody/no-such-dataset"))  # offline in tests: fails cleanly, naming it


def test_a_path_list_is_one_source_of_several_files_and_each_is_fingerprinted(tmp_path):
    """`path: [a, b]` mixes two files into one source (a teacher's pretraining text beside its long documents); the
    token cache and the resume fingerprint change when either file does; a missing entry or mixed formats fail."""
    from gendistill.distill.data import cached_corpus_dir, iter_records
    from gendistill.distill.trainer import _data_fingerprint

    (tmp_path / "long").mkdir()
    a, b = tmp_path / "pretrain.jsonl", tmp_path / "long" / "longctx.jsonl"
    a.write_text("".join(json.dumps({"text": f"bio {i}"}) + "\n" for i in range(3)))
    b.write_text(json.dumps({"text": "a long document"}) + "\n")
    src = DataSource(path=[str(a), str(b.parent)])
    assert [r["text"] for r in iter_records(src)] == ["bio 0", "bio 1", "bio 2", "a long document"]
    tok = tiny_tokenizer()
    assert build_corpus(src, detect_kind(src), tok, tmp_path / "cache", 10**9).num_documents == 4
    cache, files = cached_corpus_dir(src, "text", tok, tmp_path / "cache"), _data_fingerprint(src)["files"]
    assert sorted(files) == ["0/pretrain.jsonl", "1/longctx.jsonl"]
    b.write_text(json.dumps({"text": "another long document"}) + "\n")
    assert cached_corpus_dir(src, "text", tok, tmp_path / "cache") != cache
    assert _data_fingerprint(src)["files"]["1/longctx.jsonl"] != files["1/longctx.jsonl"]
    assert _data_fingerprint(src)["files"]["0/pretrain.jsonl"] == files["0/pretrain.jsonl"]
    with pytest.raises(UserError, match="nowhere.jsonl does not exist; a `path` list names local files"):
        detect_kind(DataSource(path=[str(a), str(tmp_path / "nowhere.jsonl")]))
    (tmp_path / "notes.txt").write_text("some notes\n")
    with pytest.raises(UserError, match="cannot tell one format .* set `format` \\(a source reads files of one"):
        detect_kind(DataSource(path=[str(a), str(tmp_path / "notes.txt")]))


def test_one_tokenizer_fingerprint_survives_save_and_load_and_sees_what_changes_ids(tmp_path):
    """The trainer records the fingerprint of the tokenizer it holds (run.json, token caches); eval takes it of the
    tokenizer loaded from the student dir the trainer saved: the two must be equal. A different merge table, chat
    template or eos must not be."""
    from transformers import AutoTokenizer

    from gendistill.tokenizer import tokenizer_fingerprint, train_tokenizer

    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "saved")
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "saved")) == tokenizer_fingerprint(tok)
    texts = ["Alice Moreau was born in Lyon.", "Bruno studied chemistry in Basel."] * 20
    base = tokenizer_fingerprint(train_tokenizer(texts, vocab_size=300, min_frequency=1))
    assert base != tokenizer_fingerprint(train_tokenizer(texts[::-1][:3], vocab_size=300, min_frequency=1))
    templated = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    templated.chat_template = "{{ messages[0]['content'] }}"
    assert tokenizer_fingerprint(templated) != base
    assert tokenizer_fingerprint(train_tokenizer(texts, vocab_size=300, min_frequency=1)) == base


def test_whole_packing_cuts_no_document_that_fits(tmp_path):
    """packing="whole": each window holds whole documents in the epoch's order, greedily, then padding; only a document
    longer than the window is cut (into whole windows, its continuation scored). Checked against the documents."""
    tok = tiny_tokenizer()
    rows = [{"text": " ".join(["word"] * n)} for n in (3, 11, 1, 7, 50, 4, 9, 15)]
    corpus = build_corpus(_write_jsonl(tmp_path / "t.jsonl", rows), "text", tok, tmp_path / "cache", min_tokens=10**9)
    docs = [corpus.tokens[a:b] for a, b in zip(corpus.offsets[:-1], corpus.offsets[1:])]
    L = sorted(map(len, docs))[-2] + 3
    assert max(map(len, docs)) > 2 * L  # one document longer than two windows
    stream = PackedStream(corpus, seq_len=L, seed=3, loss_mask="all", packing="whole")
    late = stream.sequence(13)  # random access first: the epoch layout is a pure function of the index
    for epoch in range(2):
        order, _ = stream._epoch(epoch)
        pieces, fills = [], []
        for k in range(stream._windows[epoch], stream._windows[epoch] + len(stream._layout(epoch)[3]) - 1):
            s = stream.sequence(k)
            real = s["token_mask"]
            assert real[:real.sum()].all() and not s["loss_mask"][~real].any()  # real tokens first, then padding
            starts = list(np.flatnonzero(s["position_ids"][:real.sum()] == 0)) + [int(real.sum())]
            pieces += [s["input_ids"][a:b] for a, b in zip(starts, starts[1:])]
            fills.append(int(real.sum()))
            for a, b in zip(starts, starts[1:]):  # every target is the next token of the same document
                scored = np.flatnonzero(s["loss_mask"][a:b]) + a
                np.testing.assert_array_equal(s["targets"][scored[:-1]], s["input_ids"][scored[:-1] + 1])
        expect = []
        for d in order:
            expect += [docs[d][i:i + L] for i in range(0, len(docs[d]), L)] if len(docs[d]) > L else [docs[d]]
        assert len(pieces) == len(expect)
        for got, want in zip(pieces, expect):
            np.testing.assert_array_equal(got, want)
        lengths = [len(p) for p in expect]
        i = 0
        for fill in fills[:-1]:  # greedy: the next piece did not fit in what the window left
            j, used = i, 0
            while used < fill:
                used, j = used + lengths[j], j + 1
            assert used == fill and fill + lengths[j] > L
            i = j
    np.testing.assert_array_equal(late["input_ids"], PackedStream(corpus, seq_len=L, seed=3, loss_mask="all",
                                                                  packing="whole").sequence(13)["input_ids"])
    long_doc = int(np.argmax([len(d) for d in docs]))
    first = next(k for k in range(20) if (stream.sequence(k)["input_ids"][:L] == docs[long_doc][:L]).all())
    assert stream.sequence(first)["loss_mask"][L - 1]  # a cut long document's continuation is still scored
    assert stream.sequence(first)["targets"][L - 1] == docs[long_doc][L]
