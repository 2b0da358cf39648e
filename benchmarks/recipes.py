"""Wall time of each single-process recipe with every check on vs every check off, measured in one run.

    PYTHONPATH=. python benchmarks/recipes.py [--repeats 3]

Each recipe runs in-process through ``callbacks.runner.cli.main`` (imports warm, so the figure is the job, not Python
start-up), in a temporary working directory; runs alternate on/off and the median of ``repeats`` is kept.
Prints one row per recipe: seconds with checks, seconds without, ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import os
import statistics
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = ("ties", "adapter_init", "saved_state", "hashes", "merge")


def _variant(path: str, folder: str, checks_on: bool) -> str:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    integrity = data.setdefault("integrity", {}) or {}
    integrity["policy"] = "log"
    if not checks_on:
        integrity["checks"] = {name: {"enabled": False} for name in CHECKS}
    data["integrity"] = integrity
    out = os.path.join(folder, ("on-" if checks_on else "off-") + os.path.basename(path))
    with open(out, "w", encoding="utf-8") as fh:
        yaml.safe_dump(data, fh)
    return out


def _timed_run(recipe: str) -> float:
    from callbacks.runner.cli import main

    with tempfile.TemporaryDirectory() as work:
        cwd = os.getcwd()
        os.chdir(work)
        try:
            sink = io.StringIO()
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                start = time.perf_counter()
                main(["run", recipe])
                return time.perf_counter() - start
        finally:
            os.chdir(cwd)


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    folder_of_recipes = os.path.join(ROOT, "callbacks", "recipes")
    recipes = sorted(glob.glob(os.path.join(folder_of_recipes, "**", "*.yaml"), recursive=True))
    print(f"{'recipe':44s} {'checks on s':>11s} {'off s':>8s} {'ratio':>6s}")
    with tempfile.TemporaryDirectory() as folder:
        for path in recipes:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
            if data.get("trainer", {}).get("processes", 1) > 1 or data.get("adapter", {}).get("library") == "adapters":
                continue  # multi-process (start-up dominates) / second environment
            on, off = _variant(path, folder, True), _variant(path, folder, False)
            _timed_run(off)  # warm-up: imports, first-call caches
            times_on, times_off = [], []
            for _ in range(args.repeats):
                times_on.append(_timed_run(on))
                times_off.append(_timed_run(off))
            t_on, t_off = statistics.median(times_on), statistics.median(times_off)
            print(f"{os.path.relpath(path, folder_of_recipes):44s} {t_on:11.2f} {t_off:8.2f} "
                  f"{t_on / t_off:6.2f}", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
