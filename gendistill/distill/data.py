"""Data: read a source through `datasets`, tokenise it once into an on-disk cache, serve packed fixed-length sequences.

- A source is a hub dataset id (streamed) or local jsonl/json/parquet/txt files. Records hold plain text
  (`text_field`) or a chat (`messages_field`: a list of {role, content}).
- Chats are rendered with the tokenizer's own chat template; `assistant` marks exactly the tokens the model writes
  in an assistant turn (its content and the end-of-turn token), which is the completion-only loss mask.
- Tokens are cached as flat arrays (tokens, assistant flags, document offsets) keyed by source + tokenizer, so a
  resumed or later stage never re-tokenises.
- `PackedStream` concatenates documents (reshuffled every epoch, seeded) into an endless stream and cuts it into
  windows of seq_len + 1 tokens. Sequence k of a stage is always the same window, so the data position of a
  checkpoint is just the step. Position ids restart at 0 at each document (and at each window start); the model
  turns them into block-diagonal attention and a KDA state reset. A target is never the first token of a document.
  With `packing="whole"` no document that fits in a window is cut: windows take whole documents in the epoch's order
  and are padded at the end (padding is neither scored nor attended by real tokens).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from gendistill.distill.recipe import DataSource
from gendistill.io import UserError, atomic_dir
from gendistill.tokenizer import tokenizer_fingerprint

CACHE_VERSION = 1
_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


# ----------------------------------------------------------------------------------------------------------------
# reading records

def local_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _EXTENSIONS and not p.name.startswith("."))
        if not files:
            raise UserError(f"data directory {path} holds no {'/'.join(_EXTENSIONS)} files")
        return files
    return [path]


def source_paths(src: DataSource) -> list[Path] | None:
    """The paths a local source names (one, or each entry of a `path` list), or None for a hub dataset: a single
    path that does not exist is taken for a hub id unless `format` says it is local."""
    if isinstance(src.path, list):
        paths = [Path(os.path.expanduser(p)) for p in src.path]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise UserError(f"data source {src.path!r}: {', '.join(missing)} does not exist; a `path` list names "
                            f"local files or directories only")
        return paths
    path = Path(os.path.expanduser(src.path))
    return [path] if src.format != "hub" and (path.exists() or src.format != "auto") else None


def iter_records(src: DataSource):
    """Yield the records of a source, streamed (nothing is materialised or written to the datasets cache). A `path`
    list reads its files one after the other; the packer's per-epoch shuffle mixes their documents."""
    import datasets

    try:
        paths = source_paths(src)
        if paths is not None:
            files = [f for p in paths for f in local_files(p)]
            if all(f.is_file() and f.stat().st_size == 0 for f in files):
                raise UserError(f"data source {src.path!r} is empty (0 bytes); point `path` at a file with records")
            formats = {_EXTENSIONS.get(f.suffix) for f in files}
            fmt = src.format if src.format != "auto" else formats.pop() if len(formats) == 1 else None
            if fmt is None:
                raise UserError(f"data source {src.path}: cannot tell one format for {', '.join(f.name for f in files)}"
                                f"; set `format`" + (" (a source reads files of one format)" if len(files) > 1 else ""))
            kwargs = {"sample_by": src.text_sample_by} if fmt == "text" else {}
            ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train", streaming=True,
                                       **kwargs)
        else:
            ds = datasets.load_dataset(src.path, src.name, split=src.split, streaming=True)
        yield from ds
    except UserError:
        raise
    except Exception as err:  # missing file, offline hub, bad split, malformed json, ...
        raise UserError(f"could not read data source {src.path!r}: {type(err).__name__}: {err}") from err


def detect_kind(src: DataSource) -> str:
    """text | chat, from `kind` or the first record. Raises UserError on an empty or unreadable source."""
    first = next(iter_records(src), None)
    if first is None:
        raise UserError(f"data source {src.path!r} is empty")
    fields = sorted(first)
    if src.kind == "chat" or (src.kind == "auto" and first.get(src.messages_field) is not None):
        if not isinstance(first.get(src.messages_field), list):
            raise UserError(f"data source {src.path!r} is used as chat data but its records have no "
                            f"{src.messages_field!r} list (fields: {fields}); set `messages_field`")
        return "chat"
    if not isinstance(first.get(src.text_field), str):
        raise UserError(f"data source {src.path!r}: records have neither a {src.text_field!r} string nor a "
                        f"{src.messages_field!r} list (fields: {fields}); set `text_field` or `messages_field`")
    return "text"


