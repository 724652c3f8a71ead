"""Distillation throughput: tokens/s, model FLOPs per token, MFU and peak memory of every GenDistill stage objective,
through the real trainer (`gendistill.distill.train_stage`: same data, loop, optimiser, precision as a run), with the
throughput levers (stage settings) each on and off in the same process.

Rows: ce (the student alone), attn_align, hidden_align, kd, kd_completion (kd, completion-only mask on chat-shaped
data), at each --seq-lens (micro-batch = --tokens-per-micro / seq_len, one micro-batch per process per step unless a
lever needs more). Levers (stage settings, gendistill/distill/recipe.py "throughput"):
    baseline       the current path
    compile        compile: true (torch.compile of the decoder blocks, student and teacher)
    liger_kl       kd_kernel: liger_kl (our chunks, Liger-Kernel's fused KL loss-and-gradient kernel; CUDA)
    liger_jsd      kd_kernel: liger_jsd (Liger's whole fused linear JSD at beta = 0 = forward KL; CUDA)
    teacher_batch  teacher_batch_size: 2 micro-batches, teacher_inference_mode (two micro-batches per step)
    topk           kd_topk: 64 with a teacher cache: a first pass writes it (teacher runs), a second reads it (no
                   teacher); the KD term becomes the top-64 + tail KL (losses.py), so its loss is not comparable
    big_micro      twice the micro-batch with gradient checkpointing
    optimized      the levers of --optimized together ("auto": those whose single kd row beat baseline by > 2 %)
Each row reports the first step apart (kernel compilation, fla autotuning, torch.compile: a cold start), then the
median of the timed steps. --curves N: N steps of kd at the optimized settings against baseline from the same seed
and data, both loss curves in the JSON, and whether they end within noise. --profile ROWS: those rows under
torch.profiler (baseline and optimized): kernel time by category, the GPU's idle time, and MFU taken apart into
busy fraction x GEMM share x GEMM rate (bench/profiling.py), the answer to "what holds the step back".

    python bench/kd_step.py                                        # CPU, tiny shape, a smoke run
    python bench/kd_step.py --shape qwen3-0.6b --plan gpu          # one GPU: everything, within --budget-s
    torchrun --nproc-per-node 2 bench/kd_step.py --shape qwen3-0.6b --plan gpu2 --compare kd_step.json
Prints a table and writes JSON (command, GPU, versions, commit, date; one entry per row) after every row.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = Path(__file__).resolve().parent / "results"
# The CPU memory figure reads torch's private MemTracker (torch.distributed._tools): only on the torch CI pins.
MEMTRACKER_TORCH = "2.13."
START = time.perf_counter()  # --budget-s counts from here: imports and model building spend it too
SHAPES = {
    "tiny": dict(config=dict(vocab_size=384, hidden=64, layers=4, heads=4, kv_heads=2, head_dim=16, intermediate=128),
                 attention_layers=[0, 2], seq_lens=[32, 64], tokens_per_micro=128),
    # vocab large enough that the head dominates memory, as it does at 151k
    "small": dict(config=dict(vocab_size=32768, hidden=128, layers=4, heads=4, kv_heads=2, head_dim=32,
                              intermediate=384), attention_layers=[0, 2], seq_lens=[512], tokens_per_micro=1024),
    "qwen3-0.6b": dict(config=None, attention_layers=None, seq_lens=[2048, 4096], tokens_per_micro=16384),
}
ROWS = {  # the paper recipe's stages (recipes/paper.yaml): objective, trained groups, mask
    "ce": dict(objective="ce", train=["kda", "mlp", "norms"]),
    "attn_align": dict(objective="attn_align", train=["kda"]),
    "hidden_align": dict(objective="hidden_align", train=["kda"]),
    "kd": dict(objective="kd", train=["kda", "mlp", "norms"]),
    "kd_completion": dict(objective="kd", train=["kda", "mlp", "norms"], loss_mask="completion_only"),
}
LEVERS = {  # stage settings; "_accum": micro-batches per step; "_micro": micro-batch multiplier
    "baseline": {},
    "compile": {"compile": True},
    "liger_kl": {"kd_kernel": "liger_kl"},
    "liger_jsd": {"kd_kernel": "liger_jsd"},
    "teacher_batch": {"teacher_batch_size": "2x", "teacher_inference_mode": True, "_accum": 2},
    "topk": {"kd_topk": 64, "teacher_cache": "tmp"},
    "big_micro": {"gradient_checkpointing": True, "_micro": 2},
}
KD_ONLY = {"liger_kl", "liger_jsd", "topk"}
NEEDS_TEACHER = {"teacher_batch"}
PLANS = {  # --plan: what a GPU run measures (the flags override)
    "gpu": dict(rows=list(ROWS), levers=["compile", "liger_kl", "liger_jsd", "teacher_batch", "topk", "big_micro"],
                optimized="auto", curves=16, steps=4, warmup=2, hf=True, loss_memory=False, profile=["kd", "ce"]),
    "gpu2": dict(rows=list(ROWS), levers=[], optimized="compile,teacher_batch", curves=0, steps=4, warmup=2,
                 hf=False, loss_memory=False, profile=[]),
    # a smoke run (torch.compile's inductor takes minutes on a small CPU: `--levers compile` measures it there)
    "cpu": dict(rows=list(ROWS), levers=["teacher_batch", "topk"], optimized="teacher_batch", curves=4,
                steps=2, warmup=1, hf=True, loss_memory=False, profile=[]),
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


class Budget:
    """Wall-clock budget of the whole run: a job starts only while time is left (the GPU call has a hard limit)."""

    def __init__(self, seconds: float | None, start: float | None = None):
        self.start, self.seconds = start or time.perf_counter(), seconds

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (time.perf_counter() - self.start)


class Runner:
    def __init__(self, args, env, teacher, student, tmp: Path, results: dict):
        self.args, self.env, self.teacher, self.student = args, env, teacher, student
        self.tmp, self.results = tmp, results
        self.corpora = {}
        self.budget = Budget(args.budget_s, START)
        self.device_name = results["device"]
        from gendistill.distill.throughput import model_key

        self.model_key = model_key(teacher, student)

    # -- data --
    def corpus(self, chat: bool, tokens: int):
        from gendistill.distill import parallel
        from gendistill.distill.data import TokenCorpus
        from gendistill.distill.throughput import random_corpus

        name = "chat" if chat else "text"
        if name not in self.corpora:
            path = self.tmp / f"corpus-{name}"
            if self.env.is_main:
                random_corpus(path, self.student.config.vocab_size, tokens, chat=chat)
            parallel.barrier(self.env)
            self.corpora[name] = TokenCorpus(path)
        return self.corpora[name]

    def corpus_tokens(self) -> int:
        a = self.args
        longest = max(a.steps + a.warmup, a.curves) + 1
        return longest * 2 * 2 * a.tokens_per_micro * self.env.world + max(a.seq_lens) + 1  # x2 accum, x2 micro

    # -- one row --
    def stage_for(self, row: str, seq_len: int, lever_names: list[str], steps: int, lr: float = 1e-5) -> dict:
        micro = max(1, self.args.tokens_per_micro // seq_len)
        settings, accum = {}, 1
        for name in lever_names:
            for key, value in LEVERS[name].items():
                if key == "_accum":
                    accum = max(accum, value)
                elif key == "_micro":
                    micro *= value
                else:
                    settings[key] = value
        if settings.get("teacher_batch_size") == "2x":
            settings["teacher_batch_size"] = 2 * micro
        if settings.get("teacher_cache") == "tmp":
            settings["teacher_cache"] = str(self.tmp / "teacher_cache")
        # one name per row and length: the stage name seeds the data order, which every lever must share
        return {"name": f"{row}-{seq_len}", **ROWS[row], "steps": steps, "seq_len": seq_len,
                "batch_size": micro * accum * self.env.world, "micro_batch_size": micro, "lr": lr,
                "schedule": "constant", "checkpoint_every": 0, "chunk_tokens": self.args.chunk_tokens, **settings}

    def applicable(self, row: str, levers: list[str]) -> bool:
        kd = ROWS[row]["objective"] == "kd"
        return all((name not in KD_ONLY or kd) and (name not in NEEDS_TEACHER or row != "ce") for name in levers)

    def run_stage(self, stage: dict, out: Path, on_step=None) -> tuple[dict, list[dict]]:
        from gendistill.distill import train_stage

        if self.env.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.env.device)
        objective = stage["objective"]
        chat = stage.get("loss_mask") == "completion_only"
        summary = train_stage(stage, copy.deepcopy(self.student),
                              teacher=self.teacher if objective != "ce" else None,
                              data=self.corpus(chat, self.corpus_tokens()), out_dir=out, progress=False,
                              tensorboard=False, save=False, env=self.env, on_step=on_step)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return summary, records

    def measure(self, row: str, seq_len: int, lever_names: list[str], label: str | None = None) -> dict | None:
        label = label or "+".join(lever_names)
        entry = {"row": row, "seq_len": seq_len, "lever": label, "levers": lever_names}
        if not self.applicable(row, lever_names):
            return None
        if self.budget.left() < self.args.reserve_s:
            entry["skipped"] = "budget"
            self.add(entry)
            return entry
        a = self.args
        stage = self.stage_for(row, seq_len, lever_names, a.warmup + a.steps)
        entry.update(settings={k: v for k, v in stage.items() if k not in ("name", "steps", "lr", "schedule",
                                                                          "checkpoint_every")})
        t0 = time.perf_counter()
        try:
            passes = 2 if "topk" in lever_names else 1  # topk: the write pass, then the timed read pass
            for p in range(passes):
                summary, records = self.run_stage(stage, self.tmp / f"{stage['name']}-{label}-{p}")
                if p == 0 and passes == 2:
                    entry["write_pass_step_s"] = statistics.median(r["step_time_s"] for r in records[a.warmup:])
            timed = records[a.warmup:]
            step_s = statistics.median(r["step_time_s"] for r in timed)
            tokens = stage["batch_size"] * seq_len / self.env.world  # per process per step
            entry.update(self.flops(stage, tokens / step_s), tokens_per_s=tokens / step_s, step_time_s=step_s,
                         first_step_s=records[0]["step_time_s"], timed_steps=len(timed),
                         peak_memory_gib=summary["peak_memory_gib"], final_loss=records[-1]["loss"],
                         losses=[r["loss"] for r in records], wall_s=time.perf_counter() - t0)
        except Exception as err:  # one lever failing (an OOM, a missing kernel) must not lose the others
            entry.update(error=f"{type(err).__name__}: {str(err)[:2000]}", wall_s=time.perf_counter() - t0)
            if self.env.device.type == "cuda":
                torch.cuda.empty_cache()
        self.add(entry)
        return entry

    def profile(self, row: str, seq_len: int, lever_names: list[str], label: str) -> None:
        """--profile: torch.profiler over --profile-steps steps of a row, after --warmup unprofiled steps and one
        profiler warm-up step; where the step's time goes and MFU taken apart (bench/profiling.py)."""
        from profiling import attribute, holds_back, kernel_events, phase_ms, top_host_ops

        from gendistill.distill.throughput import peak_tflops

        a = self.args
        if not self.applicable(row, lever_names) or "topk" in lever_names:  # topk: two passes, not one profile
            return
        entry = {"row": row, "seq_len": seq_len, "lever": label, "levers": lever_names}
        if self.budget.left() < self.args.reserve_s:
            self.results["profiles"].append({**entry, "skipped": "budget"})
            return
        stage = self.stage_for(row, seq_len, lever_names, a.warmup + 1 + a.profile_steps)
        cuda = self.env.device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        schedule = torch.profiler.schedule(wait=a.warmup, warmup=1, active=a.profile_steps, repeat=1)
        try:
            with torch.profiler.profile(activities=activities, schedule=schedule) as prof:
                _, records = self.run_stage(stage, self.tmp / f"{stage['name']}-{label}-profile",
                                            on_step=lambda *_: prof.step())
            profiled = records[a.warmup + 1:]
            tokens = stage["batch_size"] * seq_len / self.env.world  # per process per step
            wall = sum(r["step_time_s"] for r in profiled)
            flops = self.flops(stage, tokens * len(profiled) / wall)
            entry.update(attribute(kernel_events(prof, self.env.device.type), wall, len(profiled),
                                   flops["flops_per_token"]["total"] * tokens, peak_tflops(self.device_name)),
                         unprofiled_step_s=statistics.median(r["step_time_s"] for r in records[1:a.warmup + 1])
                         if a.warmup > 1 else None, phases_ms=phase_ms(prof, self.env.device.type, len(profiled)),
                         top_host_ops=top_host_ops(prof))
            # kernels the profiler could not link to the operator that launched them (none expected)
            entry["phases_ms"]["unlinked"] = max(0.0, entry["kernel_ms"] - sum(entry["phases_ms"].values()))
            entry["holds_back"] = holds_back(entry)
        except Exception as err:  # a profile failing must not lose the measured rows
            entry["error"] = f"{type(err).__name__}: {str(err)[:2000]}"
        self.results["profiles"].append(entry)
        self.save()
        if self.env.is_main:
            print(f"profile {row} {seq_len} {label}: " + entry.get("holds_back", entry.get("error", "")), flush=True)

    def flops(self, stage: dict, tokens_per_s: float) -> dict:
        from gendistill.distill.recipe import parse_stage
        from gendistill.distill.throughput import flops_per_token, mfu, stage_key
        from gendistill.distill.trainer import align_layers, trainable_groups

        s = parse_stage(stage)
        model = self.student  # each row trains a copy; this one only lends its shapes and trained flags
        trainable_groups(model, s.train, s.freeze)
        stream = self.scored_fraction(s)
        parts = flops_per_token(model, self.teacher, s.objective, align_layers(s, model), s.seq_len, stream)
        model.requires_grad_(True)
        key = stage_key(s, self.model_key, self.device_name, self.env.world, s.micro_batch_size)
        return {"flops_per_token": parts, "scored_fraction": stream,
                "tflops_per_s": tokens_per_s * parts["total"] / 1e12,
                "mfu": mfu(tokens_per_s, parts["total"], self.device_name), "key": json.loads(json.dumps(key))}

    def scored_fraction(self, stage) -> float:
        from gendistill.distill.data import PackedStream

        corpus = self.corpus(stage.loss_mask == "completion_only", self.corpus_tokens())
        batch = PackedStream(corpus, stage.seq_len, 0, stage.loss_mask).batch(0, 8)
        return float(batch["loss_mask"].float().mean())

    def add(self, entry: dict) -> None:
        self.results["rows"].append(entry)
        self.save()
        if self.env.is_main:
            print(row_line(entry), flush=True)

    def save(self) -> None:
        if self.env.is_main:
            from gendistill.io import atomic_write_json

            atomic_write_json(self.args.out, self.results)

    # -- loss curves: optimized vs baseline, same data and seed --
    def curves(self, levers: list[str], seq_len: int) -> None:
        a = self.args
        if self.budget.left() < self.args.reserve_s + 45:
            self.results["curves"] = {"skipped": "budget"}
            return
        runs = {}  # the baseline twice: the repeat shows how far two identical runs drift (nondeterministic kernels)
        for label, names in (("baseline", []), ("baseline_repeat", []), ("optimized", levers)):
            stage = self.stage_for("kd", seq_len, names, a.curves, lr=a.curve_lr)
            stage["batch_size"] = 2 * stage["micro_batch_size"] * self.env.world  # both runs: two micro-batches/step
            if "teacher_batch_size" in stage:
                stage["teacher_batch_size"] = 2 * stage["micro_batch_size"]
            try:
                _, records = self.run_stage(stage, self.tmp / f"curve-{label}")
                runs[label] = [r["loss"] for r in records]
            except Exception as err:
                runs[label] = f"{type(err).__name__}: {str(err)[:2000]}"
        self.results["curves"] = {"seq_len": seq_len, "levers": levers, "lr": a.curve_lr, **runs,
                                  **compare_curves(runs.get("baseline"), runs.get("optimized"),
                                                   runs.get("baseline_repeat"))}
        self.save()
        if self.env.is_main:
            print(f"loss curves, {levers} vs baseline: {self.results['curves'].get('verdict')}", flush=True)


