"""`gendistill world build|teacher` — generate the synthetic world, train its teacher."""
from __future__ import annotations

import argparse
import time

from gendistill.io import check_output_dir
from gendistill.world.world import PRESETS, build_world


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="The synthetic knowledge world and its teacher.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,teacher}")

    build = sub.add_parser("build", help="generate a world directory (texts, chat data, eval tasks, tokenizer)")
    build.add_argument("--out", required=True, help="world directory to create")
    build.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical world (default 0)")
    build.add_argument("--scale", choices=list(PRESETS), default="cpu",
                       help="size preset: tiny (tests), cpu (2-core demo), gpu (default cpu)")
    build.add_argument("--entities", type=int, default=None, help="number of people (overrides the preset's)")
    build.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    teacher = sub.add_parser("teacher", help="train the world's Qwen3 teacher from scratch (gendistill.world.teacher, "
                                             "the bundled demo/teacher-*.yaml)")
    teacher.add_argument("--world", required=True, help="a world directory made by `gendistill world build`")
    teacher.add_argument("--out", required=True, help="teacher output directory (HF format + tokenizer)")
    teacher.add_argument("--scale", choices=["mini", "cpu", "gpu"], default="cpu",
                         help="which teacher recipe (default cpu; mini: the cpu recipe cut to a few steps)")
    teacher.add_argument("--seed", type=int, default=0)
    teacher.add_argument("--recipe", help="a plain-training recipe of your own instead of the bundled "
                                          "demo/teacher-<scale>.yaml; a data path WORLD/<file> (also in a list: "
                                          "[WORLD/pretrain.jsonl, WORLD/longctx.jsonl]) is that file of the world")
    teacher.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return parser


def main(args: argparse.Namespace) -> int:
    if args.command == "teacher":
        from gendistill.world.teacher import train_teacher

        check_output_dir(args.out, args.overwrite)
        print(f"teacher written to {train_teacher(args.world, args.out, args.scale, args.seed, recipe=args.recipe)}")
        return 0
    check_output_dir(args.out, args.overwrite)  # fail before generating anything
    start = time.perf_counter()
    print(f"building world: scale={args.scale} seed={args.seed}"
          + (f" entities={args.entities}" if args.entities else ""), flush=True)
    world = build_world(seed=args.seed, n_entities=args.entities, scale=args.scale)
    out = world.save(args.out, overwrite=args.overwrite)
    info = world.summary()
    sizes, tokens = info["sizes"], info["tokens"]
    print(f"  people {sizes['people']} (seen {sizes['seen']}, extraction {sizes['extraction']}), "
          f"biographies {sizes['pretrain_docs']}, chats {sizes['chats']} (+{sizes['noisy_chats']} noisy)")
    print(f"  tokens: pretrain {tokens['pretrain']}, chat {tokens['chat']}, chat_noisy {tokens['chat_noisy']} "
          f"(vocab {sizes['vocab']})")
    if sizes["long_docs"]:
        print(f"  long-context documents: {sizes['long_docs']} of {world.preset.long_doc_tokens} tokens "
              f"({tokens['long']} tokens before the end-of-text tokens)")
    print("  tasks: " + ", ".join(f"{k} {v}" for k, v in sizes["task_items"].items()))
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    return 0
