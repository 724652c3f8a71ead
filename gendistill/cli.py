"""`gendistill <verb> ...` — one verb per pipeline step. Each verb lives in its own module, imported lazily
so that `gendistill --help` stays fast and a verb's heavy imports are paid only when it runs."""
from __future__ import annotations

import importlib
import sys

from gendistill.io import UserError

# verb -> (module, one-line help). Each module defines `build_parser(prog)` and `main(args)`.
VERBS: dict[str, tuple[str, str]] = {
    "convert": ("gendistill.convert", "turn a Qwen3 checkpoint into a Hybrid-KDA student"),
    "distill": ("gendistill.distill.cli", "run a GenDistill recipe (stages from a YAML file)"),
    "eval": ("gendistill.evaluation.cli", "score models both ways: log-likelihood and generation"),
    "report": ("gendistill.evaluation.cli_report", "build report.json/.md/.html from eval outputs"),
    "world": ("gendistill.world.cli", "generate the synthetic knowledge world, its tokenizer and teacher"),
    "demo": ("gendistill.demo", "world -> teacher -> convert -> distill -> eval -> report, end to end"),
    "bench": ("gendistill.bench.cli", "KV/state memory, time-to-first-token and decode speed, teacher vs student"),
    "serve": ("gendistill.serve", "OpenAI-compatible HTTP server (chat/completions, streaming) for a model directory"),
    "ablate": ("gendistill.ablate", "run an ablation: recipe variants over axes and seeds, shared stages, one report"),
    "select-layers": ("gendistill.select_layers", "beam search for the layers that keep softmax attention"),
    "kernels": ("gendistill.kernels.cache", "Triton/fla kernel cache: where it is, warm it, export pinned configs"),
}


def _usage() -> str:
    width = max(map(len, VERBS))
    lines = ["usage: gendistill <verb> [options]", "", "verbs:"]
    lines += [f"  {verb:<{width}}  {help_}" for verb, (_, help_) in VERBS.items()]
    lines += ["", "`gendistill <verb> --help` shows a verb's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"gendistill: unknown verb {verb!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(VERBS[verb][0])
    args = module.build_parser(f"gendistill {verb}").parse_args(rest)
    try:
        return module.main(args) or 0
    except UserError as err:
        print(f"gendistill {verb}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