def compare_curves(base, opt, repeat=None) -> dict:
    """Whether two loss curves (same seed, same data) end within noise: the means of their last quarter differ by at
    most the larger of 2 standard errors of that mean (the per-step noise estimated from the baseline's step-to-step
    changes, which a slow trend barely moves) and twice the gap between two baseline runs (`repeat`: the drift of
    nondeterministic kernels, 0 where they are deterministic)."""
    if not all(isinstance(c, list) and len(c) == len(base or []) for c in (base, opt)) or len(base) < 4:
        return {"verdict": "not compared"}
    w = max(2, len(base) // 4)
    diffs = [b - a for a, b in zip(base[-w - 1:-1], base[-w:])]
    se = statistics.pstdev(diffs) / 2 ** 0.5 / len(diffs) ** 0.5  # a difference of two steps has twice the variance
    end = statistics.mean(base[-w:])
    gap = statistics.mean(opt[-w:]) - end
    repeat_gap = statistics.mean(repeat[-w:]) - end if isinstance(repeat, list) and len(repeat) == len(base) else 0.0
    tolerance = max(2 * se, 2 * abs(repeat_gap), 1e-6 * abs(end))
    return {"window": w, "final_window_gap": gap, "final_window_rel_gap": gap / end if end else None,
            "noise_se": se, "repeat_gap": repeat_gap, "tolerance": tolerance,
            "first_step_rel_diff": abs(opt[0] - base[0]) / max(abs(base[0]), 1e-12),
            "max_step_rel_diff": max(abs(o - b) / max(abs(b), 1e-12) for b, o in zip(base, opt)),
            "within_noise": abs(gap) <= tolerance,
            "verdict": ("within noise" if abs(gap) <= tolerance
                        else f"differs: gap {gap:.3g} > tolerance {tolerance:.3g}")}


def row_line(e: dict) -> str:
    if "skipped" in e:
        return f"{e['row']:<14}{e['seq_len']:>6}  {e['lever']:<28} skipped ({e['skipped']})"
    if "error" in e:
        return f"{e['row']:<14}{e['seq_len']:>6}  {e['lever']:<28} error: {e['error'][:150]}"
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)
    flops = (e.get("flops_per_token") or {}).get("total")
    return (f"{e['row']:<14}{e['seq_len']:>6}  {e['lever']:<28}{e['tokens_per_s']:>11.0f}{e['step_time_s']:>9.3f}"
            f"{e['first_step_s']:>9.1f}{fmt(flops and flops / 1e9, '.3g'):>9}{fmt(e.get('tflops_per_s'), '.3g'):>9}"
            f"{fmt(e.get('mfu') and 100 * e['mfu'], '.1f'):>7}{fmt(e.get('peak_memory_gib'), '.1f'):>8}")


