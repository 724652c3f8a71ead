"""KD-step throughput against plain CE fine-tuning of the student alone on the same batches, and the memory of the
vocabulary-sized KD loss computed chunked (gendistill) vs from full logits.

Both steps run through the real trainer (`gendistill.distill.train_stage`, same data, loop, optimiser, precision);
only the objective differs: `kd` (teacher forward + forward KL) or `ce` (student alone). A third row is the usual
Hugging Face fine-tuning step (`model(input_ids, labels=...)`, full logits) for reference.

    python bench/kd_step.py                                  # CPU, small shape
    python bench/kd_step.py --shape qwen3-0.6b               # one GPU, Qwen3-0.6B -> Hybrid-KDA (7 attention layers)
    torchrun --nproc-per-node 2 bench/kd_step.py --shape qwen3-0.6b   # FSDP2; tokens/s are per GPU

Prints a table and writes bench/results/<device>/kd_step[_xN].json (N GPUs) unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {
    # vocab large enough that the head dominates memory, as it does at 151k
    "small": dict(config=dict(vocab_size=32768, hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32,
                              intermediate=384), attention_layers=[0, 2], seq_len=512, micro_batch=2),
    "qwen3-0.6b": dict(config=None, attention_layers=None, seq_len=2048, micro_batch=8),
}


def build_models(shape: str, device: torch.device):
    """Random teacher of the shape and its converted student, built directly on `device` (no CPU init of 0.6B)."""
    from transformers import Qwen3ForCausalLM

    from gendistill.convert import convert
    from gendistill.testing import qwen3_0_6b_config, tiny_qwen3_config

    spec = SHAPES[shape]
    config = qwen3_0_6b_config() if spec["config"] is None else tiny_qwen3_config(**spec["config"])
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with device:  # random weights: speed and memory do not depend on their values
        teacher = Qwen3ForCausalLM(config).eval()
        student = convert(teacher, attention_layers=spec["attention_layers"])
    return teacher, student


def random_corpus(directory: Path, vocab: int, tokens: int, seed: int = 0):
    """Documents of random tokens with realistic lengths, so packing and per-document resets are exercised."""
    from gendistill.distill.data import write_corpus

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.geometric(1 / 1500, size=tokens // 200 + 1), 16, None)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), tokens)) + 1]
    data = rng.integers(3, vocab, size=int(lengths.sum()))
    return write_corpus(directory, data, np.ones_like(data), lengths, {"kind": "text"})


def trainer_step_speed(objective: str, teacher, student, corpus, args, env, out: Path) -> dict:
    from gendistill.distill import train_stage

    stage = {"name": objective, "objective": objective, "steps": args.warmup + args.steps, "seq_len": args.seq_len,
             "batch_size": args.micro_batch * env.world, "micro_batch_size": args.micro_batch, "lr": 1e-5,
             "schedule": "constant", "train": ["kda", "mlp", "norms"], "chunk_tokens": args.chunk_tokens,
             "gradient_checkpointing": args.gradient_checkpointing, "checkpoint_every": 0}
    if env.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(env.device)
    summary = train_stage(stage, student, teacher=teacher if objective == "kd" else None, data=corpus,
                          out_dir=out / objective, progress=False, tensorboard=False, save=False, env=env)
    records = [json.loads(line) for line in open(out / objective / "metrics.jsonl")][args.warmup:]
    step_s = statistics.median(r["step_time_s"] for r in records)
    tokens = args.micro_batch * args.seq_len  # per process per step
    return {"tokens_per_s_per_device": tokens / step_s, "step_time_s": step_s,
            "peak_memory_gib": summary["peak_memory_gib"], "final_loss": records[-1]["loss"]}


def hf_ce_step_speed(student, corpus, args, env) -> dict:
    """The usual fine-tuning step: model(input_ids, labels) with full logits, AdamW, same trainable groups."""
    from gendistill.distill.data import PackedStream
    from gendistill.distill.trainer import trainable_groups

    model = student.to(env.device, dtype=torch.float32).train()
    trainable_groups(model, ["kda", "mlp", "norms"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    stream = PackedStream(corpus, args.seq_len, seed=0, loss_mask="all")
    use_bf16 = env.device.type == "cuda"
    if use_bf16:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(env.device)
    times = []
    for step in range(args.warmup + args.steps):
        batch = {k: v.to(env.device) for k, v in stream.batch(step * args.micro_batch, args.micro_batch).items()}
        labels = torch.where(batch["loss_mask"], batch["targets"], -100)
        t0 = time.perf_counter()
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # synchronise
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[args.warmup:])
    return {"tokens_per_s_per_device": args.micro_batch * args.seq_len / step_s, "step_time_s": step_s,
            "peak_memory_gib": torch.cuda.max_memory_allocated(env.device) / 2**30 if use_bf16 else None}


# ---- memory of the KD loss alone (forward + backward), chunked vs full logits ----

def _loss_inputs(tokens, hidden, vocab, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return (make(tokens, hidden).requires_grad_(), make(vocab, hidden) * 0.05, make(tokens, hidden),
            make(vocab, hidden) * 0.05, torch.randint(0, vocab, (tokens,), generator=g).to(device))


def _run_loss(variant, inputs, chunk_tokens):
    from gendistill.distill.losses import HeadLoss, chunked_head_loss, naive_head_loss

    fn = chunked_head_loss if variant == "chunked" else naive_head_loss
    loss, _ = fn(*inputs, HeadLoss({"kd": 1.0}, chunk_tokens=chunk_tokens), scale=1 / inputs[0].shape[0])
    loss.backward()
    return float(loss.detach())


def loss_memory(variant, tokens, hidden, vocab, chunk_tokens, device) -> dict:
    """Peak memory (MiB) of one KD loss forward+backward over `tokens` x `vocab`, beyond its inputs. CUDA: the caching
    allocator's peak; CPU: the peak of live tensor storage, tracked op by op (torch's MemTracker)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    inputs = _loss_inputs(tokens, hidden, vocab, device, dtype)
    input_bytes = sum(x.numel() * x.element_size() for x in inputs)
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        _run_loss(variant, inputs, chunk_tokens)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(*inputs)
        with tracker:
            _run_loss(variant, inputs, chunk_tokens)
        peak = tracker.get_tracker_snapshot("peak")[device]["Total"] - input_bytes
    return {"peak_extra_mib": peak / 2**20, "time_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--micro-batch", type=int, help="sequences per device per step")
    p.add_argument("--steps", type=int, default=5, help="measured steps (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--loss-tokens", type=int,
                   help="tokens in the loss-memory comparison (default: one micro-batch, at least 4 chunks)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face full-logits CE row")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.seq_len = args.seq_len or SHAPES[args.shape]["seq_len"]
    args.micro_batch = args.micro_batch or SHAPES[args.shape]["micro_batch"]

    from gendistill.distill import parallel
    from gendistill.kda import fla_available

    env = parallel.setup()
    teacher, student = build_models(args.shape, env.device)
    vocab, hidden = teacher.config.vocab_size, teacher.config.hidden_size
    try:  # bench/common.py: the environment record shared by the benchmark scripts
        from common import environment
        results = {"environment": environment()}
    except ImportError:
        results = {}
    results |= {"shape": args.shape, "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda"
               else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
               "world_size": env.world, "seq_len": args.seq_len, "micro_batch": args.micro_batch,
               "vocab": vocab, "hidden": hidden, "layers": teacher.config.num_hidden_layers,
               "attention_layers": student.config.attention_layers,
               "kda_backend": "fla" if fla_available() else "torch",
               "precision": "bf16 autocast" if env.device.type == "cuda" else "fp32", "torch": torch.__version__}
    # one scratch directory for all processes (the corpus is written once, by rank 0)
    tmp = Path(parallel.broadcast_object(env, tempfile.mkdtemp(prefix="kd_step.") if env.is_main else None))
    try:
        if env.is_main:
            random_corpus(tmp / "corpus", vocab, (args.warmup + args.steps + 1) * args.micro_batch * env.world
                          * args.seq_len + 1)
        parallel.barrier(env)
        from gendistill.distill.data import TokenCorpus
        corpus = TokenCorpus(tmp / "corpus")
        results["kd"] = trainer_step_speed("kd", teacher, copy.deepcopy(student), corpus, args, env, tmp)
        results["ce"] = trainer_step_speed("ce", None, copy.deepcopy(student), corpus, args, env, tmp)
        if env.world == 1 and not args.no_hf:
            results["hf_ce"] = hf_ce_step_speed(copy.deepcopy(student), corpus, args, env)
    finally:
        parallel.barrier(env)
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    del teacher, student
    results["kd_over_ce"] = results["kd"]["tokens_per_s_per_device"] / results["ce"]["tokens_per_s_per_device"]
    if "hf_ce" in results:
        results["kd_over_hf_ce"] = (results["kd"]["tokens_per_s_per_device"]
                                    / results["hf_ce"]["tokens_per_s_per_device"])
    if env.is_main:
        n = args.loss_tokens or max(args.micro_batch * args.seq_len, 4 * args.chunk_tokens)
        results["loss_memory"] = {"tokens": n, "vocab": vocab, "chunk_tokens": args.chunk_tokens,
                                  "chunked": loss_memory("chunked", n, hidden, vocab, args.chunk_tokens, env.device),
                                  "full_logits": loss_memory("naive", n, hidden, vocab, args.chunk_tokens, env.device)}
        report(results)
        name = "kd_step" + (f"_x{env.world}" if env.world > 1 else "") + ".json"
        out = args.out or RESULTS / env.device.type / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")
    parallel.shutdown()
    return 0


