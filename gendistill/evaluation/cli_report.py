"""`gendistill report`: build report.json/.md/.html from one or more eval directories (first teacher wins)."""
from __future__ import annotations

import argparse


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__)
    p.add_argument("eval_dirs", nargs="+", metavar="OUT", help="eval directories written by `gendistill eval`")
    p.add_argument("--out", metavar="DIR", help="where to write the report (default: the first OUT)")
    return p


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gendistill.evaluation.report import build_report
    from gendistill.evaluation.report import read_manifest
    from gendistill.io import UserError

    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a file; the report is a directory of report.json/.md/.html")
    for directory in args.eval_dirs:  # malformed manifests and unsafe names stop here, before anything is read
        read_manifest(directory)
    paths = build_report(args.eval_dirs, out=args.out)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