HEADER = (f"{'row':<14}{'seq':>6}  {'lever':<28}{'tokens/s':>11}{'step s':>9}{'1st s':>9}{'GFLOP/t':>9}"
          f"{'TFLOP/s':>9}{'MFU %':>7}{'GiB':>8}")


def hf_ce_step_speed(student, corpus, seq_len, micro, steps, warmup, env) -> dict:
    """The usual fine-tuning step: model(input_ids, labels) with full logits, AdamW, same trainable groups."""
    from gendistill.distill.data import PackedStream
    from gendistill.distill.trainer import trainable_groups

    model = student.to(env.device, dtype=torch.float32).train()
    trainable_groups(model, ["kda", "mlp", "norms"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    stream = PackedStream(corpus, seq_len, seed=0, loss_mask="all")
    use_bf16 = env.device.type == "cuda"
    if use_bf16:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(env.device)
    times = []
    for step in range(warmup + steps):
        batch = {k: v.to(env.device) for k, v in stream.batch(step * micro, micro).items()}
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
    step_s = statistics.median(times[warmup:])
    return {"row": "hf_ce", "seq_len": seq_len, "lever": "transformers full logits", "tokens_per_s": micro * seq_len
            / step_s, "step_time_s": step_s, "first_step_s": times[0],
            "peak_memory_gib": torch.cuda.max_memory_allocated(env.device) / 2**30 if use_bf16 else None}


def loss_memory(tokens, hidden, vocab, chunk_tokens, device) -> dict:
    """Peak memory (MiB) of one KD loss forward+backward over `tokens` x `vocab` beyond its inputs, chunked vs from
    full logits (CUDA: the caching allocator's peak; CPU: live tensor storage, torch's MemTracker)."""
    from gendistill.distill.losses import HeadLoss, chunked_head_loss, naive_head_loss

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    out = {"tokens": tokens, "vocab": vocab, "chunk_tokens": chunk_tokens}
    for name, fn in (("chunked", chunked_head_loss), ("full_logits", naive_head_loss)):
        inputs = (make(tokens, hidden).requires_grad_(), make(vocab, hidden) * 0.05, make(tokens, hidden),
                  make(vocab, hidden) * 0.05, torch.randint(0, vocab, (tokens,), generator=g).to(device))
        spec = HeadLoss({"kd": 1.0}, chunk_tokens=chunk_tokens)
        t0 = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            fn(*inputs, spec, scale=1 / tokens)[0].backward()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated(device) - base
        elif not torch.__version__.startswith(MEMTRACKER_TORCH):
            warnings.warn(f"kd_step: the CPU peak of the head losses is measured with torch's private MemTracker, "
                          f"checked on torch {MEMTRACKER_TORCH}x only (found {torch.__version__}): not measured")
            peak = None
        else:
            from torch.distributed._tools.mem_tracker import MemTracker

            tracker = MemTracker()
            tracker.track_external(*inputs)
            with tracker:
                fn(*inputs, spec, scale=1 / tokens)[0].backward()
            peak = tracker.get_tracker_snapshot("peak")[device]["Total"] - sum(x.numel() * x.element_size()
                                                                             for x in inputs)
        out[name] = {"peak_extra_mib": None if peak is None else peak / 2**20, "time_s": time.perf_counter() - t0}
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--plan", choices=sorted(PLANS), help="defaults for a whole run (flags below override)")
    p.add_argument("--rows", help=f"comma-separated rows of {', '.join(ROWS)}")
    p.add_argument("--seq-lens", help="comma-separated sequence lengths (default: the shape's)")
    p.add_argument("--tokens-per-micro", type=int, help="tokens per micro-batch: micro-batch = this / seq_len")
    p.add_argument("--levers", help=f"single levers measured on the kd row at the first seq_len, of "
                                    f"{', '.join(k for k in LEVERS if k != 'baseline')}")
    p.add_argument("--optimized", help="levers of the optimized rows: a comma list, 'auto' (the single levers that "
                                       "beat baseline by > 2 %%), 'none', or 'from:RESULT.json' (that run's choice)")
    p.add_argument("--curves", type=int, help="steps of the loss-curve check (0: off)")
    p.add_argument("--curve-lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, help="timed steps per row (median)")
    p.add_argument("--warmup", type=int, help="untimed steps per row (the first is reported as first_step_s)")
    p.add_argument("--profile", help="comma-separated rows to profile at the first seq_len, baseline and optimized "
                                     "(bench/profiling.py: kernel time by category, MFU taken apart)")
    p.add_argument("--profile-steps", type=int, default=2, help="profiled steps per profile")
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--hf", action=argparse.BooleanOptionalAction, help="the transformers full-logits CE row")
    p.add_argument("--loss-memory", action=argparse.BooleanOptionalAction,
                   help="peak memory of the KD loss alone, chunked vs full logits")
    p.add_argument("--budget-s", type=float, help="stop starting rows when this much wall time is spent")
    p.add_argument("--reserve-s", type=float, default=25.0, help="time a row needs at least (with --budget-s)")
    p.add_argument("--compare", type=Path, help="a one-process result: per-row scaling efficiency of this run")
    p.add_argument("--export-fla-configs", type=Path, metavar="DIR",
                   help="after the rows: write the fla kernel configs autotuning chose (gendistill.kernels.cache)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    plan = PLANS[args.plan or ("cpu" if args.shape != "qwen3-0.6b" else "gpu")]
    spec = SHAPES[args.shape]
    args.rows = args.rows.split(",") if args.rows else plan["rows"]
    args.seq_lens = [int(x) for x in args.seq_lens.split(",")] if args.seq_lens else spec["seq_lens"]
    args.tokens_per_micro = args.tokens_per_micro or spec["tokens_per_micro"]
    args.levers = [x for x in (args.levers.split(",") if args.levers is not None else plan["levers"]) if x]
    args.optimized = args.optimized or plan["optimized"]
    args.profile = [x for x in (args.profile.split(",") if args.profile is not None else plan["profile"]) if x]
    for key in ("curves", "steps", "warmup", "hf", "loss_memory"):
        if getattr(args, key) is None:
            setattr(args, key, plan[key])
    unknown = [x for x in args.rows + args.profile if x not in ROWS] + [x for x in args.levers if x not in LEVERS]
    if unknown:
        p.error(f"unknown rows/levers: {unknown}")
    return args


def choose_optimized(spec: str, rows: list[dict], seq_len: int) -> list[str]:
    if spec == "none":
        return []
    if spec.startswith("from:"):
        return json.loads(Path(spec[5:]).read_text()).get("optimized", [])
    if spec != "auto":
        return [x for x in spec.split(",") if x]
    base = next((r for r in rows if r["row"] == "kd" and r["seq_len"] == seq_len and r["lever"] == "baseline"
                 and "tokens_per_s" in r), None)
    if base is None:
        return []
    # levers that change the loss (topk) or trade memory (big_micro) are reported, never chosen by speed alone
    return [r["lever"] for r in rows if r["row"] == "kd" and r["seq_len"] == seq_len and "tokens_per_s" in r
            and r["lever"] in LEVERS and r["lever"] not in ("baseline", "topk", "big_micro")
            and r["tokens_per_s"] > 1.02 * base["tokens_per_s"]]


def main(argv=None) -> int:
    args = parse_args(argv)
    from gendistill.kernels.cache import configure_for_cuda

    kernels = configure_for_cuda()  # before fla is imported: where compiled kernels and autotuning results go
    from gendistill.distill import parallel
    from gendistill.distill.throughput import FORMULA, peak_tflops
    from gendistill.kda import fla_available

    env = parallel.setup()
    name = "kd_step" + (f"_x{env.world}" if env.world > 1 else "") + ".json"
    args.out = args.out or RESULTS / env.device.type / name
    device = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    t_build = time.perf_counter()
    teacher, student = build_models(args.shape, env.device)
    from common import environment

    results = {"environment": environment(), "shape": args.shape, "device": device, "world_size": env.world,
               "kernel_cache": kernels, "kernel_cache_cold": kernels["triton_cache_files"] == 0,
               "peak_tflops_bf16": peak_tflops(device), "flops_formula": FORMULA,
               "vocab": teacher.config.vocab_size, "hidden": teacher.config.hidden_size,
               "layers": teacher.config.num_hidden_layers, "attention_layers": student.config.attention_layers,
               "kda_backend": "fla" if fla_available() else "torch",
               "precision": "bf16 autocast" if env.device.type == "cuda" else "fp32",
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "model_build_s": time.perf_counter() - t_build, "rows": [], "profiles": []}
    tmp = Path(parallel.broadcast_object(env, tempfile.mkdtemp(prefix="kd_step.") if env.is_main else None))
    runner = Runner(args, env, teacher, student, tmp, results)
    if env.is_main:
        print(f"distillation step: {args.shape}, {device} x {env.world}, KDA {results['kda_backend']}, "
              f"{results['precision']}, {args.tokens_per_micro} tokens per micro-batch\n{HEADER}", flush=True)
    first, rest = args.seq_lens[0], args.seq_lens[1:]
    try:
        # Priority order: the GPU call has a hard time limit (and a cold first step may take minutes), so the
        # baseline of every objective comes first, then the levers (torch.compile, the slowest to set up, last),
        # the optimized rows and the loss curves, then the second sequence length.
        runner.measure("kd", first, ["baseline"])  # its first step is the process's cold start
        results["cold_start_first_step_s"] = results["rows"][-1].get("first_step_s")
        export_configs(args, env, results, device)  # now: every KDA kernel of training has been autotuned
        for row in args.rows:
            if row != "kd":
                runner.measure(row, first, ["baseline"])
        for row in args.profile:  # early: a few steps each, and the answer to what holds the baseline back
            runner.profile(row, first, ["baseline"], "baseline")
        for lever in sorted(args.levers, key=lambda name: name == "compile"):
            runner.measure("kd", first, [lever])
        optimized = choose_optimized(args.optimized, results["rows"], first)
        results["optimized"] = optimized

        def measure_optimized(row, seq):
            usable = [x for x in optimized if runner.applicable(row, [x])]
            if usable:
                runner.measure(row, seq, usable, "optimized")
        if optimized:
            measure_optimized("kd", first)
        if args.curves and optimized:
            runner.curves(optimized, first)
        for row in args.profile:
            usable = [x for x in optimized if runner.applicable(row, [x])]
            if usable:
                runner.profile(row, first, usable, "optimized")
        for row in args.rows:
            if optimized and row != "kd":
                measure_optimized(row, first)
        for seq in rest:
            for row in args.rows:
                runner.measure(row, seq, ["baseline"])
                if optimized:
                    measure_optimized(row, seq)
        if args.hf and env.world == 1 and runner.budget.left() > args.reserve_s:
            micro = max(1, args.tokens_per_micro // first)
            corpus = runner.corpus(False, runner.corpus_tokens())
            try:
                runner.add(hf_ce_step_speed(copy.deepcopy(student), corpus, first, micro, args.steps, args.warmup,
                                            env))
            except Exception as err:
                runner.add({"row": "hf_ce", "seq_len": first, "lever": "transformers full logits",
                            "error": f"{type(err).__name__}: {err}"})
        if args.loss_memory and env.is_main and runner.budget.left() > args.reserve_s:
            tokens = max(args.tokens_per_micro, 4 * args.chunk_tokens)  # at least 4 chunks: what chunking saves
            results["loss_memory"] = loss_memory(tokens, teacher.config.hidden_size, teacher.config.vocab_size,
                                                 args.chunk_tokens, env.device)
        if args.compare:
            scaling(results, json.loads(args.compare.read_text()))
        export_configs(args, env, results, device)
        results["wall_s"] = time.perf_counter() - runner.budget.start
        runner.save()
    finally:
        parallel.barrier(env)
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    if env.is_main:
        summary(results)
    parallel.shutdown()
    return 0


def export_configs(args, env, results: dict, device: str) -> None:
    """--export-fla-configs: the fla kernel configs this process's autotuning chose, as pinned configs."""
    if args.export_fla_configs and env.is_main and env.device.type == "cuda":
        from gendistill.kernels.cache import export_fla_configs

        try:
            results["fla_configs_exported"] = export_fla_configs(args.export_fla_configs, device)
        except Exception as err:  # the measurements matter more than the export
            results["fla_configs_exported"] = f"{type(err).__name__}: {err}"


def scaling(results: dict, single: dict) -> None:
    """Per row: tokens/s per device here over the one-process tokens/s of the same row (the scaling efficiency)."""
    one = {(r["row"], r["seq_len"], r["lever"]): r["tokens_per_s"] for r in single.get("rows", [])
           if "tokens_per_s" in r}
    for r in results["rows"]:
        ref = one.get((r["row"], r["seq_len"], r["lever"]))
        if ref and "tokens_per_s" in r:
            r["scaling_efficiency"] = r["tokens_per_s"] / ref


def summary(results: dict) -> None:
    print(f"\nwall {results.get('wall_s', 0):.0f} s; optimized = {results.get('optimized')}; "
          f"cold start (first kd step): {results.get('cold_start_first_step_s')}; "
          f"curves: {results.get('curves', {}).get('verdict')}")
    for r in results["rows"]:
        if "scaling_efficiency" in r:
            print(f"  scaling {r['row']} {r['seq_len']} {r['lever']}: {100 * r['scaling_efficiency']:.1f} %")
    if "loss_memory" in results and results["loss_memory"]["chunked"]["peak_extra_mib"] is not None:
        m = results["loss_memory"]
        print(f"KD loss alone, {m['tokens']} tokens x vocab {m['vocab']}: chunked {m['chunked']['peak_extra_mib']:.0f}"
              f" MiB, full logits {m['full_logits']['peak_extra_mib']:.0f} MiB beyond the inputs")
    print(f"formula: {results['flops_formula']}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
