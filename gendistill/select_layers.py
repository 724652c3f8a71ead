"""`gendistill select-layers`: beam search for the layers that keep softmax attention, for a budget (e.g. 7 of 28).

Each candidate set is scored by a probe on a model where only the set's layers keep attention:
- cheap (default): the teacher itself with attention taken out of the other layers by hooks, as the paper's
  analysis code does with its head mask: `zero` (the attention output is zeroed: the layer's mixer is a no-op) or
  `local` (sliding-window attention of `window` tokens: a stand-in for a recurrent mixer that sees only the recent
  past; it works with the KV cache too, so generation probes can use it);
- `kl`: the set is really converted (`--mixer`: KDA by default, or GDN/GLA/Mamba2 in the other layers), aligned
  for a few steps (attn_align), and scored by the negative KL(teacher || student) on held-out text.
Probes: `recall` (default, the paper's: associative recall in the model's own tokens, exact match of the greedy
answer computed by teacher forcing, ties broken by the answer's log-likelihood), `task` (generation accuracy on a
task YAML, gendistill.evaluation), `kl`.

Search: `direction add` starts from no attention layer and adds one per step (budget steps); `remove` starts from
all and drops one per step. Each step expands every beam member by one layer and keeps the best `beam` unique sets;
after `depth` steps the beam narrows to 1 (greedy completion), so depth trades cost for search. Every candidate's
score is cached in OUT/cache.json (a rerun or a wider search scores nothing twice). Outputs: OUT/selection.json
(the chosen set first, the whole search tree, evenly spaced and random baselines of the same size), OUT/search.png.
`gendistill convert --attention-layers OUT/selection.json` takes the result directly.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch

from gendistill.io import UserError, atomic_write_json

Key = tuple[int, ...]
MASKS = ("zero", "local")
PROBES = ("recall", "task", "kl")


# ------------------------------------------------------------------------------------------------------------------
# attention taken out of the teacher

def band_mask(q_len: int, kv_len: int, window: int, device) -> torch.Tensor:
    """[1, 1, q, kv] bool: query i (absolute position kv_len - q_len + i) sees keys j with 0 <= i - j < window."""
    q = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k = torch.arange(kv_len, device=device)[None, :]
    return ((k <= q) & (q - k < window))[None, None]


@contextlib.contextmanager
def masked_attention(model, keep: Key, mode: str = "zero", window: int = 64):
    """Inside the block, the attention of every layer outside `keep` is zeroed (`zero`) or limited to the last
    `window` tokens (`local`, KV cache included). Hooks only: the weights are untouched."""
    if mode not in MASKS:
        raise UserError(f"--mask: expected one of {MASKS}, got {mode!r}")
    impl = getattr(model.config, "_attn_implementation", None)
    if mode == "local" and impl not in (None, "sdpa", "eager"):
        raise UserError(f"--mask local needs sdpa or eager attention (the model uses {impl!r})")

    def zero(module, args, output):
        return (torch.zeros_like(output[0]), *output[1:]) if isinstance(output, tuple) else torch.zeros_like(output)

    def local(module, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        mask, cache = kwargs.get("attention_mask"), kwargs.get("past_key_values")
        q_len = x.shape[1]
        if isinstance(mask, torch.Tensor):
            kv_len = mask.shape[-1]
        else:
            kv_len = q_len + (cache.get_seq_length(module.layer_idx) if cache is not None else 0)
        band = band_mask(q_len, kv_len, window, x.device)
        if mask is None:
            mask = band
        elif mask.dtype == torch.bool:
            mask = mask & band
        else:  # eager's additive float mask
            mask = mask.masked_fill(~band, torch.finfo(mask.dtype).min)
        kwargs["attention_mask"] = mask
        return args, kwargs

    handles = []
    for i, layer in enumerate(model.model.layers):
        if i in keep:
            continue
        if mode == "zero":
            handles.append(layer.self_attn.register_forward_hook(zero))
        else:
            handles.append(layer.self_attn.register_forward_pre_hook(local, with_kwargs=True))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------------------------
# probes: callables keep -> {"score": float, "tiebreak": float, ...}

@torch.no_grad()
def teacher_forced(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 16):
    """For each (context ids, continuation ids): whether greedy decoding would produce the continuation (every
    continuation token is the argmax given everything before it) and log P(continuation | context)."""
    from gendistill.evaluation.engine import left_pad

    exact, logp = [], []
    for lo in range(0, len(pairs), batch_size):
        rows = pairs[lo:lo + batch_size]
        input_ids, attention_mask, position_ids = left_pad([c + x for c, x in rows], pad_id, model.device)
        keep = max(len(x) for _, x in rows) + 1
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, logits_to_keep=keep).logits.float()
        for row, (_, cont) in enumerate(rows):
            scores = logits[row, keep - 1 - len(cont): keep - 1]  # logits at t predict token t + 1
            target = torch.tensor(cont, device=scores.device)
            exact.append(bool((scores.argmax(-1) == target).all()))
            logp.append(float(scores.log_softmax(-1).gather(-1, target[:, None]).sum()))
    return exact, logp


def recall_probe(model, tokenizer, length: int = 1024, samples: int = 32, mask: str = "zero", window: int = 64,
                 batch_size: int = 16, family: str = "assoc_recall") -> Callable[[Key], dict]:
    """Associative recall at `length` tokens (gendistill.evaluation.recall): accuracy of the greedy answer."""
    from gendistill.evaluation.engine import pad_token_id
    from gendistill.evaluation.recall import recall_task
    from gendistill.evaluation.scoring import split_pair
    from gendistill.evaluation.tasks import build_context

    task = recall_task(family, length, tokenizer, samples)
    pairs = [split_pair(tokenizer, build_context(task, item, tokenizer), " " + str(item["answer"]))
             for item in task.items]
    pad = pad_token_id(tokenizer)

    def probe(keep: Key) -> dict:
        with masked_attention(model, keep, mask, window):
            exact, logp = teacher_forced(model, pairs, pad, batch_size)
        return {"score": sum(exact) / len(exact), "tiebreak": sum(logp) / len(logp)}
    return probe


def task_probe(model, tokenizer, task_path: str, mask: str = "zero", window: int = 64, limit: int | None = None,
               batch_size: int = 16) -> Callable[[Key], dict]:
    """Greedy generation accuracy on a task YAML (open or multiple-choice), as `gendistill eval` scores it."""
    import dataclasses

    from gendistill.evaluation.scoring import decode_modes, score_task
    from gendistill.evaluation.tasks import load_task

    task = load_task(task_path)
    if limit:
        task = dataclasses.replace(task, items=task.items[:limit])
    modes = decode_modes("greedy", (), None)

    def probe(keep: Key) -> dict:
        with masked_attention(model, keep, mask, window):
            records = score_task(model, tokenizer, task, modes, batch_size=batch_size, progress=False)
        accuracy = sum(r["gen"]["greedy"]["correct"] for r in records) / len(records)
        tiebreak = sum(float(r["ll_pred"] == r["answer"]) for r in records) / len(records) if task.is_mc else 0.0
        return {"score": accuracy, "tiebreak": tiebreak}
    return probe


def kl_probe(teacher, tokenizer, data: str, steps: int = 20, seq_len: int = 256, batch_size: int = 8,
             lr: float = 3e-3, cache_dir: str | Path = "runs/select-layers/token_cache",
             mixer: str = "kda") -> Callable[[Key], dict]:
    """Convert with the set kept as attention and `mixer` in the other layers, align those for `steps` (attn_align:
    the `kda` parameter group holds every linear mixer), score -KL on held-out windows of `data` (file or hub id)."""
    import tempfile

    from gendistill.configuration_hybrid_kda import MIXERS
    from gendistill.convert import convert
    from gendistill.distill.data import DataSource, PackedStream, build_corpus, detect_kind
    from gendistill.distill.recipe import load_stage
    from gendistill.distill.trainer import stage_loss, train_stage

    if mixer not in MIXERS:
        raise UserError(f"--mixer {mixer!r}: the kl probe's linear mixer must be one of {', '.join(MIXERS)}")
    source = DataSource(path=data)
    corpus = build_corpus(source, detect_kind(source), tokenizer, cache_dir, (steps + 4) * batch_size * seq_len + 1)
    held_out = PackedStream(corpus, seq_len, seed=12345, loss_mask="all").batch(10**6, batch_size)

    def stage(name, objective, n):
        return load_stage({"name": name, "objective": objective, "steps": n, "seq_len": seq_len,
                           "batch_size": batch_size, "lr": lr, "train": ["kda"], "checkpoint_every": 0,
                           "precision": "fp32"})

    align, kd = stage("probe_align", "attn_align", steps), stage("probe_kl", "kd", 1)

    def probe(keep: Key) -> dict:
        student = convert(teacher, attention_layers=list(keep), mixer=mixer)
        if len(keep) < teacher.config.num_hidden_layers:
            with tempfile.TemporaryDirectory() as tmp:
                train_stage(align, student, teacher=teacher, tokenizer=tokenizer, data=corpus, out_dir=tmp,
                            progress=False, tensorboard=False, save=False)
        kl = stage_loss(kd, student.eval(), teacher, {k: v.to(teacher.device) for k, v in held_out.items()})["kd"]
        return {"score": -kl, "tiebreak": 0.0}
    return probe


# ------------------------------------------------------------------------------------------------------------------
# the search

class ScoreCache:
    """Scores per candidate set, persisted (atomically, after each new score) in a JSON file tied to the probe."""

    def __init__(self, path: Path | None, probe: Callable[[Key], dict], fingerprint: str):
        self.path, self.probe, self.fingerprint = path, probe, fingerprint
        self.scores: dict[str, dict] = {}
        self.computed = 0
        if path is not None and path.is_file():
            stored = json.loads(path.read_text())
            if stored.get("fingerprint") == fingerprint:
                self.scores = stored["scores"]

    def __call__(self, keep: Key) -> dict:
        key = ",".join(map(str, keep))
        if key not in self.scores:
            t0 = time.perf_counter()
            result = {k: float(v) for k, v in self.probe(tuple(keep)).items()}
            self.scores[key] = {**result, "seconds": time.perf_counter() - t0}
            self.computed += 1
            if self.path is not None:
                atomic_write_json(self.path, {"fingerprint": self.fingerprint, "scores": self.scores})
        return self.scores[key]


def _rank(result: dict) -> tuple[float, float]:
    return result["score"], result.get("tiebreak", 0.0)


def beam_search(score: Callable[[Key], dict], num_layers: int, budget: int, beam: int = 3, depth: int | None = None,
                direction: str = "add") -> dict:
    """Beam search over sets of `budget` layers; returns {"best": [...], "score", "tree": [per step: candidates]}."""
    if not 1 <= budget <= num_layers:
        raise UserError(f"--budget must be between 1 and the number of layers ({num_layers}), got {budget}")
    if beam < 1:
        raise UserError(f"--beam must be at least 1, got {beam}")
    if direction not in ("add", "remove"):
        raise UserError(f"--direction: expected add or remove, got {direction!r}")
    start: Key = () if direction == "add" else tuple(range(num_layers))
    steps = budget if direction == "add" else num_layers - budget
    depth = steps if depth is None else depth
    root = score(start)
    tree = [{"step": 0, "candidates": [{"layers": list(start), "parent": None, **root, "in_beam": True}]}]
    frontier = [start]
    for step in range(1, steps + 1):
        width = beam if step <= depth else 1
        children: dict[Key, Key] = {}
        for parent in frontier:
            for layer in range(num_layers):
                if (layer in parent) == (direction == "add"):
                    continue
                child = tuple(sorted(set(parent) | {layer})) if direction == "add" else \
                    tuple(i for i in parent if i != layer)
                children.setdefault(child, parent)
        scored = {child: score(child) for child in children}
        ordered = sorted(scored, key=lambda c: (_rank(scored[c]), [-i for i in c]), reverse=True)
        frontier = ordered[:width]
        tree.append({"step": step, "width": width, "candidates": [
            {"layers": list(c), "parent": list(children[c]), **scored[c], "in_beam": c in frontier}
            for c in ordered]})
    best = frontier[0]
    return {"best": list(best), "score": score(best)["score"], "tiebreak": score(best).get("tiebreak", 0.0),
            "tree": tree}


def evenly_spaced(num_layers: int, budget: int) -> list[int]:
    """`budget` layers spread evenly, ending on the last (convert's spacing, without its 28-layer paper special case:
    the baseline must not be the paper's searched set)."""
    step = num_layers / budget
    return sorted({min(num_layers - 1, round(num_layers - 1 - i * step)) for i in range(budget)})


def plot_search(result: dict, path: Path, title: str) -> None:
    """Score of every candidate per step (grey), the beam's best (line), and the baselines at the last step."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for level in result["tree"]:
        ax.scatter([level["step"]] * len(level["candidates"]), [c["score"] for c in level["candidates"]], s=8,
                   color="0.7", zorder=1)
    best = [max(c["score"] for c in level["candidates"] if c["in_beam"]) for level in result["tree"]]
    ax.plot(range(len(best)), best, marker="o", color="C0", label="beam's best", zorder=2)
    last = len(result["tree"]) - 1
    baselines = result.get("baselines", {})
    if "evenly_spaced" in baselines:
        ax.scatter([last], [baselines["evenly_spaced"]["score"]], marker="s", color="C1", label="evenly spaced",
                   zorder=3)
    if baselines.get("random"):
        ax.scatter([last] * len(baselines["random"]), [r["score"] for r in baselines["random"]], marker="x",
                   color="C3", label="random", zorder=3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step (layers added)" if result["direction"] == "add" else "step (layers removed)")
    ax.set_ylabel(f"probe score ({result['probe']['name']})")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)  # atomic: a reader sees the old plot or the new one


def select_layers(score: Callable[[Key], dict], num_layers: int, budget: int, out: str | Path | None = None, *,
                  beam: int = 3, depth: int | None = None, direction: str = "add", baselines: int = 5,
                  probe_info: dict | None = None, seed: int = 0, teacher: str | None = None) -> dict:
    """Run the search with `score` (cached under OUT when given), score the baselines, write OUT/selection.json and
    OUT/search.png. `probe_info` describes the probe (its fingerprint keys the cache)."""
    probe_info = dict(probe_info or {"name": getattr(score, "__name__", "probe")})
    out = Path(out) if out is not None else None
    fingerprint = hashlib.sha256(json.dumps({**probe_info, "teacher": teacher, "layers": num_layers},
                                            sort_keys=True, default=str).encode()).hexdigest()[:16]
    cached = ScoreCache(out / "cache.json" if out else None, score, fingerprint)
    result = beam_search(cached, num_layers, budget, beam, depth, direction)
    rng = random.Random(seed)
    sets = {tuple(evenly_spaced(num_layers, budget))}
    randoms = []
    while len(randoms) < min(baselines, math.comb(num_layers, budget) - 1):
        candidate = tuple(sorted(rng.sample(range(num_layers), budget)))
        if candidate not in sets:
            sets.add(candidate)
            randoms.append(candidate)
    even = evenly_spaced(num_layers, budget)
    result = {"attention_layers": result["best"], "budget": budget, "num_layers": num_layers,
              "score": result["score"], "tiebreak": result["tiebreak"], "teacher": teacher, "probe": probe_info,
              "beam": beam, "depth": depth, "direction": direction,
              "baselines": {"evenly_spaced": {"layers": even, **cached(tuple(even))},
                            "random": [{"layers": list(r), **cached(r)} for r in randoms]},
              "candidates_scored": len(cached.scores), "scored_this_run": cached.computed, "tree": result["tree"]}
    if out is not None:
        atomic_write_json(out / "selection.json", result)
        plot_search(result, out / "search.png", f"{budget} of {num_layers} attention layers: "
                                                f"{result['attention_layers']}")
    return result


# ------------------------------------------------------------------------------------------------------------------
# CLI

def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0],
                                epilog="example:\n  %(prog)s --teacher Qwen/Qwen3-0.6B --budget 7 --out runs/layers\n"
                                       "  gendistill convert --teacher Qwen/Qwen3-0.6B --out runs/student "
                                       "--attention-layers runs/layers/selection.json",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="Qwen3 checkpoint: directory or hub id")
    p.add_argument("--budget", type=int, required=True, help="how many layers keep softmax attention")
    p.add_argument("--out", required=True, help="output directory (selection.json, search.png, cache.json)")
    p.add_argument("--probe", choices=PROBES, default="recall", help="recall (default, the paper's), task, kl")
    p.add_argument("--mask", choices=MASKS, default="zero",
                   help="recall/task probes: how attention is taken out of the other layers (default zero)")
    p.add_argument("--window", type=int, default=64, help="--mask local: tokens each position still sees")
    p.add_argument("--beam", type=int, default=3, help="beam width (default 3)")
    p.add_argument("--depth", type=int, help="steps searched with the full beam; greedy after (default: all)")
    p.add_argument("--direction", choices=("add", "remove"), default="add",
                   help="add layers to an empty set (default) or remove them from the full set")
    p.add_argument("--recall-length", default="1k", help="recall probe: context length in tokens (default 1k)")
    p.add_argument("--recall-samples", type=int, default=32, help="recall probe: items (default 32)")
    p.add_argument("--task", help="task probe: a task YAML (generation accuracy)")
    p.add_argument("--limit", type=int, help="task probe: items")
    p.add_argument("--data", help="kl probe: text data (file or hub dataset id)")
    p.add_argument("--mixer", default="kda", help="kl probe: the linear mixer the other layers get (kda, gdn, gla, "
                   "mamba2; default kda)")
    p.add_argument("--align-steps", type=int, default=20, help="kl probe: attn_align steps per candidate")
    p.add_argument("--baselines", type=int, default=5, help="random sets of the same size scored (default 5)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--seed", type=int, default=0, help="random baselines")
    return p


def main(args) -> int:
    from gendistill.convert import load_teacher
    from gendistill.evaluation.tasks import parse_length

    teacher, tokenizer = load_teacher(args.teacher, args.dtype)
    if tokenizer is None:
        raise UserError(f"{args.teacher}: no tokenizer next to the teacher (the probes need one)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    teacher = teacher.to(device).eval().requires_grad_(False)
    info = {"name": args.probe, "mask": args.mask, "window": args.window if args.mask == "local" else None}
    if args.probe == "recall":
        length = parse_length(args.recall_length)
        info.update(length=length, samples=args.recall_samples)
        probe = recall_probe(teacher, tokenizer, length, args.recall_samples, args.mask, args.window, args.batch_size)
    elif args.probe == "task":
        if not args.task:
            raise UserError("--probe task needs --task TASK.yaml")
        info.update(task=args.task, limit=args.limit)
        probe = task_probe(teacher, tokenizer, args.task, args.mask, args.window, args.limit, args.batch_size)
    else:
        if not args.data:
            raise UserError("--probe kl needs --data (text to align on and score)")
        info = {"name": "kl", "data": args.data, "align_steps": args.align_steps, "mixer": args.mixer}
        probe = kl_probe(teacher, tokenizer, args.data, args.align_steps, cache_dir=Path(args.out) / "token_cache",
                         mixer=args.mixer)
    result = select_layers(probe, teacher.config.num_hidden_layers, args.budget, args.out, beam=args.beam,
                           depth=args.depth, direction=args.direction, baselines=args.baselines, probe_info=info,
                           seed=args.seed, teacher=args.teacher)
    even = result["baselines"]["evenly_spaced"]
    randoms = [r["score"] for r in result["baselines"]["random"]]
    print(f"attention layers {result['attention_layers']}: {args.probe} score {result['score']:.3f} "
          f"(evenly spaced {even['layers']}: {even['score']:.3f}"
          + (f"; random sets: {min(randoms):.3f}-{max(randoms):.3f}" if randoms else "") + ")")
    print(f"{result['candidates_scored']} candidates scored ({result['scored_this_run']} this run); "
          f"wrote {Path(args.out) / 'selection.json'} and search.png")
    return 0
