"""The world's teacher: a Qwen3 trained from scratch on a world's biographies, then chat SFT, by gendistill's own
trainer (`distill.run_recipe`) with a plain-training recipe (`model:`, no teacher): the bundled
`demo/teacher-<scale>.yaml`, its paths filled in from the world directory. `gendistill world teacher` and the demo
train it here; the demo caches it by what it is made from (`teacher_cache_key`)."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from gendistill.io import UserError
from gendistill.recipes import ROOT as RECIPES

SCALES = ("mini", "cpu", "gpu")  # mini: the cpu recipe shrunk to a few steps (MINI_OVERRIDES)
# Any demo recipe shrunk to a few steps of short sequences: the CI-sized miniature.
MINI_OVERRIDES = ("*.tokens=null", "*.steps=3", "*.seq_len=64", "*.batch_size=4")


def demo_recipe(kind: str, scale: str) -> Path:
    """The bundled demo/<kind>-<scale>.yaml (`kind`: teacher or distill; mini uses the cpu recipe)."""
    return RECIPES / "demo" / f"{kind}-{'cpu' if scale == 'mini' else scale}.yaml"


def world_data_overrides(world_dir: Path) -> list[str]:
    """The `--set`s that point a demo recipe's two data sources at a world's files."""
    return [f"data.bios.path={Path(world_dir) / 'pretrain.jsonl'}", f"data.chat.path={Path(world_dir) / 'chat.jsonl'}"]


def train_teacher(world_dir: Path, out_dir: Path, scale: str = "cpu", seed: int = 0) -> Path:
    """Train the world's Qwen3 teacher from scratch; `out_dir` appears whole (HF format + tokenizer) or not at all.
    The model's vocabulary is the world tokenizer's, padded to a multiple of 64."""
    from transformers import AutoTokenizer

    from gendistill.distill import run_recipe

    if scale not in SCALES:
        raise UserError(f"teacher scale must be one of {SCALES}, got {scale!r}")
    world_dir, out_dir = Path(world_dir), Path(out_dir)
    if not (world_dir / "world.json").exists():
        raise UserError(f"{world_dir} is not a world directory (no world.json); build one with `gendistill world build`")
    run_dir = out_dir.with_name(out_dir.name + ".run")
    vocab = -(-len(AutoTokenizer.from_pretrained(world_dir / "tokenizer")) // 64) * 64
    overrides = world_data_overrides(world_dir) + [f"tokenizer.path={world_dir / 'tokenizer'}",
                                                   f"out_dir={run_dir}", f"model.seed={seed}",
                                                   f"model.config.vocab_size={vocab}"]
    if scale == "mini":
        overrides += MINI_OVERRIDES
    summary = run_recipe(demo_recipe("teacher", scale), overrides, overwrite=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(summary["final_model"], tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return out_dir


def teacher_cache_key(world_dir: Path, scale: str) -> str:
    """Hash of what the teacher is made from: the world's training data and tokenizer (not only world.json, so any
    change to the world's generator that reaches the training data trains a new teacher), the recipe and the scale."""
    digest = hashlib.sha256()
    for part in ("world.json", "pretrain.jsonl", "chat.jsonl", "tokenizer/tokenizer.json"):
        digest.update((Path(world_dir) / part).read_bytes())
    digest.update(demo_recipe("teacher", scale).read_bytes() + scale.encode())
    return digest.hexdigest()


def train_or_reuse_teacher(world_dir: Path, scale: str, seed: int, cache: Path, fresh: bool = False) -> Path:
    """The teacher is cached by (world content, teacher recipe, scale) under `cache`/teachers: a seed trains once."""
    key = teacher_cache_key(world_dir, scale)
    teacher_dir = Path(cache) / "teachers" / f"{scale}-seed{seed}-{key[:12]}"
    if (teacher_dir / "config.json").exists() and not fresh:
        print(f"reusing the cached teacher {teacher_dir}")
        return teacher_dir
    return train_teacher(world_dir, teacher_dir, scale, seed)
