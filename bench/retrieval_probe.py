"""Does the GPU world teacher's shape learn retrieval from drills, and how fast? (issue 22, docs/FINDINGS.md)

A plain PyTorch loop (no gendistill trainer, so the answer is about the model and the data, not the tool): a fresh
Qwen3 of `demo/teacher-gpu.yaml`'s shape trains on a stream of short retrieval drills made by the world's own
long-document builder (`gendistill.world.world._LongDocBuilder`: NIAH single, NIAH multikey and associative-recall
episodes in the recall tasks' wording, between the world's conversations and biographies), each drill exactly
`--seq-len` tokens, fresh keys and values every time (never repeated: nothing can be memorised). Every
`--eval-every` steps it scores the recall tasks themselves (`gendistill.evaluation.recall`, other keys) at several
lengths: an item counts when every answer token is the model's argmax after the prompt and the answer's earlier
tokens (teacher-forced exact match, which is what greedy generation would produce up to the end of the number), and
held-out drills of the training stream (the share of their answer tokens right). `--drills dense` makes the episodes
short and question-dense; `--drills mqar` replaces the text with Zoology's token-space associative recall, to calibrate
how many steps this shape needs to form content lookup at all.

    python bench/retrieval_probe.py --budget-s 300 --out probe.json              # on the GPU
    python bench/retrieval_probe.py --device cpu --budget-s 20 --batch 2 --seq-len 256 --layers 2 --eval-items 4

Prints the curve as it goes and writes it as JSON (command, versions, commit, date).
"""
from __future__ import annotations

import argparse
import collections
import math
import multiprocessing as mp
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

# The answers of the drills' questions: " 4821937" after a NIAH or an associative-recall question.
ANSWER = re.compile(r"(?:mentioned in the provided text is|The value of the key [a-z]+-[a-z]+ is)( \d+)\.\n")
FAMILIES = ["niah_single", "niah_multikey", "assoc_recall"]

_worker = {}


# --drills dense: the builder's episodes made short and question-dense
DENSE = {"min_episode": 360, "episode_weights": [0.15, 0.15, 0.7], "short_share": (0.0, 0.05),
         "extra_questions": {"niah_multikey": 3, "assoc_recall": 31}}


# --drills mqar: multi-query associative recall in token space (Zoology's MQAR, arXiv 2312.04927): one-token keys and
# values from disjoint id ranges, --mqar-pairs pairs, then queries "key value" of those keys to the end of the row; the
# answers are the values of the queries. No text: a calibration of the shape and the budget, not of the world's data.
# --mqar-keys says how many ids each range spans (the two must fit the vocabulary: 100 + 2 x keys ids): a smaller key
# space is an easier task to learn. The ids are arbitrary; the first GPU probes took values from 2000 up.
def mqar_ranges(n_keys: int) -> tuple[range, range]:
    return range(100, 100 + n_keys), range(100 + n_keys, 100 + 2 * n_keys)


def _init_worker(tokenizer_dir, bios, chats, mode, mqar_pairs, mqar_keys=1024):
    from transformers import AutoTokenizer

    _worker["mode"], _worker["mqar_pairs"], _worker["mqar_keys"] = mode, mqar_pairs, mqar_keys
    _worker["tok"] = AutoTokenizer.from_pretrained(tokenizer_dir)
    _worker["bios"], _worker["chats"] = bios, chats