# ----------------------------------------------------------------------------------------------------------------
# chat rendering

def render_chat(messages: list[dict], tokenizer,
                chat_template_kwargs: dict | None = None) -> tuple[list[int], list[int]]:
    """Render a chat with the tokenizer's template; return token ids and a 0/1 flag per token that is 1 exactly on
    what the assistant writes: each assistant message's content plus the end-of-turn (eos) token right after it.

    The template's role headers and any text it inserts (e.g. an empty think block) are not assistant output. Each
    assistant content is located in the rendered text (searching forward from the previous message), so templates
    that render earlier turns differently from the last one (Qwen3) are handled too.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("chat data needs a tokenizer with a chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, **(chat_template_kwargs or {}))
    spans, cursor = [], 0
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            raise UserError(f"chat message {i} has no string `content`: {message!r}")
        if not content:
            continue
        start = text.find(content, cursor)
        if start < 0:
            raise UserError(f"the chat template rewrites message {i}'s content; cannot locate it to build the "
                            f"completion mask ({content[:40]!r}...)")
        end = start + len(content)
        if message.get("role") == "assistant":
            eos = tokenizer.eos_token
            if eos and text.startswith(eos, end):
                end += len(eos)
            spans.append((start, end))
        cursor = end
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    flags = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
    return list(enc["input_ids"]), flags


# ----------------------------------------------------------------------------------------------------------------
# tokenised corpus (on-disk cache)

def _source_fingerprint(src: DataSource, kind: str, tokenizer) -> str:
    spec = asdict(src)
    spec.pop("shuffle")  # read-time only
    paths = source_paths(src)
    if paths is not None and all(p.exists() for p in paths):  # local files: edits invalidate the cache
        spec["files"] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for p in paths for f in local_files(p)]
    blob = json.dumps([CACHE_VERSION, spec, kind, tokenizer_fingerprint(tokenizer)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class TokenCorpus:
    """Documents as one flat token array: tokens[offsets[d]:offsets[d+1]] is document d; assistant flags alike."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text())
        self.tokens = np.load(self.directory / "tokens.npy", mmap_mode="r")
        self.assistant = np.load(self.directory / "assistant.npy", mmap_mode="r")
        self.offsets = np.load(self.directory / "offsets.npy")
        self.kind = self.meta["kind"]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1


def cached_corpus_dir(src: DataSource, kind: str, tokenizer, cache_dir: str | Path) -> Path:
    return Path(cache_dir) / _source_fingerprint(src, kind, tokenizer)


def build_corpus(src: DataSource, kind: str, tokenizer, cache_dir: str | Path, min_tokens: int,
                 batch_records: int = 512) -> TokenCorpus:
    """Return the cached tokenisation of `src`, tokenising now (at least `min_tokens`, or the whole source) only if
    the cache lacks it. Written atomically: an interrupted tokenisation leaves no half cache behind."""
    directory = cached_corpus_dir(src, kind, tokenizer, cache_dir)
    if (directory / "meta.json").exists():
        corpus = TokenCorpus(directory)
        if corpus.meta["exhausted"] or corpus.num_tokens >= min_tokens:
            return corpus
    eos = tokenizer.eos_token_id
    if kind == "text" and src.append_eos and eos is None:
        raise UserError(f"data source {src.path!r}: append_eos is set but the tokenizer has no eos token")
    token_parts, flag_parts, lengths = [], [], []
    total, batch = 0, []
    exhausted = True  # False when we stop early because we have enough tokens

    def flush():
        nonlocal total
        if not batch:
            return
        if kind == "text":
            texts = [r[src.text_field] for r in batch if r[src.text_field].strip()]  # no empty documents
            encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
            docs = [(ids + [eos] if src.append_eos else ids, None) for ids in encoded]
        else:
            docs = [render_chat(r[src.messages_field], tokenizer, src.chat_template_kwargs) for r in batch]
        for ids, flags in docs:
            if not ids:
                continue
            token_parts.append(np.asarray(ids, dtype=np.uint32))
            flag_parts.append(np.asarray(flags if flags is not None else [1] * len(ids), dtype=np.uint8))
            lengths.append(len(ids))
            total += len(ids)
        batch.clear()

    for count, record in enumerate(iter_records(src)):
        if src.max_documents is not None and count >= src.max_documents:
            break
        if total >= min_tokens:
            exhausted = False
            break
        if kind == "chat" and not isinstance(record.get(src.messages_field), list):
            raise UserError(f"data source {src.path!r}, record {count}: no {src.messages_field!r} list")
        if kind == "text" and not isinstance(record.get(src.text_field), str):
            raise UserError(f"data source {src.path!r}, record {count}: no {src.text_field!r} string")
        batch.append(record)
        if len(batch) >= batch_records:
            flush()
    flush()
    if total == 0:
        raise UserError(f"data source {src.path!r} produced no tokens")
    meta = {"source": asdict(src), "kind": kind, "tokenizer": tokenizer_fingerprint(tokenizer), "exhausted": exhausted}
    return write_corpus(directory, np.concatenate(token_parts), np.concatenate(flag_parts), lengths, meta)