def report(r: dict) -> None:
    gib = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    print(f"\nKD step vs CE fine-tuning: {r['shape']} ({r['layers']} layers, vocab {r['vocab']}), "
          f"{r['micro_batch']} x {r['seq_len']} tokens per device, {r['world_size']} device(s) {r['device']}, "
          f"KDA {r['kda_backend']}, {r['precision']}")
    print(f"{'step':<38}{'tokens/s/device':>16}{'step s':>10}{'peak GiB':>10}")
    rows = [("KD (teacher fwd + student, chunked)", r["kd"]), ("CE, student alone (same trainer)", r["ce"])]
    if "hf_ce" in r:
        rows.append(("CE, student alone (HF, full logits)", r["hf_ce"]))
    for label, x in rows:
        print(f"{label:<38}{x['tokens_per_s_per_device']:>16.0f}{x['step_time_s']:>10.3f}"
              f"{gib(x['peak_memory_gib']):>10}")
    print(f"tokens/s ratio KD / CE (same trainer): {r['kd_over_ce']:.3f}"
          + (f";  KD / HF CE: {r['kd_over_hf_ce']:.3f}" if "kd_over_hf_ce" in r else ""))
    m = r["loss_memory"]
    print(f"\nKD loss alone, forward+backward, {m['tokens']} tokens x vocab {m['vocab']} "
          f"(chunks of {m['chunk_tokens']}): peak memory beyond its inputs")
    for label in ("chunked", "full_logits"):
        print(f"  {label:<12} {m[label]['peak_extra_mib']:>10.1f} MiB  {m[label]['time_s']:.3f} s")


if __name__ == "__main__":
    sys.exit(main())
