"""Benchmark: checking a checkpoint costs the same for 10 MB and 1 GB of tensors with the same keys.

Two GPT-2 models with identical keys (12 layers, 148 tensors) and widths 128 and 1280 (about 10 MB and 1 GB of
float32). For each, an HF ``Trainer`` writes the weights (``trainer.save_model``: ``model.safetensors``, what
``checkpoint-N/`` holds besides optimizer state), then the saved-state check runs on the folder as at the
``checkpoint`` event (``Monitor.dispatch``, headers only). Prints, measured in this one run:

- ratio = check time (1 GB) / check time (10 MB)       target <= 1.2
- fraction = check time / time the trainer took to write  target < 5%

"check s" is the median of ``--repeats`` checkpoint events after ``os.sync()``, the two sizes interleaved (so
that load from other processes hits both alike), each with the name cache cleared; "first check s" is the single
event right after the write, while the kernel may still be flushing the file (shown, not judged: that cost is
the disk's, not the reader's, which touches the header only).

Usage: ``python benchmarks/saved_state.py [--repeats 31] [--small-only]`` (the 1 GB case needs ~3 GB RAM and
~1 GB in /tmp; it lives here only, never in the tests).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from callbacks import Monitor  # noqa: E402
from callbacks.primitives.checkpoints import list_checkpoint  # noqa: E402
from callbacks.primitives.saved_names import _saved_name  # noqa: E402

ONLY_SAVED_STATE = {name: {"enabled": False} for name in ("ties", "adapter_init", "hashes", "merge")}


def build_model(width: int):
    """GPT-2 with 12 layers and a 1024-token vocabulary; only the width changes the bytes, never the keys."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=1024, n_positions=64, n_embd=width, n_layer=12, n_head=4, tie_word_embeddings=True)
    with torch.no_grad():
        return GPT2LMHeadModel(config)


def write_with_trainer(model, folder: str) -> float:
    """Seconds HF Trainer takes to write the model's weights into ``folder``."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=folder, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args)
    start = time.perf_counter()
    trainer.save_model(folder)
    return time.perf_counter() - start


def time_check(model, folder: str) -> tuple[float, int]:
    """Seconds of one checkpoint event with only the saved-state check (name cache cleared); its finding count."""
    monitor = Monitor(policy="log", checks=ONLY_SAVED_STATE)
    _saved_name.cache_clear()  # every timed event maps every name again: no warm cache favours either size
    gc.collect()
    start = time.perf_counter()
    found = len(monitor.dispatch("checkpoint", model, step=1, checkpoint_dir=folder))
    return time.perf_counter() - start, found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--small-only", action="store_true", help="skip the 1 GB case (a quick smoke run)")
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    cases = []
    try:
        for width in [128] if args.small_only else [128, 1280]:
            model = build_model(width)
            folder = tempfile.mkdtemp(prefix=f"saved_state_w{width}_", dir=args.tmp)
            cases.append({"width": width, "model": model, "folder": folder, "times": [], "findings": 0})
            cases[-1]["write_s"] = write_with_trainer(model, folder)
            cases[-1]["first_s"], _ = time_check(model, folder)  # as at on_save: writeback may be in flight
            listing = list_checkpoint(folder)
            cases[-1]["keys"] = len(listing.keys)
            cases[-1]["mb"] = sum(os.path.getsize(f) for f in listing.files) / 1e6
        os.sync()  # let writeback finish, so that it does not compete with the timed repeats
        for _ in range(args.repeats):
            for case in cases:
                seconds, case["findings"] = time_check(case["model"], case["folder"])
                case["times"].append(seconds)
    finally:
        for case in cases:
            shutil.rmtree(case["folder"], ignore_errors=True)

    print(f"{'width':>6} {'keys':>5} {'MB':>9} {'trainer write s':>16} {'first check s':>14} {'check s':>9} "
          f"{'check/write':>12}")
    for case in cases:
        case["check_s"] = statistics.median(case["times"])
        print(f"{case['width']:>6} {case['keys']:>5} {case['mb']:>9.1f} {case['write_s']:>16.4f} "
              f"{case['first_s']:>14.4f} {case['check_s']:>9.4f} {case['check_s'] / case['write_s']:>11.2%}")
    ok = all(case["findings"] == 0 for case in cases)
    if len(cases) == 2:
        small, large = cases
        assert small["keys"] == large["keys"]
        ratio = large["check_s"] / small["check_s"]
        fraction = large["check_s"] / large["write_s"]
        print(f"ratio check(1 GB)/check(10 MB) = {ratio:.3f} (target <= 1.2)")
        print(f"check / trainer write, 1 GB   = {fraction:.2%} (target < 5%); 10 MB: "
              f"{small['check_s'] / small['write_s']:.2%}")
        ok = ok and ratio <= 1.2 and fraction < 0.05
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
