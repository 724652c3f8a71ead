"""The world's teacher: a Qwen3 trained from scratch on a world's biographies, then chat SFT, by gendistill's own
trainer (`distill.run_recipe`) with a plain-training recipe (`model:`, no teacher): the bundled
`demo/teacher-<scale>.yaml` or the user's own (`gendistill world teacher --recipe`, e.g. with a stage on the world's
long-context documents), its paths filled in from the world directory. `gendistill world teacher` and the demo train
it here; the demo caches it by what it is made from (`teacher_cache_key`)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from gendistill.io import UserError, atomic_write_json
from gendistill.recipes import ROOT as RECIPES

SCALES = ("mini", "cpu", "gpu")  # mini: the cpu recipe shrunk to a few steps (MINI_OVERRIDES)
# Any demo recipe shrunk to a few steps of short sequences: the CI-sized miniature.
MINI_OVERRIDES = ("*.tokens=null", "*.steps=3", "*.seq_len=64", "*.batch_size=4")
ONE_STEP_OVERRIDES = ("*.tokens=null", "*.steps=1")  # every stage one step at its own shapes (the kernel warm-up)
TEACHER_RECORD = "gendistill_teacher.json"  # in a trained teacher's directory: its stages (tokens, loss, seconds)


def demo_recipe(kind: str, scale: str) -> Path:
    """The bundled demo/<kind>-<scale>.yaml (`kind`: teacher or distill; mini uses the cpu recipe)."""
    return RECIPES / "demo" / f"{kind}-{'cpu' if scale == 'mini' else scale}.yaml"


def world_data_overrides(recipe: Path, world_dir: Path) -> list[str]:
    """The `--set`s that point a demo recipe's data at a world's files: a data source's `WORLD/<file>` path, or such
    an entry of a `path` list (a mixture, e.g. the biographies beside the long documents), becomes that file of
    `world_dir`. A stage that reads the long documents alone (`WORLD/longctx.jsonl`) gets their length as its
    seq_len: one document per sequence (see world.py)."""
    import yaml

    raw = yaml.safe_load(Path(recipe).read_text())
    settings, long_sources = [], set()
    for name, src in (raw.get("data") or {}).items():
        path = src.get("path") if isinstance(src, dict) else src
        entries = path if isinstance(path, list) else [path]
        files = [e[len("WORLD/"):] if isinstance(e, str) and e.startswith("WORLD/") else None for e in entries]
        if not any(files):
            continue
        resolved = [str(Path(world_dir) / f) if f else e for e, f in zip(entries, files)]
        for file in filter(None, files):
            if not (Path(world_dir) / file).exists():
                hint = " (built with `gendistill world build --scale gpu`)" if file == "longctx.jsonl" else ""
                raise UserError(f"{Path(recipe).name}: data.{name} reads WORLD/{file}, but the world {world_dir} has "
                                f"no {file}{hint}")
        settings.append(f"data.{name}.path={json.dumps(resolved) if isinstance(path, list) else resolved[0]}")
        if entries == ["WORLD/longctx.jsonl"]:
            long_sources.add(name)
    if long_sources:
        length = json.loads((Path(world_dir) / "world.json").read_text())["preset"]["long_doc_tokens"]
        settings += [f"{s['name']}.seq_len={length}" for s in raw.get("stages", []) if s.get("data") in long_sources]
    return settings


def stage_rows(run: dict) -> list[dict]:
    """A finished run's stages as a record: name, tokens, first and final loss, seconds."""
    return [{"name": s["stage"], "tokens": s["tokens"], "first_loss": s["first_loss"], "final_loss": s["final"]["loss"],
             "seconds": s["train_time_s"]} for s in run["stages"]]


def train_teacher(world_dir: Path, out_dir: Path, scale: str = "cpu", seed: int = 0,
                  overrides: list[str] | tuple[str, ...] = (), recipe: Path | None = None) -> Path:
    """Train the world's Qwen3 teacher from scratch with `recipe` (default: the bundled one of `scale`; `overrides`:
    more `--set` entries); `out_dir` appears whole (HF format + tokenizer + TEACHER_RECORD) or not at all. The
    model's vocabulary is the world tokenizer's, padded to a multiple of 64."""
    from transformers import AutoTokenizer

    from gendistill.distill import run_recipe

    if scale not in SCALES:
        raise UserError(f"teacher scale must be one of {SCALES}, got {scale!r}")
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    if not (world_dir / "world.json").exists():
        raise UserError(f"{world_dir} is not a world directory (no world.json); build one with `gendistill world build`")
    run_dir = out_dir.with_name(out_dir.name + ".run")
    vocab = -(-len(AutoTokenizer.from_pretrained(world_dir / "tokenizer")) // 64) * 64
    recipe = Path(recipe) if recipe else demo_recipe("teacher", scale)
    if not recipe.is_file():
        raise UserError(f"teacher recipe {recipe} not found; pass a YAML recipe file (see the bundled "
                        f"{demo_recipe('teacher', scale)})")
    settings = world_data_overrides(recipe, world_dir) + [
        f"tokenizer.path={world_dir / 'tokenizer'}", f"out_dir={run_dir}", f"model.seed={seed}",
        f"model.config.vocab_size={vocab}"]
    if scale == "mini":
        settings += MINI_OVERRIDES
    summary = run_recipe(recipe, settings + list(overrides), overwrite=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(summary["final_model"], tmp)
    atomic_write_json(tmp / TEACHER_RECORD, {"recipe": recipe.name, "scale": scale, "seed": seed,
                                             "stages": stage_rows(summary)})
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return out_dir


def teacher_cache_key(world_dir: Path, scale: str) -> str:
    """Hash of what the teacher is made from: the world's training data and tokenizer (not only world.json, so any
    change to the world's generator that reaches the training data trains a new teacher), the recipe and the scale."""
    digest = hashlib.sha256()
    for part in ("world.json", "pretrain.jsonl", "chat.jsonl", "longctx.jsonl", "tokenizer/tokenizer.json"):
        path = Path(world_dir) / part
        digest.update(path.read_bytes() if path.exists() else b"-")
    digest.update(demo_recipe("teacher", scale).read_bytes() + scale.encode())
    return digest.hexdigest()


def cached_teacher_dir(world_dir: Path, scale: str, seed: int, cache: Path) -> Path:
    """Where the teacher of this world, recipe and seed is kept (`teacher_cache_key`)."""
    return Path(cache) / "teachers" / f"{scale}-seed{seed}-{teacher_cache_key(world_dir, scale)[:12]}"


def train_or_reuse_teacher(world_dir: Path, scale: str, seed: int, cache: Path, fresh: bool = False) -> Path:
    """The teacher is cached by (world content, teacher recipe, scale) under `cache`/teachers: a seed trains once."""
    teacher_dir = cached_teacher_dir(world_dir, scale, seed, cache)
    if (teacher_dir / "config.json").exists() and not fresh:
        print(f"reusing the cached teacher {teacher_dir}")
        return teacher_dir
    return train_teacher(world_dir, teacher_dir, scale, seed)
