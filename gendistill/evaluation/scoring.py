"""Score a model on a task both ways: log-likelihood ranking of the choices and generation with answer extraction.

LL follows lm-eval 0.4.13 exactly: the context's trailing spaces move into the continuation, the pair is encoded
whole and split at the context's token count (`TemplateLM._encode_pair`), and
acc = argmax(ll), acc_norm = argmax(ll / len(choice)), acc_bytes = argmax(ll / len(choice.encode()))
(`ConfigurableTask.process_results`; note lm-eval's acc_norm divides by characters, its acc_bytes by UTF-8 bytes;
the two agree on ASCII), with choice = the option text without the delimiter.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from gendistill.evaluation.engine import Sampling, batches, encode, generate, left_pad, pad_token_id
from gendistill.evaluation.extract import extract_answer, is_correct
from gendistill.evaluation.tasks import Task, build_context, choice_targets, target_delimiter


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for causal models."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def loglikelihoods(model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int = 16,
                   max_batch_tokens: int = 1 << 16, progress: bool = True, desc: str = "loglikelihood") -> list[float]:
    """log P(continuation | context) summed over the continuation's tokens, for each (context, continuation)."""
    encoded = [split_pair(tokenizer, c, x) for c, x in pairs]
    rows = [c + x for c, x in encoded]
    results = [0.0] * len(rows)
    with tqdm(total=len(rows), desc=desc, unit="pair", disable=not progress, leave=False) as bar:
        for batch in batches([len(r) for r in rows], batch_size, max_batch_tokens):
            input_ids, attention_mask, position_ids = left_pad([rows[i] for i in batch], pad_token_id(tokenizer),
                                                               model.device)
            # Left padding puts every continuation at the end: only the last (longest continuation + 1) logits matter.
            keep = max(len(encoded[i][1]) for i in batch) + 1
            logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False, logits_to_keep=keep).logits
            logprobs = logits.float().log_softmax(-1)
            for row, i in enumerate(batch):
                continuation = encoded[i][1]
                if not continuation:
                    continue
                n = len(continuation)
                predicted = logprobs[row, keep - 1 - n: keep - 1]  # logits at position t score token t + 1
                target = torch.tensor(continuation, device=predicted.device)
                results[i] = predicted.gather(-1, target[:, None]).sum().item()
            bar.update(len(batch))
    return results


def mc_predictions(lls: Sequence[float], choices: Sequence[str]) -> dict[str, int]:
    """lm-eval's three multiple-choice predictions from the per-choice log-likelihoods."""
    lls = np.asarray(lls, dtype=np.float64)
    return {
        "ll_pred": int(np.argmax(lls)),
        "ll_pred_norm": int(np.argmax(lls / np.array([float(len(c)) for c in choices]))),
        "ll_pred_bytes": int(np.argmax(lls / np.array([float(len(c.encode("utf-8"))) for c in choices]))),
    }


def decode_modes(decode: str, seeds: Sequence[int], sampling: Sampling) -> list[tuple[str, Sampling | None, int]]:
    """(label, sampling, seed) for each generation pass: 'greedy', and 'seed<N>' for each sampling seed."""
    if decode not in ("greedy", "sample", "both"):
        raise ValueError(f"decode must be greedy, sample or both, got {decode!r}")
    modes = [("greedy", None, 0)] if decode in ("greedy", "both") else []
    if decode in ("sample", "both"):
        modes += [(f"seed{s}", sampling, int(s)) for s in seeds]
    return modes


def score_task(model, tokenizer, task: Task, modes: Sequence[tuple[str, Sampling | None, int]], *,
               batch_size: int = 16, max_batch_tokens: int = 1 << 16, progress: bool = True) -> list[dict]:
    """One record per item: LL of every choice and the LL predictions (multiple choice), and for each generation
    mode the output text, extracted answer, correctness, length and whether it stopped."""
    adapter = task.adapter  # a task from elsewhere (lm-eval) renders its own prompts and LL requests
    contexts = (adapter.prompts(task.items, tokenizer) if adapter is not None
                else [build_context(task, item, tokenizer) for item in task.items])
    records = [{"id": item["id"], "task": task.name, "kind": task.kind, "answer": item["answer"],
                "n_choices": len(item.get("choices") or []), "meta": item.get("meta") or {}, "gen": {}}
               for item in task.items]
    if task.is_mc:
        if adapter is not None:
            requests = adapter.ll_requests(task.items, tokenizer)
        else:
            delimiter = target_delimiter(task, tokenizer)
            requests = [[(context, delimiter + choice) for choice in choice_targets(task, item)]
                        for item, context in zip(task.items, contexts)]
        lls = loglikelihoods(model, tokenizer, [pair for item_pairs in requests for pair in item_pairs],
                             batch_size=batch_size, max_batch_tokens=max_batch_tokens, progress=progress,
                             desc=f"{task.name} LL")
        start = 0
        for item, record, item_pairs in zip(task.items, records, requests):
            record["ll"] = lls[start: start + len(item_pairs)]
            record.update(mc_predictions(record["ll"], choice_targets(task, item)))
            start += len(item_pairs)
    for label, sampling, seed in modes:
        outputs = generate(model, tokenizer, contexts, max_new_tokens=task.max_new_tokens, stop=task.stop,
                           sampling=sampling, seed=seed, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                           progress=progress, desc=f"{task.name} gen {label}")
        judge = getattr(adapter, "judge", None)
        for item, record, out in zip(task.items, records, outputs):
            if judge is not None:  # {"extracted", "correct", ...}: e.g. lm-eval's filters and metrics
                entry = {"text": out.text, **judge(item, out.text)}
            else:
                extracted = extract_answer(task, item, out.text)
                entry = {"text": out.text, "extracted": extracted, "correct": is_correct(task, item, extracted)}
            entry.update(n_tokens=len(out.token_ids), stopped=out.stopped)
            if sampling is None:  # greedy tokens let the report find where a student departs from its teacher
                entry["tokens"] = out.token_ids
            record["gen"][label] = entry
    return records
