"""Write the synthetic world's knowledge QA as two lm-eval tasks (YAML + JSONL, `dataset_path: json`), so that
`gendistill eval --tasks lm-eval:world_lm_mc,lm-eval:world_lm_open --lm-eval-include DIR` scores them through
lm-eval's own task definitions on the demo's teacher and student.

    python gendistill/recipes/lm_eval_tasks/make_world_tasks.py WORLD_DIR OUT_DIR [--per-split 200] [--relative-to DIR]

The committed files here come from the GPU demo's world (`gendistill world build --scale gpu --seed 0`, the world
`gendistill demo --scale gpu` builds) with `--relative-to .`: their data paths are relative to the repository root,
the directory to run `gendistill eval` from (lm-eval's json loader resolves them against the working directory).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

SPLITS = ("seen", "extraction")


def _rows(world: Path, kind: str, per_split: int) -> list[dict]:
    rows = []
    for split in SPLITS:
        lines = (world / "tasks" / f"world_qa_{kind}_{split}.jsonl").read_text().splitlines()
        for line in lines[:per_split]:
            item = json.loads(line)
            row = {"id": item["id"], "split": split, "question": item["question"], "answer": item["answer"]}
            if kind == "mc":
                row["choices"] = item["choices"]
            rows.append(row)
    return rows


def write(world: Path, out: Path, per_split: int = 200, relative_to: Path | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, name in (("mc", "world_lm_mc"), ("open", "world_lm_open")):
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _rows(world, kind, per_split)))
        path = os.path.relpath(data.resolve(), relative_to.resolve()) if relative_to else str(data.resolve())
        config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": path}},
                  "test_split": "test", "num_fewshot": 0}
        if kind == "mc":  # lm-eval's ARC form: the question, then each option's text ranked as the continuation
            config |= {"output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
                       "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
                       "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                       for m in ("acc", "acc_norm")]}
        else:  # the world's open questions; the teacher answers "Lyon.": the filter keeps the text before a period
            config |= {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                       "generation_kwargs": {"until": ["\n"], "max_gen_toks": 24, "do_sample": False},
                       "filter_list": [{"name": "answer", "filter": [
                           {"function": "regex", "regex_pattern": r"^\s*([^\n]*?)\.?\s*$"},
                           {"function": "take_first"}]}],
                       "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                        "ignore_case": True, "ignore_punctuation": True}]}
        (out / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
        written += [out / f"{name}.yaml", data]
    return written


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("world", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--per-split", type=int, default=200, help="items per split (seen, extraction) and task")
    p.add_argument("--relative-to", type=Path, help="write data paths relative to this directory (default: absolute)")
    args = p.parse_args()
    for path in write(args.world, args.out, args.per_split, args.relative_to):
        print(path)