def write_corpus(directory: str | Path, tokens: np.ndarray, assistant: np.ndarray, lengths, meta: dict) -> TokenCorpus:
    """Store documents (flat tokens, 0/1 assistant flags, per-document lengths) as a TokenCorpus, atomically."""
    lengths = np.asarray(lengths, dtype=np.int64)
    meta = {"kind": "text", "exhausted": True, "source": {}, **meta, "documents": len(lengths),
            "tokens": int(lengths.sum()), "assistant_tokens": int(np.asarray(assistant).sum())}
    with atomic_dir(directory, overwrite=True) as tmp:
        np.save(tmp / "tokens.npy", np.asarray(tokens, dtype=np.uint32))
        np.save(tmp / "assistant.npy", np.asarray(assistant, dtype=np.uint8))
        np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    return TokenCorpus(directory)


# ----------------------------------------------------------------------------------------------------------------
# packed sequences

class PackedStream:
    """Endless stream of the corpus' documents, cut into windows of `seq_len` + 1 tokens (inputs and shifted targets).

    Epoch e visits every document once, in an order seeded by (seed, e) (or in file order without shuffle).
    `sequences(first, count)` is a pure function of its arguments, which is what makes resume exact.
    """

    def __init__(self, corpus: TokenCorpus, seq_len: int, seed: int, loss_mask: str, shuffle: bool = True,
                 packing: str = "concat"):
        self.corpus, self.seq_len, self.seed, self.shuffle, self.packing = corpus, seq_len, seed, shuffle, packing
        self.completion_only = loss_mask == "completion_only"
        self.lengths = np.diff(corpus.offsets)
        self._epoch_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._layouts: dict[int, tuple[np.ndarray, ...]] = {}
        self._windows = [0]  # packing="whole": windows before epoch e, for the epochs laid out so far

    def _epoch(self, epoch: int):
        if epoch not in self._epoch_cache:
            order = np.arange(len(self.lengths))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
            starts = np.concatenate([[0], np.cumsum(self.lengths[order])])
            if len(self._epoch_cache) > 4:
                self._epoch_cache.clear()
            self._epoch_cache[epoch] = (order, starts)
        return self._epoch_cache[epoch]

    def _read(self, start: int, count: int):
        """Tokens, assistant flags and document-start flags of stream positions [start, start + count)."""
        total = self.corpus.num_tokens
        tokens = np.empty(count, dtype=np.int64)
        assistant = np.empty(count, dtype=bool)
        doc_start = np.zeros(count, dtype=bool)
        filled, pos = 0, start
        while filled < count:
            epoch, offset = divmod(pos, total)
            order, starts = self._epoch(epoch)
            d = int(np.searchsorted(starts, offset, side="right")) - 1
            doc = int(order[d])
            within = offset - int(starts[d])
            take = min(int(self.lengths[doc]) - within, count - filled)
            lo = int(self.corpus.offsets[doc]) + within
            tokens[filled:filled + take] = self.corpus.tokens[lo:lo + take]
            assistant[filled:filled + take] = self.corpus.assistant[lo:lo + take].astype(bool)
            doc_start[filled] = within == 0
            filled += take
            pos += take
        return tokens, assistant, doc_start

    def _layout(self, epoch: int) -> tuple[np.ndarray, ...]:
        """packing="whole": epoch `epoch`'s documents, in its order, as pieces (doc, offset within it, length) placed
        greedily into windows of seq_len tokens; a document that does not fit in what is left of a window starts the
        next one, and one longer than a window fills whole windows of its own. `first[w]` is window w's first piece."""
        if epoch not in self._layouts:
            L, (order, _) = self.seq_len, self._epoch(epoch)
            pieces, first, fill = [], [0], 0
            for doc in order.tolist():
                n, at = int(self.lengths[doc]), 0
                if fill and fill + n > L:
                    first.append(len(pieces))
                    fill = 0
                while n - at > L - fill:  # (fill is 0 here) a document longer than a window: whole windows of it
                    pieces.append((doc, at, L))
                    first.append(len(pieces))
                    at += L
                pieces.append((doc, at, n - at))
                fill += n - at
                if fill == L:
                    first.append(len(pieces))
                    fill = 0
            if fill:
                first.append(len(pieces))
            if len(self._layouts) > 4:
                self._layouts.clear()
            self._layouts[epoch] = (*np.asarray(pieces, dtype=np.int64).T, np.asarray(first, dtype=np.int64))
        return self._layouts[epoch]

    def _whole_sequence(self, index: int) -> dict[str, np.ndarray]:
        while self._windows[-1] <= index:  # the epoch holding window `index`
            self._windows.append(self._windows[-1] + len(self._layout(len(self._windows) - 1)[3]) - 1)
        epoch = int(np.searchsorted(self._windows, index, side="right")) - 1
        docs, within, take, first = self._layout(epoch)
        w = index - self._windows[epoch]
        L, c = self.seq_len, self.corpus
        out = {"input_ids": np.zeros(L, np.int64), "targets": np.zeros(L, np.int64), "position_ids": np.arange(L),
               "loss_mask": np.zeros(L, bool), "token_mask": np.zeros(L, bool)}
        at = 0
        for p in range(int(first[w]), int(first[w + 1])):
            lo, n, end = int(c.offsets[docs[p]] + within[p]), int(take[p]), int(c.offsets[docs[p] + 1])
            k = min(n, end - lo - 1)  # the piece's tokens with a target in the same document
            out["input_ids"][at:at + n] = c.tokens[lo:lo + n]
            out["targets"][at:at + k] = c.tokens[lo + 1:lo + 1 + k]
            out["position_ids"][at:at + n] = np.arange(n)
            out["loss_mask"][at:at + k] = c.assistant[lo + 1:lo + 1 + k] if self.completion_only else True
            out["token_mask"][at:at + n] = c.assistant[lo:lo + n] if self.completion_only else True
            at += n
        out["position_ids"][at:] = np.arange(L - at)  # the padding: a document of its own, never scored
        return out

    def sequence(self, index: int) -> dict[str, np.ndarray]:
        if self.packing == "whole":
            return self._whole_sequence(index)
        L = self.seq_len
        tokens, assistant, doc_start = self._read(index * L, L + 1)
        starts = doc_start[:L].copy()
        starts[0] = True  # a window always starts a (possibly continued) document
        idx = np.arange(L)
        position_ids = idx - np.maximum.accumulate(np.where(starts, idx, 0))
        # The output at t is scored against token t+1, unless t+1 opens a new document.
        loss_mask = ~doc_start[1:]
        if self.completion_only:
            loss_mask &= assistant[1:]
        token_mask = assistant[:L] if self.completion_only else np.ones(L, dtype=bool)
        return {"input_ids": tokens[:L], "targets": tokens[1:], "position_ids": position_ids,
                "loss_mask": loss_mask, "token_mask": token_mask}

    def batch(self, first: int, count: int) -> dict[str, torch.Tensor]:
        seqs = [self.sequence(first + i) for i in range(count)]
        return {k: torch.from_numpy(np.stack([s[k] for s in seqs])) for k in seqs[0]}
