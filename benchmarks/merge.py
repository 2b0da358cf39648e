"""Cost of a checked merge against the merge itself: PEFT ``merge_and_unload`` of a 100-layer model, in one process.

Each repeat builds two identical LoRA models (not timed) and times ``merge_and_unload()`` on one and
``Monitor.checked_merge()`` on the other, alternating which goes first so drift hits both alike. Prints the
median times, their ratio, and parts of the check timed separately on a third model, with the garbage
collector paused as the check pauses it: a pass of the spec hash over every parameter (for comparison), a
snapshot pass with the batched change digest (XXH3 over the bytes on CPU, the fused kernel's one launch on CUDA;
the tensors' walk, storage identities and tie map included), and one probe forward (the check's one-sequence
batch). The check itself makes two snapshot passes (before and after the merge) and two probe forwards. Only
ratios from one run are meant to be compared.

    python benchmarks/merge.py [--layers 100] [--hidden 64,256,1024] [--rank 8] [--repeats 3] [--device cpu]
                               [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from callbacks import Monitor  # noqa: E402
from callbacks.hashing import hash_tensors, resolve_backend  # noqa: E402
from callbacks.merging import gc_paused  # noqa: E402
from callbacks.primitives.probe import build_probe_batch, run_probe  # noqa: E402
from callbacks.primitives.snapshots import snapshot_parameters  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(layers: int, hidden: int, rank: int, device: str):
    """A Llama of ``layers`` layers with LoRA (non-zero B) on every linear layer of every block."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                init_lora_weights=False))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def measure(layers: int, hidden: int, rank: int, repeats: int, device: str) -> dict[str, float]:
    plain, checked, hashing, digesting, probing = [], [], [], [], []
    for i in range(repeats):
        a, b = build(layers, hidden, rank, device), build(layers, hidden, rank, device)
        monitor = Monitor(policy="log")
        runs = [("plain", lambda m=a: m.merge_and_unload()), ("checked", lambda m=b, mon=monitor: mon.checked_merge(m))]
        for name, fn in runs if i % 2 == 0 else runs[::-1]:
            (plain if name == "plain" else checked).append(timed(fn, device))
        assert monitor.findings == [], monitor.findings
        # the parts, on a third model: one spec hash pass, one digest pass and one probe forward, with the
        # garbage collector paused as the check pauses it (a full collection would land in any of them)
        c = build(layers, hidden, rank, device)
        with gc_paused():
            hashing.append(timed(lambda m=c: hash_tensors([p.detach() for p in m.parameters()]), device))
            digesting.append(timed(lambda m=c: snapshot_parameters(m), device))
            batch = build_probe_batch(c, batch_size=1)
            probing.append(timed(lambda m=c, x=batch: run_probe(m, x), device))
        del a, b, c
    params = sum(p.numel() for p in build(layers, hidden, rank, "meta").parameters())
    return {"params": params, "plain": statistics.median(plain), "checked": statistics.median(checked),
            "hash": statistics.median(hashing), "digest": statistics.median(digesting),
            "probe": statistics.median(probing)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--hidden", default="64,256,1024", help="comma-separated hidden sizes")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared machine more threads spin-wait and swamp the ratio)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    probe_tensor = torch.zeros(1, device=args.device)
    backend = resolve_backend("auto", [probe_tensor])
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device {name}, torch threads {torch.get_num_threads()}, hash backend {backend}, "
          f"{args.layers} layers, LoRA r={args.rank} on {len(TARGETS)} linears per layer, {args.repeats} repeats")
    print(f"{'hidden':>6} {'params':>11} {'merge s':>9} {'checked s':>10} {'ratio':>6} "
          f"{'hash pass s':>12} {'digest pass s':>14} {'probe s':>8}")
    for hidden in (int(h) for h in args.hidden.split(",")):
        r = measure(args.layers, hidden, args.rank, args.repeats, args.device)
        print(f"{hidden:>6} {r['params']:>11,} {r['plain']:>9.3f} {r['checked']:>10.3f} "
              f"{r['checked'] / r['plain']:>6.2f} {r['hash']:>12.3f} {r['digest']:>14.3f} {r['probe']:>8.3f}")


if __name__ == "__main__":
    main()
