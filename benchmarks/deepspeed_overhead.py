"""Per-step cost of the checks under DeepSpeed ZeRO-2 and ZeRO-3 (HF Trainer, 2 CPU processes, gloo), hashes at
their defaults: the same Trainer job with and without the IntegrityCallback, interleaved (ABBA) in one launch.

Run it as it launches itself (torchrun, ``DS_ACCELERATOR=cpu``):

    python benchmarks/deepspeed_overhead.py [--steps 30] [--repeats 2] [--layers 4] [--width 256] [--seq 256]

Step time is measured by a callback from ``on_step_begin`` to ``on_step_end`` (forward, backward, the DeepSpeed
step and the checks' ``step`` events), steps after the first two, median over ranks and runs. The ``init``,
``checkpoint`` and ``end`` events are outside the step and are printed separately (one-time cost). Absolute times
are CPU times of this machine; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--seq", type=int, default=256, help="tokens per row (batch 4 rows per rank)")
    parser.add_argument("--stages", default="2,3")
    parser.add_argument("--checks", default="{}", help="the callback's checks= as JSON (default: every default)")
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args()


def worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    sys.path.insert(0, ROOT)
    import torch
    import torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    from callbacks.hf import IntegrityCallback

    torch.set_num_threads(1)

    class Rows(torch.utils.data.Dataset):
        def __init__(self, n: int):
            self.ids = torch.randint(0, 512, (n, args.seq), generator=torch.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.start = 0.0

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    results: dict[str, list[float]] = {}
    for stage in [int(s) for s in args.stages.split(",")]:
        for checked in [False, True, True, False] * args.repeats:
            torch.manual_seed(0)
            model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_positions=args.seq, n_embd=args.width,
                                               n_layer=args.layers, n_head=4))
            deepspeed = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                         "zero_optimization": {"stage": stage},
                         "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
            timer = StepTimer()
            checks = json.loads(args.checks)
            callbacks = [timer] + ([IntegrityCallback(policy="log", checks=checks)] if checked else [])
            with tempfile.TemporaryDirectory() as out:
                train_args = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=4,
                                               save_strategy="no", report_to=[], logging_steps=10**6,
                                               disable_tqdm=True, deepspeed=deepspeed, seed=0, learning_rate=1e-4)
                trainer = Trainer(model=model, args=train_args, train_dataset=Rows(4 * 2 * args.steps),
                                  callbacks=callbacks)
                begin = time.perf_counter()
                trainer.train()
                total = time.perf_counter() - begin
            key = f"{stage}:{'on' if checked else 'off'}"
            results.setdefault(key, []).extend(timer.times[2:])
            results.setdefault(key + ":total", []).append(total)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        merged: dict[str, list[float]] = {}
        for part in gathered:
            for key, values in part.items():
                merged.setdefault(key, []).extend(values)
        with open(args.out, "w") as fh:
            json.dump(merged, fh)


def main() -> None:
    args = parse()
    if "LOCAL_RANK" in os.environ:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
               "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
                   os.path.expanduser("~"), ".cache", "integrity-callbacks", "torch_extensions")}
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", "29561", os.path.abspath(__file__), "--out", out,
                   "--steps", str(args.steps), "--repeats", str(args.repeats), "--layers", str(args.layers),
                   "--width", str(args.width), "--seq", str(args.seq), "--stages", args.stages, "--checks", args.checks]
        quiet = subprocess.DEVNULL if not os.environ.get("VERBOSE") else None  # VERBOSE=1 shows the ranks' output
        subprocess.run(command, env=env, check=True, stdout=quiet)
        with open(out) as fh:
            times = json.load(fh)
    print(f"GPT-2 {args.layers} layers x {args.width}, batch 4 x {args.seq} per rank, 2 CPU ranks, {args.steps} steps, "
          f"{args.repeats * 2} runs per variant")
    print(f"{'ZeRO':>5s} {'step off ms':>12s} {'step on ms':>11s} {'ratio':>6s} {'run off s':>10s} {'run on s':>9s}")
    for stage in args.stages.split(","):
        off, on = statistics.median(times[f"{stage}:off"]), statistics.median(times[f"{stage}:on"])
        total_off = statistics.median(times[f"{stage}:off:total"])
        total_on = statistics.median(times[f"{stage}:on:total"])
        print(f"{stage:>5s} {off * 1e3:12.1f} {on * 1e3:11.1f} {on / off:6.3f} {total_off:10.2f} {total_on:9.2f}")


if __name__ == "__main__":
    main()
