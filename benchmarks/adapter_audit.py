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


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    """Measure and print the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the CI machine's 2 cores are shared; more threads oversubscribe)")
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
    grad_times: list[float] = []

    def train_step(step: int, audit: bool) -> float:
        """One step; returns its time without the step audit (timed separately into ``grad_times``)."""
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        audit_s = timed(lambda: step_monitor.dispatch("step", model, step=step, phase="before_optimizer")) \
            if audit else 0.0
        grad_times.append(audit_s)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start - audit_s

    def init_audit() -> None:
        monitor = Monitor(policy="log", checks={"ties": {"enabled": False}})
        found = monitor.dispatch("init", model, step=0)
        errors = [f.code for f in found if f.severity == "error"]
        assert not errors, f"the healthy model has findings: {errors}"

    # the init audit runs on the fresh model (before any step changes B), the steps after it
    init_audit()  # warm-up
    init_times = [timed(init_audit) for _ in range(args.repeats)]
    step_monitor.dispatch("init", model, step=0)
    train_step(1, audit=True)  # warm-up: allocations, AdamW state
    grad_times.clear()
    step_times = [train_step(step, audit=True) for step in range(2, args.repeats + 2)]

    step_s = statistics.median(step_times)
    init_s = statistics.median(init_times)
    grad_s = statistics.median(grad_times)
    print(f"model: {args.layers} layers, hidden {args.hidden}, {lora_layers} LoRA layers, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; batch {args.batch} x {args.seq}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"training step        {step_s * 1e3:9.1f} ms (median of {args.repeats})")
    print(f"init audit (+probe)  {init_s * 1e3:9.1f} ms  ratio {init_s / step_s:.2%} of one step")
    print(f"step audit (grads)   {grad_s * 1e3:9.1f} ms  ratio {grad_s / step_s:.2%} of one step "
          f"(first dead_after_steps steps only)")
    print("target: init audit < 5% of one training step:", "PASS" if init_s / step_s < 0.05 else "FAIL")


if __name__ == "__main__":
    main()
