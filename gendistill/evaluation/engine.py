"""Batched generation with the model's KV/state cache and left padding, exact: a batch gives the same greedy output
as each prompt alone. Prompts are sorted by length (little padding), each row stops on EOS or a stop string, and
sampling draws every row from its own generator seeded by (seed, prompt index), so a sampled output depends on the
seed and the prompt, not on batch size or neighbours.

Works for any HF causal LM whose forward takes `attention_mask`, `position_ids`, `past_key_values`, `use_cache`
and `logits_to_keep`, and that treats left padding exactly (Qwen3; the Hybrid-KDA student masks pads in its KDA
layers). Position ids count real tokens only (as `generate()` does), so a padded row sees what it would alone.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


@dataclass(frozen=True)
class Sampling:
    """Qwen3 non-thinking defaults, which the paper samples with (averaged over seeds 1, 2, 3)."""

    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20

    def warpers(self) -> LogitsProcessorList:
        # transformers' own warpers, in generate()'s order: temperature, top-k, top-p.
        warpers = LogitsProcessorList([TemperatureLogitsWarper(self.temperature)])
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers


@dataclass
class Generation:
    text: str  # decoded without special tokens, cut before the first stop string
    token_ids: list[int]  # generated tokens, EOS excluded
    stopped: bool  # ended by EOS or a stop string (False: ran into max_new_tokens)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids as lm-eval's HFLM makes them: the tokenizer's special tokens, unless the text starts with BOS."""
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
    return {i for i in ids if i is not None}


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int, extra: int = 0) -> Iterator[list[int]]:
    """Indices grouped longest first; a batch holds at most `batch_size` rows and, unless it is a single row,
    at most `max_batch_tokens` padded tokens (prompt plus `extra` new tokens per row)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        width = (lengths[batch[0]] if batch else lengths[i]) + extra
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * width > max_batch_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids (counting real tokens only) for left-padded rows."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


@torch.no_grad()
def _generate_batch(model, tokenizer, rows: list[list[int]], max_new_tokens: int, stop: Sequence[str],
                    eos: set[int], sampling: Sampling | None, generators: list[torch.Generator] | None
                    ) -> list[Generation]:
    device = model.device
    input_ids, attention_mask, position_ids = left_pad(rows, pad_token_id(tokenizer), device)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1)
    cache = out.past_key_values
    next_position = position_ids[:, -1:] + 1
    warpers = sampling.warpers() if sampling else None
    tokens: list[list[int]] = [[] for _ in rows]
    texts = [""] * len(rows)
    done = [False] * len(rows)
    stopped = [False] * len(rows)
    for step in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()
        if warpers is None:
            chosen = logits.argmax(-1)
        else:
            probs = warpers(input_ids, logits).softmax(-1)
            chosen = torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])
        for i, token in enumerate(chosen.tolist()):
            if done[i]:
                continue
            if token in eos:
                done[i] = stopped[i] = True
                continue
            tokens[i].append(token)
            if stop:
                texts[i], hit = _cut_at_stop(tokenizer.decode(tokens[i], skip_special_tokens=True), stop)
                done[i] = stopped[i] = hit
        if all(done) or step == max_new_tokens - 1:
            break
        # Finished rows keep decoding a pad (their output is ignored): the cache cannot drop rows of every kind.
        feed = torch.where(torch.tensor(done, device=device), pad_token_id(tokenizer), chosen)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=-1)
        out = model(input_ids=feed[:, None], attention_mask=attention_mask, position_ids=next_position,
                    past_key_values=cache, use_cache=True)
        next_position = next_position + 1
    results = []
    for i in range(len(rows)):
        text = texts[i] if stop else tokenizer.decode(tokens[i], skip_special_tokens=True)
        results.append(Generation(text=text, token_ids=tokens[i], stopped=stopped[i]))
    return results


def generate(model, tokenizer, prompts: Sequence[str | Sequence[int]], *, max_new_tokens: int,
             stop: Sequence[str] = (), sampling: Sampling | None = None, seed: int = 0, batch_size: int = 16,
             max_batch_tokens: int = 1 << 16, progress: bool = True, desc: str = "generate") -> list[Generation]:
    """Generate for every prompt (text or token ids); greedy unless `sampling` is given. Outputs in prompt order."""
    rows = [encode(tokenizer, p) if isinstance(p, str) else list(p) for p in prompts]
    eos = eos_token_ids(model, tokenizer)
    results: list[Generation | None] = [None] * len(rows)
    with tqdm(total=len(rows), desc=desc, unit="item", disable=not progress, leave=False) as bar:
        for batch in batches([len(r) for r in rows], batch_size, max_batch_tokens, extra=max_new_tokens):
            generators = None
            if sampling:
                generators = [torch.Generator(device=model.device).manual_seed(seed * 1_000_003 + i) for i in batch]
            outs = _generate_batch(model, tokenizer, [rows[i] for i in batch], max_new_tokens, stop, eos, sampling,
                                   generators)
            for i, generation in zip(batch, outs):
                results[i] = generation
            bar.update(len(batch))
    return results
