"""Cost of the adapter init audit against one training step, measured in one run on CPU.

A 100-layer Llama-style model from a config (nothing downloaded), LoRA on every linear layer of every block
(q, k, v, o, gate, up, down: 700 LoRA layers, 1,400 adapter parameters). Measured, each as the median of
``--repeats`` runs:

* one training step: forward + backward + AdamW step on a ``--batch`` x ``--seq`` token batch;
* the ``init`` audit (discovery, every init contract, the identity probe: two forwards of a 1 x 8 batch);
* one ``step`` audit (the dead-adapter gradient test; it runs for the first ``dead_after_steps`` steps only).

Prints both ratios. The target: the init audit adds under 5% to one training step.

    python benchmarks/adapter_audit.py [--layers 100] [--hidden 256] [--batch 8] [--seq 256] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(layers: int, hidden: int):
    """A Llama-style causal LM of ``layers`` blocks with LoRA (r=8) on every linear layer of the blocks."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))


class Clock:
    """Wall time and this process's CPU time of a block. On a shared machine wall time includes waiting for other
    processes; with one torch thread, CPU time is the work itself. Both are reported."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def model_arguments(description: str) -> argparse.ArgumentParser:
    """The options of the benchmark model and batch (shared by the benchmarks that use :func:`build`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the CI machine's 2 cores are shared; more threads oversubscribe)")
    return parser


def main() -> None:
    """Measure and print the ratios."""
    parser = model_arguments(__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from callbacks import Monitor

    model = build(args.layers, args.hidden)
    model.train()
    lora_layers = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.default"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (args.batch, args.seq), generator=gen)

    # the step audit (dead-adapter gradient test) runs between backward and optimizer.step, as under a trainer
    step_monitor = Monitor(policy="log", checks={"ties": {"enabled": False},
                                                 "adapter_init": {"dead_after_steps": 10**6, "probe": False}})

    def train_step(step: int) -> tuple[Clock, Clock]:
        """One training step and, inside it, the step audit; the step's clock excludes the audit."""
        with Clock() as total:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            with Clock() as audit:
                step_monitor.dispatch("step", model, step=step, phase="before_optimizer")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        total.wall -= audit.wall
        total.cpu -= audit.cpu
        return total, audit

    def init_audit() -> Clock:
        monitor = Monitor(policy="log", checks={"ties": {"enabled": False}})
        with Clock() as clock:
            found = monitor.dispatch("init", model, step=0)
        errors = [f.code for f in found if f.severity == "error"]
        assert not errors, f"the healthy model has findings: {errors}"
        return clock

    # the init audit runs on the fresh model (before any step changes B), the steps after it
    init_audit()  # warm-up
    inits = [init_audit() for _ in range(args.repeats)]
    step_monitor.dispatch("init", model, step=0)
    train_step(1)  # warm-up: allocations, AdamW state
    steps, audits = zip(*(train_step(step) for step in range(2, args.repeats + 2)), strict=True)

    def median(clocks, attr: str) -> float:
        return statistics.median(getattr(c, attr) for c in clocks)

    print(f"model: {args.layers} layers, hidden {args.hidden}, {lora_layers} LoRA layers, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; batch {args.batch} x {args.seq}; "
          f"torch threads {torch.get_num_threads()}; medians of {args.repeats}")
    print(f"{'':22}{'CPU ms':>10}{'ratio':>9}{'wall ms':>12}{'ratio':>9}")
    step_cpu, step_wall = median(steps, "cpu"), median(steps, "wall")
    print(f"{'training step':22}{step_cpu * 1e3:10.1f}{'':9}{step_wall * 1e3:12.1f}")
    for label, clocks in (("init audit (+probe)", inits), ("step audit (grads)", audits)):
        cpu, wall = median(clocks, "cpu"), median(clocks, "wall")
        print(f"{label:22}{cpu * 1e3:10.1f}{cpu / step_cpu:9.2%}{wall * 1e3:12.1f}{wall / step_wall:9.2%}")
    ratio = median(inits, "cpu") / step_cpu
    print(f"target: init audit < 5% of one training step (CPU time): {'PASS' if ratio < 0.05 else 'FAIL'} "
          f"({ratio:.2%}); the step audit runs only for the first dead_after_steps steps")


if __name__ == "__main__":
    main()
