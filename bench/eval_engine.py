"""Batched generation engine vs one-by-one `model.generate` on the same items (greedy, same max_new_tokens).

    python bench/eval_engine.py                                   # tiny teacher + student, CPU
    python bench/eval_engine.py --shape qwen3-0.6b --device cuda --dtype bfloat16 \
        --out bench/results/h200/eval_engine.json
Prompts are the chat-formatted multiple-choice items an eval runs (tiny shape: real text through the tiny tokenizer;
0.6B shape: random token ids of the same lengths, as its vocabulary has no tokenizer here). Every batched output is
checked against the one-by-one output. With `--check-dtype float32` (use it for 16-bit timing on GPU) that check runs
in float32 on `--check-items` items: in bfloat16, different kernels for different batch shapes (cuBLAS algorithms, fla's
recurrent kernel for short prompts vs its chunked one for padded batches) round differently, and random weights make
near-ties in the greedy choice common, so 16-bit agreement is only reported, not required.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import environment, print_table, write_result  # noqa: E402
from gendistill import convert  # noqa: E402
from gendistill.evaluation.engine import generate  # noqa: E402
from gendistill.evaluation.tasks import Task, build_context  # noqa: E402
from gendistill.testing import qwen3_0_6b_config, tiny_qwen3, tiny_tokenizer  # noqa: E402
from transformers import Qwen3ForCausalLM  # noqa: E402


class IdTokenizer:
    """Just what the engine needs for token-id prompts on a model without a local tokenizer."""

    def __init__(self, eos_token_id: int, pad_token_id: int):
        self.eos_token_id, self.pad_token_id, self.bos_token = eos_token_id, pad_token_id, None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def prompts_for(tokenizer, n: int) -> list[str]:
    rng = random.Random(0)
    names = ["Alice Moreau", "Bruno Keller", "Helix Labs", "the University of Geneva", "Lyon", "Basel", "Zurich"]
    items = [{"id": str(i), "question": f"Where did {rng.choice(names)} study {'and work ' * rng.randrange(4)}?",
              "choices": rng.sample(names, 4), "answer": 0} for i in range(n)]
    task = Task(name="bench", kind="multiple_choice", prompt="Question: {question}\n{choices}Answer:", items=items)
    return [build_context(task, item, tokenizer) for item in items]


def one_by_one(model, rows: list[list[int]], max_new_tokens: int, pad_id: int, eos_id: int) -> list[list[int]]:
    outs = []
    for row in rows:
        input_ids = torch.tensor([row], device=model.device)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id)
        ids = out[0, len(row):].tolist()
        outs.append(ids[: ids.index(eos_id)] if eos_id in ids else ids)
    return outs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("tiny", "qwen3-0.6b"), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", default="16,64")
    p.add_argument("--check-dtype", help="dtype of the exactness check (default: --dtype, on the timed outputs)")
    p.add_argument("--check-items", type=int, default=16, help="items of the exactness check with --check-dtype")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default="bench/results/cpu/eval_engine.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.shape == "tiny":
        teacher = tiny_qwen3(seed=1)
        tokenizer = tiny_tokenizer()
        rows = [tokenizer(t)["input_ids"] for t in prompts_for(tokenizer, args.items)]
    else:
        config = qwen3_0_6b_config()
        config._attn_implementation = "sdpa"
        teacher = Qwen3ForCausalLM(config).eval()
        tokenizer = IdTokenizer(config.eos_token_id, config.pad_token_id)
        lengths = [len(r) for r in [tiny_tokenizer()(t)["input_ids"] for t in prompts_for(tiny_tokenizer(), args.items)]]
        gen = torch.Generator().manual_seed(0)
        rows = [torch.randint(0, 150_000, (n,), generator=gen).tolist() for n in lengths]
    models = {"teacher (Qwen3)": teacher, "student (Hybrid-KDA)": convert(teacher)}
    results, checks = [], []
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    largest = max(batch_sizes)
    for name, model in models.items():
        with torch.no_grad():
            if args.check_dtype:
                print(f"{name}: exactness check in {args.check_dtype}, {args.check_items} items", flush=True)
                model.to(args.device, getattr(torch, args.check_dtype)).eval()
                subset = rows[: args.check_items]
                reference = one_by_one(model, subset, args.max_new_tokens, pad, eos)
                outs = generate(model, tokenizer, subset, max_new_tokens=args.max_new_tokens, batch_size=largest,
                                progress=False)
                checks.append({"model": name, "dtype": args.check_dtype, "items": len(subset), "batch_size": largest,
                               "mismatches": sum(o.token_ids != r for o, r in zip(outs, reference))})
                print(f"  {checks[-1]['mismatches']} of {len(subset)} differ", flush=True)
            model.to(args.device, dtype).eval()
            one_by_one(model, rows[:2], 4, pad, eos)  # warm-up
            start = time.perf_counter()
            reference = one_by_one(model, rows, args.max_new_tokens, pad, eos)
            sequential_s = time.perf_counter() - start
            print(f"{name}: one by one {sequential_s:.1f} s", flush=True)
            for batch_size in batch_sizes:
                # warm-up at this batch shape (fla autotunes, the allocator grows), untimed
                generate(model, tokenizer, rows[:batch_size], max_new_tokens=2, batch_size=batch_size, progress=False)
                start = time.perf_counter()
                outs = generate(model, tokenizer, rows, max_new_tokens=args.max_new_tokens, batch_size=batch_size,
                                progress=False)
                batched_s = time.perf_counter() - start
                mismatches = sum(o.token_ids != r for o, r in zip(outs, reference))
                results.append({"model": name, "batch_size": batch_size, "items": len(rows),
                                "new_tokens": sum(len(r) for r in reference),
                                "one_by_one_s": round(sequential_s, 3), "engine_s": round(batched_s, 3),
                                "speedup": round(sequential_s / batched_s, 2),
                                "engine_items_per_s": round(len(rows) / batched_s, 2), "mismatches": mismatches})
                print(f"  batch {batch_size}: {batched_s:.2f} s ({sequential_s / batched_s:.1f}x)", flush=True)
        model.to("cpu")
        write_result(args.out, {"benchmark": "eval_engine", "status": "partial", "results": results,
                                "exactness_check": checks})
    print_table(results, ["model", "batch_size", "items", "new_tokens", "one_by_one_s", "engine_s", "speedup",
                          "engine_items_per_s", "mismatches"])
    env = environment()
    env.update(threads=torch.get_num_threads(), shape=args.shape, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
               mean_prompt_tokens=round(sum(map(len, rows)) / len(rows), 1))
    if checks:
        print_table(checks, ["model", "dtype", "items", "batch_size", "mismatches"])
    write_result(args.out, {"benchmark": "eval_engine", "environment": env, "results": results,
                            "exactness_check": checks or "on the timed outputs (mismatches column)"})
    if any(r["mismatches"] for r in (checks or results)):
        print("batched outputs differ from one-by-one outputs", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