def _drills(job):
    """`n` drills of `length` - 1 tokens from seed `seed`: (token ids, answer mask) lists, end-of-text appended."""
    from gendistill.world.world import _LongDocBuilder, _TokenCounter

    seed, n, length = job
    if _worker["mode"] == "mqar":
        return _mqar(random.Random(f"mqar/{seed}"), n, length, _worker["mqar_pairs"], _worker["mqar_keys"])
    tok = _worker["tok"]
    if "builder" not in _worker:
        _worker["builder"] = _LongDocBuilder(random.Random(), _TokenCounter(tok), _worker["bios"], _worker["chats"],
                                             **(DENSE if _worker["mode"] == "dense" else {}))
    builder = _worker["builder"]
    builder.rng = random.Random(f"probe/{seed}")
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    out = []
    for _ in range(n):
        text = builder.document(length - 1)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = [m.span(1) for m in ANSWER.finditer(text)]
        mask = [any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
        out.append((enc["input_ids"] + [eot], mask + [False]))
    return out


def _prefetched(pool, jobs, depth):
    """The pool's results in job order with at most `depth` batches in flight (Pool.imap would run ahead of the
    training loop without bound, holding every drill it made in memory)."""
    pending = collections.deque()
    for job in jobs:
        pending.append(pool.apply_async(_drills, (job,)))
        if len(pending) >= depth:
            yield pending.popleft().get()


def mqar_rows(rng, n, length, pairs, keys, values, distinct_values=True):
    """`n` rows of `length` ids: `pairs` key-value pairs, then "key value" queries of them to the end (0-padded), each
    with its mask (True at the queried values). `distinct_values=False` draws the values with replacement."""
    out = []
    for _ in range(n):
        ks = rng.sample(keys, pairs)
        vs = rng.sample(values, pairs) if distinct_values else [rng.choice(values) for _ in ks]
        ids, mask = [t for kv in zip(ks, vs) for t in kv], [False] * 2 * pairs
        while len(ids) + 2 <= length:
            i = rng.randrange(pairs)
            ids += [ks[i], vs[i]]
            mask += [False, True]
        out.append((ids + [0] * (length - len(ids)), mask + [False] * (length - len(mask))))
    return out


def _mqar(rng, n, length, pairs, n_keys):
    return mqar_rows(rng, n, length, pairs, *mqar_ranges(n_keys))


def recall_items(tokenizer, lengths, n):
    """(task name, rows) for each family and length; a row is (prompt and answer ids, answer mask), as the drills'."""
    from gendistill.evaluation.engine import encode
    from gendistill.evaluation.recall import recall_task
    from gendistill.evaluation.tasks import user_text

    tasks = []
    for length in lengths:
        for family in FAMILIES:
            task = recall_task(family, length, tokenizer, n=n, seed=0)
            rows = []
            for item in task.items:
                prompt = encode(tokenizer, user_text(task, item))
                full = encode(tokenizer, user_text(task, item) + " " + item["answer"])
                assert full[:len(prompt)] == prompt, "the answer must not merge with the prompt's last token"
                rows.append((full, [False] * len(prompt) + [True] * (len(full) - len(prompt))))
            tasks.append((task.name, rows))
    return tasks


@torch.no_grad()
def answer_hits(model, rows, device, pad_id, batch=16):
    """Per row (answer tokens that are the model's argmax after the row's earlier tokens, answer tokens)."""
    model.eval()
    hits = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        width = max(len(ids) for ids, _ in chunk)
        # right padding: the causal positions before the pad are exact
        ids = torch.tensor([r[0] + [pad_id] * (width - len(r[0])) for r in chunk], device=device)
        mask = torch.tensor([r[1] + [False] * (width - len(r[1])) for r in chunk], device=device)[:, 1:]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(ids[:, :-1]).logits.argmax(-1)
        hits += zip(((pred == ids[:, 1:]) & mask).sum(1).tolist(), mask.sum(1).tolist())
    model.train()
    return hits


def heldout_accuracy(model, rows, device, pad_id):
    """Share of held-out drill answer tokens that are the model's argmax (teacher-forced): in-distribution recall."""
    hits = answer_hits(model, rows, device, pad_id)
    return sum(h for h, _ in hits) / max(1, sum(n for _, n in hits))


def score(model, tasks, device, pad_id):
    """Per recall task, the share of items whose whole answer is the model's argmax (teacher-forced)."""
    return {name: sum(h == n for h, n in answer_hits(model, rows, device, pad_id)) / len(rows) for name, rows in tasks}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per drill (one drill per row)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss", choices=["all", "answers"], default="all",
                   help="next-token loss on every token (what the trainer does on raw text) or on the answers only")
    p.add_argument("--drills", choices=["long", "dense", "mqar"], default="long",
                   help="long: the world's long-document layout at --seq-len; dense: short episodes, many questions; "
                        "mqar: one-token keys and values, no text (scored on held-out rows of its own too)")
    p.add_argument("--mqar-pairs", type=int, default=64)
    p.add_argument("--mqar-keys", type=int, default=1024, help="distinct key (and value) ids the drills draw from")
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--teacher", choices=["gpu", "cpu"], default="gpu",
                   help="whose shape: demo/teacher-gpu.yaml's (28 x 256) or demo/teacher-cpu.yaml's (8 x 128)")
    p.add_argument("--layers", type=int, default=None, help="override the teacher's layers (a smaller probe)")
    p.add_argument("--hidden", type=int, default=None,
                   help="override the teacher's width (MLP 3x, its 4 heads narrowed to hidden/4 each)")
    p.add_argument("--budget-s", type=float, default=300, help="training time; the lr schedule is fit to it")
    p.add_argument("--eval-every", type=int, default=250, help="steps")
    p.add_argument("--eval-items", type=int, default=32, help="items per recall task and length")
    p.add_argument("--eval-lengths", default="512,1024,2048")
    p.add_argument("--workers", type=int, default=max(1, min(8, (mp.cpu_count() or 2) - 1)))
    p.add_argument("--world", default="gpu", help="the world's preset (its tokenizer, conversations, biographies)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    import yaml
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from gendistill.recipes import bundled
    from gendistill.world.world import _render_chats, build_world

    cfg = yaml.safe_load(bundled(f"demo/teacher-{args.teacher}.yaml").read_text())["model"]["config"]
    cfg.pop("model_type")
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    if args.hidden:
        cfg.update(hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                   head_dim=args.hidden // cfg["num_attention_heads"])
    needed = mqar_ranges(args.mqar_keys)[1].stop
    if args.drills == "mqar" and needed > cfg["vocab_size"]:  # before the world is built: minutes at gpu scale
        p.error(f"--mqar-keys {args.mqar_keys} needs {needed} token ids, the model has {cfg['vocab_size']}; use at "
                f"most {(cfg['vocab_size'] - 100) // 2} keys")
    t0 = time.time()
    device = torch.device(args.device)
    world = build_world(seed=0, scale=args.world, long_docs=0)  # the drills are made here, not read from the world
    tok = world.tokenizer
    tok_dir = Path(args.out).with_suffix(".tokenizer")  # for the drill workers
    tok.save_pretrained(tok_dir)
    # One id per text: the builder keeps a document's people disjoint, which a drill does not need.
    bios = [(f"b{i}", t) for i, t in enumerate(world.pretrain_texts)]
    chats = [(f"c{i}", t) for i, t in enumerate(_render_chats(tok, world.chats))]
    print(f"world built in {time.time() - t0:.0f} s; vocabulary {len(tok)}", flush=True)

    torch.manual_seed(args.seed)
    model = Qwen3ForCausalLM(Qwen3Config(**cfg, attn_implementation="sdpa")).to(device)
    forward = torch.compile(model) if args.compile else model  # scoring runs the eager model (other shapes)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01,
                            fused=device.type == "cuda")
    tasks = recall_items(tok, [int(x) for x in args.eval_lengths.split(",")], args.eval_items)
    pad_id = tok.pad_token_id

    pool = mp.get_context("spawn").Pool(args.workers, _init_worker, (str(tok_dir), bios, chats, args.drills,
                                                                         args.mqar_pairs, args.mqar_keys))
    jobs = ((args.seed * 10**9 + i, args.batch, args.seq_len) for i in range(10**9))
    heldout = pool.apply(_drills, ((-1 - args.seed, 64, args.seq_len),))  # seeds the training stream never uses
    stream = _prefetched(pool, jobs, depth=2 * args.workers)

    curve, step, tokens, total_steps, t_train = [], 0, 0, None, None
    answer_tokens = 0
    losses, answer_losses = [], []

    def lr_at(step):
        if total_steps is None:  # warm-up over the first 50 steps while the step time is measured
            return args.lr * min(1.0, (step + 1) / 50)
        warm = max(50, int(0.05 * total_steps))
        if step < warm:
            return args.lr * (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def evaluate():
        row = {"step": step, "tokens": tokens, "answer_tokens": answer_tokens,
               "elapsed_s": round(time.time() - t_train, 1) if t_train else 0.0,
               "loss": round(torch.stack(losses).mean().item(), 4) if losses else None,
               "answer_loss": round(torch.stack(answer_losses).mean().item(), 4) if answer_losses else None,
               "heldout_answer_tokens": round(heldout_accuracy(model, heldout, device, pad_id), 4),
               "recall": score(model, tasks, device, pad_id)}
        losses.clear(), answer_losses.clear()
        curve.append(row)
        recall = " ".join(f"{k} {v:.2f}" for k, v in row["recall"].items())
        print(f"step {row['step']:>6} tokens {row['tokens'] / 1e6:7.1f}M  {row['elapsed_s']:6.0f}s  loss {row['loss']}"
              f"  answers {row['answer_loss']}  held-out {row['heldout_answer_tokens']:.3f}  {recall}", flush=True)

    print(f"model {params / 1e6:.1f}M parameters, {cfg['num_hidden_layers']} layers; drills of {args.seq_len} "
          f"tokens ({args.drills}), batch {args.batch}, lr {args.lr}, loss on {args.loss}", flush=True)
    evaluate()
    t_train = time.time()
    while True:
        rows = next(stream)
        ids = torch.tensor([r[0] for r in rows], device=device)
        mask = torch.tensor([r[1] for r in rows], device=device)[:, 1:]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = forward(ids[:, :-1]).logits
        per_token = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        per_token = per_token.view_as(mask)
        answer_loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        loss = answer_loss if args.loss == "answers" else per_token.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += ids[:, :-1].numel()
        answer_tokens += int(mask.sum())
        losses.append(per_token.mean().detach())  # read at the next eval: no host sync per step
        answer_losses.append(answer_loss.detach())
        elapsed = time.time() - t_train
        if step == 20:
            t20 = elapsed
        if step == 50 and total_steps is None:
            total_steps = 50 + int((args.budget_s - elapsed) / ((elapsed - t20) / 30))
            print(f"{(elapsed - t20) / 30 * 1000:.0f} ms a step: {total_steps} steps in {args.budget_s:.0f} s",
                  flush=True)
        if step % args.eval_every == 0 or (total_steps and step >= total_steps) or elapsed > args.budget_s * 1.2:
            evaluate()
        if (total_steps and step >= total_steps) or elapsed > args.budget_s * 1.2:
            break
    pool.terminate()
    result = {"config": vars(args) | {"model": cfg, "parameters": params}, "curve": curve,
              "tokens_per_s": round(tokens / (time.time() - t_train)), **environment()}
    write_result(args.out, result)


if __name__ == "__main__":
    main()
