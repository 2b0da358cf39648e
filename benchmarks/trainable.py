"""Per-step cost of the trainable-set family against one training step, measured in one run on CPU.

The model of ``benchmarks/adapter_audit.py``: a 100-layer Llama-style model from a config, LoRA r=8 on all 700
linear layers (1,400 adapter parameters). Only the ``trainable`` family is enabled. Each optimizer step is
bracketed by its two events (``before_optimizer``: gradients read, watched values hashed; ``after_optimizer``:
hashed again, the trainable set compared). Printed, as CPU and wall time and as a share of the training step:

* the first step, where every adapter parameter is watched (LoRA A has a zero gradient at step 1 and is watched
  again at step 2);
* the first steps (``not_updated_after_steps + skipped_steps_tolerated + 1``, 28 at the defaults), where the
  watched parameters are hashed until they move;
* the steady state after them: one pass over the ``requires_grad`` flags of the parameters found, the module
  walk every 10th step.

    python benchmarks/trainable.py [--layers 100] [--hidden 256] [--batch 8] [--seq 256] [--steps 34]
"""

from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adapter_audit import Clock, build, model_arguments  # noqa: E402


def main() -> None:
    """Measure and print the per-step cost."""
    parser = model_arguments(__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=34)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from callbacks import Monitor
    from callbacks.checks import REGISTRY

    model = build(args.layers, args.hidden)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    monitor = Monitor(policy="log", checks={name: {"enabled": name == "trainable"} for name in REGISTRY})
    monitor.dispatch("init", model, step=0, optimizer=optimizer)

    rows = []
    for step in range(1, args.steps + 1):
        with Clock() as total:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            with Clock() as before:
                monitor.dispatch("step", model, step=step, phase="before_optimizer", optimizer=optimizer)
            optimizer.step()
            with Clock() as after:
                monitor.dispatch("step", model, step=step, phase="after_optimizer", optimizer=optimizer)
            optimizer.zero_grad(set_to_none=True)
        check = (before.cpu + after.cpu, before.wall + after.wall)
        rows.append((total.cpu - check[0], total.wall - check[1], *check))
    loud = [f.code for f in monitor.findings if f.severity != "info"]
    assert not loud, f"the healthy model has findings: {loud}"
    watched = monitor.check("trainable")
    print(f"model: {args.layers} layers, hidden {args.hidden}, "
          f"{sum(p.requires_grad for p in model.parameters())} trainable tensors; batch {args.batch} x {args.seq}; "
          f"torch threads {torch.get_num_threads()}; moved {len(watched.moved)}")
    print(f"{'step':>6}{'train CPU ms':>14}{'check CPU ms':>14}{'ratio':>9}{'check wall ms':>15}{'ratio':>9}")
    for step, (train_cpu, train_wall, cpu, wall) in enumerate(rows, 1):
        print(f"{step:>6}{train_cpu * 1e3:14.1f}{cpu * 1e3:14.1f}{cpu / train_cpu:9.2%}{wall * 1e3:15.1f}"
              f"{wall / train_wall:9.2%}")
    config = watched.config
    window = config.not_updated_after_steps + config.skipped_steps_tolerated + 1
    early = statistics.median(r[2] / r[0] for r in rows[1:window])
    print(f"first step {rows[0][2] / rows[0][0]:.2%}; steps 2-{window}: median {early:.2%} of a training step (CPU)")
    if len(rows) > window:
        steady = statistics.median(r[2] / r[0] for r in rows[window:])
        print(f"steady state (steps {window + 1}+): median {steady:.3%} of a training step (CPU)")


if __name__ == "__main__":
    main()
