"""Static cost of the fused hash kernel: its sm_90 machine code, counted per byte hashed, without a GPU.

Compiles ``callbacks.hashing.fused._hash_kernel`` for sm_90 (H100) with the default chunk, rows and warps, once
per element width (1, 2, 4, 8, 16 bytes), disassembles it with the ``cuobjdump`` that Triton ships, finds the
main loop (the backward branch around the 16-byte ``LDG.E.128`` loads) and counts its instructions by opcode.
From the counts it prints instructions per byte and an issue-bound throughput for a whole GPU:

- a warp instruction issues in one cycle per SM sub-partition (4 per SM);
- ``IMAD`` runs on the FMA pipe and the other integer instructions (``IADD3``, ``LOP3``, ``ISETP``, ``PRMT``,
  ``SHF``, ``SEL``) on the ALU pipe, each pipe 16 lanes wide, so a warp instruction holds its pipe 2 cycles;
  ``VIADD`` may go to either pipe: the range printed is "``VIADD`` balanced" .. "``VIADD`` on the ALU pipe".

These are upper bounds from instruction counts (no latency, memory or clock effects), meant to say whether
the kernel can keep up with HBM, not to replace ``benchmarks/hashes.py`` on a GPU: compare ``bound TB/s`` with
the GPU's memory bandwidth (H100 SXM: 3.35 TB/s HBM3 peak; H100 PCIe: 2.0 TB/s).

    python benchmarks/hash_kernel_sass.py [--sms 132] [--clock-ghz 1.755] [--widths 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import warnings

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from callbacks.hashing import fused  # noqa: E402

_WIDTH_BITS = {1: 1, 2: 2, 4: 4, 8: 8, 16: 16}
_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*?);")
_ALU = {"IADD3", "LOP3", "ISETP", "PRMT", "SHF", "SEL", "IABS", "IMNMX", "LEA", "FLO", "POPC", "BMSK"}
_FMA = {"IMAD"}


def compile_sass(width: int, num_warps: int = 8) -> str:
    """The kernel's SASS for sm_90, specialised for tensors of one element width."""
    signature = {"table_ptr": "*i64", "chunk_ptr": "*i64", "out_ptr": "*i64", "CHUNK": "constexpr",
                 "ROWS": "constexpr", "WIDTHS": "constexpr", "ALIGNED": "constexpr"}
    source = ASTSource(fused._hash_kernel, signature, constexprs={
        "CHUNK": fused.DEFAULT_CHUNK, "ROWS": fused.DEFAULT_ROWS, "WIDTHS": _WIDTH_BITS[width], "ALIGNED": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        return subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True, check=True).stdout


def main_loop(sass: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of the loop holding the unmasked 16-byte loads: the span from a backward
    branch's target to the branch, the first such span that contains an ``LDG.E.128``."""
    code = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_LINE.match, sass.splitlines()) if m]
    for address, opcode, operands in code:
        target = re.search(r"0x([0-9a-f]+)", operands)
        if opcode.startswith("BRA") and target and int(target.group(1), 16) < address:
            body = [c for c in code if int(target.group(1), 16) <= c[0] <= address]
            if any(op.startswith("LDG.E.128") for _, op, _ in body):
                return body
    raise RuntimeError("no main loop with 16-byte loads found")


def analyse(width: int, sms: int, clock_ghz: float, num_warps: int = 8) -> dict[str, float]:
    """Instruction counts of one width's main loop, per byte, and the issue-bound GPU throughput (TB/s)."""
    body = main_loop(compile_sass(width, num_warps))
    ops = collections.Counter(opcode.split(".")[0] for _, opcode, _ in body)
    loads = sum(1 for _, opcode, _ in body if opcode.startswith("LDG.E.128"))
    bytes_per_warp = 32 * 16 * loads  # one 16-byte load per thread and load instruction
    total = sum(ops.values())
    fma, alu, flexible = sum(ops[o] for o in _FMA), sum(ops[o] for o in _ALU), ops["VIADD"]
    # cycles per warp iteration on one sub-partition: issue (1/cycle) or a pipe (2 cycles per instruction)
    balanced = max(total, 2 * max(alu, fma, (alu + fma + flexible + 1) // 2))
    alu_only = max(total, 2 * max(alu + flexible, fma))
    per_cycle = 4 * sms * clock_ghz * 1e9 / 1e12  # sub-partitions x clock, in TB/s per byte-per-cycle
    return {"width": width, "instructions": total, "imad": fma, "alu": alu, "viadd": flexible,
            "bytes": bytes_per_warp, "per_byte": total / bytes_per_warp * 32,
            "bound_best": bytes_per_warp / balanced * per_cycle, "bound_worst": bytes_per_warp / alu_only * per_cycle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sms", type=int, default=132, help="SMs of the GPU (H100 SXM 132, H100 PCIe 114)")
    parser.add_argument("--clock-ghz", type=float, default=1.755, help="SM clock under load")
    parser.add_argument("--widths", default="1,2,4,8,16")
    args = parser.parse_args()
    print(f"sm_90, {args.sms} SMs at {args.clock_ghz} GHz, chunk {fused.DEFAULT_CHUNK}, rows {fused.DEFAULT_ROWS}, "
          f"8 warps; main loop per warp iteration")
    print(f"{'width':>5} {'instr':>6} {'IMAD':>5} {'ALU':>5} {'VIADD':>6} {'bytes':>6} {'instr/B/thread':>15} "
          f"{'bound TB/s':>14}")
    for width in (int(w) for w in args.widths.split(",")):
        r = analyse(width, args.sms, args.clock_ghz)
        print(f"{width:>5} {r['instructions']:>6} {r['imad']:>5} {r['alu']:>5} {r['viadd']:>6} {r['bytes']:>6} "
              f"{r['per_byte']:>15.2f} {r['bound_worst']:>6.2f} .. {r['bound_best']:<5.2f}")


if __name__ == "__main__":
    main()
