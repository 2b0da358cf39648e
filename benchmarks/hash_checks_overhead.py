"""Overhead of the hashes check on a tiny HF Trainer step on CPU (single process), measured in one run.

The overhead is the CPU time (``time.process_time``, torch on one thread) spent inside the callback's
dispatches during the training steps, divided by the rest of the step, in the same run: robust on a shared
machine, where wall-clock timings of separate runs drift by more than the effect. The end-to-end ratio of step
CPU time to a run without the callback is printed too (median over interleaved rounds).

Configurations: no callback; the IntegrityCallback with every check off (the engine's own dispatch cost);
IntegrityCallback with only ``hashes`` at its defaults (GRAD_NONFINITE scan every
step, frozen re-hash every 50 steps, no gradient/parameter hashing in one process); ``hashes`` with a ledger
(every gradient and trainable parameter hashed every step by the torch reference); every check at its
defaults. The model is tiny GPT-2 (2 layers, hidden 32, vocab 64, batch 4 x 16 tokens) with its embeddings and
first block frozen, as in a partial fine-tune.

    PYTHONPATH=. python benchmarks/hash_checks_overhead.py [--steps 100] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from models import TokenDataset, tiny_gpt2  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from callbacks.hf import IntegrityCallback  # noqa: E402

ONLY_HASHES = {name: {"enabled": False} for name in ("ties", "adapter_init", "saved_state", "merge")}


class TimedDispatch:
    """Wraps a monitor's dispatch and sums the time spent in step events after the warm-up steps."""

    def __init__(self, monitor, warmup: int = 5):
        self.inner, self.warmup, self.total = monitor.dispatch, warmup, 0.0
        monitor.dispatch = self

    def __call__(self, event, model, **context):
        start = time.process_time()
        try:
            return self.inner(event, model, **context)
        finally:
            if event == "step" and context.get("step", 0) > self.warmup:
                self.total += time.process_time() - start


class StepTimer(TrainerCallback):
    """Wall time from on_step_begin to on_step_end, summed over steps after the first few."""

    def __init__(self, warmup: int = 5):
        self.warmup, self.total, self._start, self.steps = warmup, 0.0, 0.0, 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step > self.warmup:
            self.total += time.process_time() - self._start
            self.steps += 1


def model():
    m = tiny_gpt2(tie=True)
    m.transformer.wte.requires_grad_(False)
    m.transformer.wpe.requires_grad_(False)
    m.transformer.h[0].requires_grad_(False)
    return m


def step_time(config: str, steps: int, out: str) -> tuple[float, float]:
    """(mean step time, mean time inside the callback's step dispatches) in seconds."""
    timer = StepTimer()
    callbacks: list[TrainerCallback] = [timer]
    if config == "engine, no checks":
        callbacks.insert(0, IntegrityCallback(policy="log", checks={**ONLY_HASHES, "hashes": {"enabled": False}}))
    elif config == "hashes defaults":
        callbacks.insert(0, IntegrityCallback(policy="log", checks=ONLY_HASHES))
    elif config == "hashes + ledger":
        checks = {**ONLY_HASHES, "hashes": {"ledger": os.path.join(out, "ledger.jsonl")}}
        callbacks.insert(0, IntegrityCallback(policy="log", checks=checks))
    elif config == "all checks defaults":
        callbacks.insert(0, IntegrityCallback(policy="log"))
    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=4, save_strategy="no",
                             report_to=[], logging_steps=10**6, use_cpu=True, disable_tqdm=True, learning_rate=1e-3)
    timed = TimedDispatch(callbacks[0].monitor) if len(callbacks) > 1 else None
    Trainer(model=model(), args=args, train_dataset=TokenDataset(n=64), callbacks=callbacks).train()
    return timer.total / timer.steps, (timed.total / timer.steps if timed else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    configs = ["none", "engine, no checks", "hashes defaults", "hashes + ledger", "all checks defaults"]
    step: dict[str, list[float]] = {c: [] for c in configs}
    inside: dict[str, list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.rounds):
            for config in configs:
                total, in_callback = step_time(config, args.steps, out)
                step[config].append(total)
                inside[config].append(in_callback)
    print(f"tiny GPT-2 (2 layers, hidden 32, vocab 64; embeddings and block 0 frozen), CPU, 1 thread, "
          f"{args.steps} steps x {args.rounds} rounds")
    print(f"{'configuration':22s} {'step (ms)':>10s} {'in callback (us/step)':>22s} {'overhead':>9s} "
          f"{'end-to-end ratio':>17s}")
    for config in configs:
        median_step = statistics.median(step[config])
        median_inside = statistics.median(inside[config])
        overhead = statistics.median(i / (t - i) for t, i in zip(step[config], inside[config], strict=True))
        ratio = statistics.median(t / b for t, b in zip(step[config], step["none"], strict=True))
        print(f"{config:22s} {median_step * 1e3:10.3f} {median_inside * 1e6:22.1f} {overhead * 100:8.2f}% "
              f"{ratio:17.3f}")


if __name__ == "__main__":
    main()
