"""Overhead of the HF callback at its defaults: the same tiny Trainer run with and without it, in one process.

Runs are interleaved in ABBA order (plain, checked, checked, plain, ...) so drift and warm-up hit both alike;
the ratio of medians is printed for this process's CPU time (steady on a shared machine) and for wall time.
Absolute times are CPU times of this machine and only the ratios are meant to be compared.

    python benchmarks/overhead.py [--repeats 7] [--steps 40] [--layers 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from callbacks.hf import IntegrityCallback  # noqa: E402


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int, seq: int, vocab: int):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def one_run(with_callback: bool, steps: int, layers: int, out: str) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of ``trainer.train()`` for one run."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=layers, n_head=2,
                                       bos_token_id=0, eos_token_id=0))
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=8, save_steps=steps // 2,
                             report_to=[], logging_steps=10_000, use_cpu=True, disable_tqdm=True, seed=0)
    callbacks = [IntegrityCallback(policy="log")] if with_callback else []
    trainer = Trainer(model=model, args=args, train_dataset=Rows(steps * 8, 32, 256), callbacks=callbacks)
    cpu, wall = time.process_time(), time.perf_counter()
    trainer.train()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    plain, checked = [], []
    with tempfile.TemporaryDirectory() as out:
        one_run(False, args.steps, args.layers, out)  # warm-up: imports, allocator, first compile of kernels
        one_run(True, args.steps, args.layers, out)
        for i in range(args.repeats):
            order = (False, True) if i % 2 == 0 else (True, False)
            for with_callback in order:
                (checked if with_callback else plain).append(one_run(with_callback, args.steps, args.layers, out))
    print(f"steps/run {args.steps}, repeats {args.repeats}, layers {args.layers}, save every {args.steps // 2}")
    for label, index in (("CPU", 0), ("wall", 1)):
        p = statistics.median(r[index] for r in plain)
        c = statistics.median(r[index] for r in checked)
        print(f"median {label} seconds/run: without {p:.3f}  with IntegrityCallback() at defaults {c:.3f}  "
              f"ratio {c / p:.3f}")


if __name__ == "__main__":
    main()
