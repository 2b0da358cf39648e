"""Command line: ``python -m callbacks run RECIPE`` and ``python -m callbacks diff LEDGER_A LEDGER_B``.

Exit codes: ``run``: 0 clean, 1 error findings, 2 bad input. ``diff``: 0 identical, 1 diverged, 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from callbacks.errors import RecipeError

EXIT_CLEAN, EXIT_FINDINGS, EXIT_BAD_INPUT = 0, 1, 2


def _cmd_run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # recipes never download
    from callbacks.job import run_job

    code, monitor = run_job(args.recipe)
    errors = len(monitor.report.errors)
    print(f"integrity: {errors} error finding(s); exit {code}")
    return code


def _cmd_diff(args: argparse.Namespace) -> int:
    try:
        from callbacks.ledger import diff_ledgers
    except ImportError:
        print("diff: hash ledgers are not available in this version", file=sys.stderr)
        return EXIT_BAD_INPUT
    code, text = diff_ledgers(args.ledger_a, args.ledger_b)
    print(text)
    return code


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m callbacks``."""
    parser = argparse.ArgumentParser(prog="python -m callbacks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe's training job with the integrity checks")
    run.add_argument("recipe", help="path of the recipe YAML")
    run.set_defaults(func=_cmd_run)
    diff = sub.add_parser("diff", help="first step and tensors where two hash ledgers differ")
    diff.add_argument("ledger_a")
    diff.add_argument("ledger_b")
    diff.set_defaults(func=_cmd_diff)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, which matches "bad input"
        return int(exc.code or 0)
    try:
        return args.func(args)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
