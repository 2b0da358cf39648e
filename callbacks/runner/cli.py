"""Command line: ``python -m callbacks run|audit|recipes|schema|diff`` (help in plain text, with examples).

Exit codes: ``run`` and ``audit``: 0 clean, 1 error findings, 2 bad input. ``diff``: 0 identical, 1 diverged,
2 bad input. ``schema``: 0.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence

from callbacks.errors import ConfigError

#: exit codes: clean (or identical ledgers), error findings (or diverged ledgers), bad input
EXIT_CLEAN, EXIT_FINDINGS, EXIT_BAD_INPUT = 0, 1, 2

#: set in the environment of the processes ``run`` launches, so they do not launch again
LAUNCHED_ENV = "INTEGRITY_CALLBACKS_LAUNCHED"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(recipe: str, processes: int, html: str | None) -> int:
    """Run this command again under ``torchrun`` (CPU: gloo), one process per replica; rank 0 reports.

    The ranks exit 0 when they finish (a rank exiting 1 would make torchrun kill the others mid-report); rank 0
    writes the job's exit code to a file this process reads.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="integrity-run-") as tmp:
        exit_file = os.path.join(tmp, "exit_code")
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                   f"--master_port={_free_port()}", "--master_addr=127.0.0.1", "-m", "callbacks", "run", recipe]
        if html:
            command += ["--html", html]
        env = {**os.environ, LAUNCHED_ENV: exit_file}
        returncode = subprocess.run(command, env=env, check=False).returncode
        if returncode != 0 or not os.path.isfile(exit_file):
            print(f"error: the {processes} processes of {recipe} failed (torchrun exit {returncode})",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        with open(exit_file, encoding="utf-8") as fh:
            return int(fh.read().strip())


def _cmd_run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # recipes never download
    from callbacks.runner.job import load_job, run_job
    from callbacks.runner.packaged import resolve_recipe

    args.recipe = resolve_recipe(args.recipe)
    job, _ = load_job(args.recipe)
    exit_file = os.environ.get(LAUNCHED_ENV)
    if job.trainer.processes > 1 and exit_file is None and "LOCAL_RANK" not in os.environ:
        return _launch(args.recipe, job.trainer.processes, args.html)
    code, monitor = run_job(args.recipe)
    if monitor.rank == 0:
        if args.html and os.path.abspath(args.html) != monitor.html_report_path:  # the monitor wrote the default
            from callbacks.report_html import write_html

            write_html(monitor.report, args.html, title=f"integrity report: {args.recipe}")
            print(f"integrity: HTML report {os.path.abspath(args.html)}")
        print(f"integrity: training outputs in {os.path.abspath(job.trainer.output_dir)}")
        print(f"integrity: {len(monitor.report.errors)} error finding(s); exit {code}")
        if exit_file:
            with open(exit_file, "w", encoding="utf-8") as fh:
                fh.write(str(code))
    return EXIT_CLEAN if exit_file else code


def _cmd_audit(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from callbacks.runner.audit import audit_checkpoint
    from callbacks.runner.packaged import resolve_recipe

    recipe = resolve_recipe(args.recipe) if args.recipe else None
    monitor = audit_checkpoint(args.checkpoint, recipe=recipe, report=args.report)
    if args.html and os.path.abspath(args.html) != monitor.html_report_path:  # the monitor wrote the default
        from callbacks.report_html import write_html

        write_html(monitor.report, args.html, title=f"integrity audit: {args.checkpoint}")
        print(f"integrity: HTML report {os.path.abspath(args.html)}")
    for finding in monitor.report.errors:  # the table counts codes; an unreadable file is named with its reason
        if finding.code == "CHECKPOINT_UNREADABLE":
            print(f"integrity audit: cannot read {finding.details.get('file', '?')}: "
                  f"{finding.details.get('reason', finding.message)}")
    errors = len(monitor.report.errors)
    print(f"integrity audit: {errors} error finding(s); exit {EXIT_FINDINGS if errors else EXIT_CLEAN}")
    return EXIT_FINDINGS if errors else EXIT_CLEAN


def _cmd_schema(args: argparse.Namespace) -> int:
    from callbacks.runner.job import recipe_json_schema

    text = json.dumps(recipe_json_schema(), indent=2)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    else:
        print(text)
    return EXIT_CLEAN


def _cmd_recipes(args: argparse.Namespace) -> int:
    from callbacks.runner.packaged import copy_recipe, packaged_recipes, recipes_folder

    if args.action == "copy":
        written = copy_recipe(args.name, args.destination, overwrite=args.force)
        print(f"integrity: wrote {os.path.abspath(written)}; run it with: {PROG} run {written}")
        return EXIT_CLEAN
    shipped = packaged_recipes()
    width = max(len(r.name) for r in shipped)
    print(f"shipped recipes (in {recipes_folder()}); run one with: {PROG} run NAME")
    for recipe in shipped:
        print(f"  {recipe.name:{width}s}  {recipe.summary}")
    return EXIT_CLEAN


def _cmd_diff(args: argparse.Namespace) -> int:
    from callbacks.hashing.ledger import diff_ledgers

    code, text = diff_ledgers(args.ledger_a, args.ledger_b)
    print(text)
    return code


#: the program name ``--help`` shows
PROG = "python -m callbacks"

#: what ``--help`` shows after the options: examples and exit codes, plain text for a terminal
EPILOGS = {
    None: f"""examples:
  {PROG} run quickstart
  {PROG} recipes
  {PROG} audit out/quickstart/checkpoint-6
  {PROG} <command> --help

exit codes: run and audit 0 clean, 1 error findings, 2 bad input; diff 0 identical, 1 diverged, 2 bad input
relative paths in a recipe are read from the current folder""",
    "run": f"""examples:
  {PROG} run quickstart                     (a shipped recipe, by name)
  {PROG} run failures/dead_adapter --html out/dead.html
  {PROG} run my_recipe.yaml                 (a file: {PROG} recipes copy quickstart makes one)

relative paths in a recipe (output_dir, report, resume_from) are read from the current folder.

exit codes: 0 no error finding, 1 error findings, 2 bad recipe (the message names file, key and allowed values)""",
    "audit": f"""examples:
  {PROG} audit out/quickstart/checkpoint-6
  {PROG} audit my_adapter/ --recipe quickstart --report audit.json

exit codes: 0 clean, 1 error findings, 2 a folder or file it cannot read or judge""",
    "schema": f"""examples:
  {PROG} schema -o recipe.schema.json     (for an editor's YAML validation)""",
    "recipes": f"""examples:
  {PROG} recipes                               (list the shipped recipes)
  {PROG} recipes copy quickstart my_run.yaml   (a starting point to edit)
  {PROG} recipes copy failures/dead_adapter .

exit codes: 0 done, 2 unknown name or a file that exists already (--force replaces it)""",
    "diff": f"""examples:
  {PROG} diff run_a/hashes.jsonl run_b/hashes.jsonl

exit codes: 0 identical, 1 diverged (the first step and tensors are printed), 2 bad input""",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m callbacks``."""
    plain = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=plain, epilog=EPILOGS[None],
                                     description="Training-loop integrity checks: run a recipe, audit a "
                                                 "checkpoint, print the recipe schema, compare hash ledgers.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                              epilog=EPILOGS[name], formatter_class=plain)

    run = command("run", "run a recipe's training job with the integrity checks")
    run.add_argument("recipe", help="a recipe YAML file, or the name of a shipped recipe (see: recipes)")
    run.add_argument("--html", help="HTML report path (default: the JSON report's path with .html)")
    run.set_defaults(func=_cmd_run)
    audit = command("audit", "the saved-state, tie and adapter checks on a checkpoint folder, offline")
    audit.add_argument("checkpoint", help="a checkpoint folder (config.json / adapter_config.json and weights)")
    audit.add_argument("--recipe", help="recipe (file or shipped name) whose model:/adapter: sections rebuild "
                                        "the model")
    audit.add_argument("--report", help="JSON report path")
    audit.add_argument("--html", help="HTML report path (default: the JSON report's path with .html)")
    audit.set_defaults(func=_cmd_audit)
    recipes = command("recipes", "list the shipped recipes, or copy one out as a starting point")
    actions = recipes.add_subparsers(dest="action")
    actions.add_parser("list", help="list them (the default)")
    copy = actions.add_parser("copy", help="write a shipped recipe to a file")
    copy.add_argument("name", help="its name, e.g. quickstart or failures/dead_adapter")
    copy.add_argument("destination", nargs="?", help="a file or folder (default: the current folder)")
    copy.add_argument("--force", action="store_true", help="replace a file that exists")
    recipes.set_defaults(func=_cmd_recipes)
    schema = command("schema", "JSON schema of a whole recipe")
    schema.add_argument("-o", "--output", help="write to this file instead of stdout")
    schema.set_defaults(func=_cmd_schema)
    diff = command("diff", "first step and tensors where two hash ledgers differ")
    diff.add_argument("ledger_a", help="a hash ledger (JSON lines) written by the hashes check")
    diff.add_argument("ledger_b", help="the ledger of the run to compare with")
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
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
