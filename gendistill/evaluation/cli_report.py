"""`gendistill report`: build report.json/.md/.html from one or more eval directories (first teacher wins)."""
from __future__ import annotations

import argparse


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("eval_dirs", nargs="+", metavar="OUT", help="eval directories written by `gendistill eval`")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default: the first OUT)")
    return p


def main(args: argparse.Namespace) -> int:
    from gendistill.evaluation.report import build_report

    paths = build_report(args.eval_dirs, out=args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
