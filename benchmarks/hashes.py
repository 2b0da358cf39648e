"""Throughput of the tensor hash, with peers, measured in one run (ratios are what to compare).

GPU section (runs when CUDA is available): the parameter shapes of a 7B Llama (32 layers, hidden 4096,
intermediate 11008, vocab 32000: 6.74 B parameters, 13.5 GB in bfloat16), hashed by

- the fused Triton kernel (one launch for the whole list; layout table cached, as in training),
- the per-tensor torch reference (the specification, vectorised torch ops, one tensor at a time),
- ``torch._foreach_norm`` over the same list (PyTorch's own fused multi-tensor reduction),
- ``torch.hash_tensor`` per tensor (PyTorch's XOR hash; blind to swapped elements) where this torch has it,
- sha256 per tensor after a copy to host (Megatron-LM's replica check), on the first ``--sha-gb`` GB,

each as GB/s of tensor bytes read and as a fraction of the measured device-to-device copy bandwidth
(``dst.copy_(src)``: bytes read + bytes written per second). Also printed: the fused kernel's host time per call
and the share of a 7B training step that hashing every gradient adds (an estimate from stated assumptions).

CPU section (always): the reference's throughput against ``torch.sum`` over the same bytes, ratio in one run
(interleaved repeats, medians).

    python benchmarks/hashes.py            # full sizes
    python benchmarks/hashes.py --small    # 2 Llama layers on GPU, 16 MB on CPU
    TRITON_INTERPRET=1 python benchmarks/hashes.py --smoke   # the GPU section on CPU with tiny shapes
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from callbacks.hashing import reference, triton_available  # noqa: E402


def llama_shapes(layers: int = 32, hidden: int = 4096, intermediate: int = 11008, vocab: int = 32000):
    """(name, shape) of every parameter of a Llama-2-7B-like model (untied embedding and head)."""
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (intermediate, hidden)),
                   (p + "mlp.up_proj.weight", (intermediate, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, intermediate))]
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def nbytes(tensors) -> int:
    """Total bytes of a tensor list."""
    return sum(t.numel() * t.element_size() for t in tensors)


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` (synchronised on CUDA), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sha256_after_copy(tensors) -> list[str]:
    """Megatron-style: copy each tensor to host and sha256 its bytes."""
    out = []
    for t in tensors:
        host = t.detach().contiguous().cpu()
        out.append(hashlib.sha256(host.reshape(-1).view(torch.uint8).numpy()).hexdigest())
    return out


def copy_bandwidth(device: torch.device, total_bytes: int, repeats: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(total_bytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeats)
    return 2 * total_bytes / seconds


def gpu_section(args) -> None:
    """Fused kernel vs peers on the 7B Llama shapes (or tiny ones with --smoke on CPU)."""
    from callbacks.hashing import fused

    if args.smoke:
        device = torch.device("cpu")
        shapes = llama_shapes(layers=2, hidden=64, intermediate=172, vocab=128)
        copy_bytes, chunk, rows = 1 << 20, 256, 8
    else:
        device = torch.device("cuda")
        shapes = llama_shapes(layers=2 if args.small else 32)
        copy_bytes, chunk, rows = 1 << 31, fused.DEFAULT_CHUNK, fused.DEFAULT_ROWS
    gen = torch.Generator(device=device).manual_seed(0)
    tensors = [torch.randn(s, generator=gen, device=device, dtype=torch.bfloat16) for _, s in shapes]
    size = nbytes(tensors)
    repeats = 1 if args.smoke else args.repeats
    print(f"== GPU section: {len(tensors)} tensors, {size / 1e9:.2f} GB bfloat16 on {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else " (smoke run: timings meaningless)"))

    copy_bw = copy_bandwidth(device, copy_bytes, repeats)
    results: list[tuple[str, float, str]] = []

    def run(name: str, fn: Callable[[], object], data_bytes: int = size, reps: int = repeats, note: str = "") -> float:
        try:
            seconds = timed(fn, device, reps)
        except (RuntimeError, NotImplementedError) as exc:  # a peer this torch/device lacks: say so, go on
            print(f"{name}: not measured ({type(exc).__name__}: {str(exc)[:100]})")
            return float("nan")
        results.append((name, data_bytes / seconds, note))
        return seconds

    fused_call = lambda: fused.fused_hash_table(tensors, chunk=chunk, rows=rows)  # noqa: E731
    fused_s = run("fused Triton kernel (1 launch)", fused_call)
    got = fused.fused_hash_with_stats(tensors, chunk=chunk, rows=rows).hashes
    # host-side cost per call with the layout cached (launch is asynchronous; no synchronisation inside)
    host = []
    for _ in range(max(3, repeats)):
        t0 = time.perf_counter()
        fused_call()
        host.append(time.perf_counter() - t0)
        if device.type == "cuda":
            torch.cuda.synchronize()
    ref_reps = 1 if not args.smoke else 1
    ref_s = run("torch reference, per tensor", lambda: [reference.unit_sum_tensor(t) for t in tensors], reps=ref_reps)
    want = reference.hash_tensors(tensors)
    foreach_s = run("torch._foreach_norm (fused multi-tensor)", lambda: torch._foreach_norm(tensors))
    if hasattr(torch, "hash_tensor"):
        run("torch.hash_tensor per tensor (xor; order-blind)", lambda: [torch.hash_tensor(t) for t in tensors])
    sha_list, sha_bytes = [], 0
    for t in tensors:
        if sha_bytes >= args.sha_gb * 1e9:
            break
        sha_list.append(t)
        sha_bytes += t.numel() * t.element_size()
    run("sha256 per tensor after copy to host", lambda: sha256_after_copy(sha_list), data_bytes=sha_bytes, reps=1,
        note=f"on the first {sha_bytes / 1e9:.2f} GB")

    print(f"device-to-device copy: {copy_bw / 1e9:,.0f} GB/s (read + write)")
    print(f"{'method':52s} {'GB/s':>10s} {'of copy bw':>11s}")
    for name, bw, note in results:
        print(f"{name:52s} {bw / 1e9:10,.1f} {bw / copy_bw:10.1%}  {note}")
    print(f"fused == reference bit for bit: {got == want}")
    print(f"fused / _foreach_norm speed: {foreach_s / fused_s:.2f}x; fused / reference: {ref_s / fused_s:.1f}x")
    fraction = size / fused_s / copy_bw
    print(f"target fused >= 85% of copy bandwidth: {'met' if fraction >= 0.85 else 'NOT met'} ({fraction:.1%}); "
          f"target fused at least as fast as _foreach_norm: {'met' if fused_s <= foreach_s else 'NOT met'}")
    print(f"fused host time per call (cached layout, {len(tensors)} tensors): {statistics.median(host) * 1e3:.2f} ms")
    # share of a training step: hashing every gradient (same shapes and dtype as the parameters) once per step
    params = sum(t.numel() for t in tensors)
    step_s = 6 * params * args.step_tokens / (args.step_tflops * 1e12)
    print(f"hashing every gradient once per step: {fused_s * 1e3:.2f} ms = {fused_s / step_s:.2%} of an estimated "
          f"{step_s:.2f} s step ({args.step_tokens} tokens per step at {args.step_tflops:.0f} TFLOP/s achieved; "
          f"6 FLOP per parameter per token): target < 1% {'met' if fused_s < 0.01 * step_s else 'NOT met'}")


def cpu_section(args) -> None:
    """The reference's throughput against torch.sum over the same bytes (wall and process CPU time)."""
    torch.set_num_threads(args.threads)
    total = (16 if args.small else 64) * 2**20
    gen = torch.Generator().manual_seed(0)
    sizes = [total // 8, total // 4, total // 8, total // 2]  # bytes per tensor, a mix of sizes
    tensors = [torch.randn(b // 2, generator=gen, dtype=torch.bfloat16) for b in sizes]
    size = nbytes(tensors)
    print(f"== CPU section: {len(tensors)} bfloat16 tensors, {size / 2**20:.0f} MiB, "
          f"{torch.get_num_threads()} torch thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    methods = {
        "torch reference hash": lambda: [reference.unit_sum_tensor(t) for t in tensors],
        "torch.sum": lambda: [t.sum() for t in tensors],
        "reference NaN/Inf + non-zero counts": lambda: [
            (reference.nonfinite_count(t), reference.nonzero_count(t)) for t in tensors],
        "sha256 (hashlib)": lambda: sha256_after_copy(tensors),
    }
    if hasattr(torch, "hash_tensor"):
        methods["torch.hash_tensor (xor; order-blind)"] = lambda: [torch.hash_tensor(t) for t in tensors]
    wall: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        fn()  # warm-up
    for _ in range(args.repeats):  # interleaved, so that load on the machine hits every method alike
        for name, fn in methods.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    print(f"{'method':38s} {'MB/s wall':>10s} {'MB/s CPU time':>14s}")
    med_wall = {n: statistics.median(v) for n, v in wall.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
    for name in methods:
        print(f"{name:38s} {size / med_wall[name] / 1e6:10,.0f} {size / med_cpu[name] / 1e6:14,.0f}")
    ratio_wall = med_wall["torch reference hash"] / med_wall["torch.sum"]
    ratio_cpu = med_cpu["torch reference hash"] / med_cpu["torch.sum"]
    print(f"reference hash is {ratio_wall:.0f}x slower than torch.sum (wall), {ratio_cpu:.0f}x (CPU time)")


def main(argv: list[str] | None = None) -> None:
    """Parse options and run the sections that this machine supports."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="2 Llama layers on GPU, 16 MB on CPU")
    parser.add_argument("--smoke", action="store_true", help="the GPU section on CPU, tiny (needs TRITON_INTERPRET=1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sha-gb", type=float, default=2.0, help="GB hashed by the sha256 peer on GPU")
    parser.add_argument("--step-tokens", type=int, default=4 * 4096, help="tokens per training step (estimate)")
    parser.add_argument("--step-tflops", type=float, default=400.0, help="achieved TFLOP/s of a step (estimate)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in the CPU section")
    parser.add_argument("--cpu-only", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        gpu_section(args)
        return
    if torch.cuda.is_available() and not args.cpu_only:
        if not triton_available():
            print("triton is not importable: the GPU section needs it")
        else:
            gpu_section(args)
    else:
        print("== GPU section skipped: no CUDA device")
    cpu_section(args)


if __name__ == "__main__":
    main()
