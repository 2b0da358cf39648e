"""The hashing primitive: the torch reference against the spec, and the fused Triton kernel against the reference.

The kernel runs under Triton's interpreter on CPU in a subprocess (``TRITON_INTERPRET=1`` must be set before
triton compiles the kernel, and other test modules may import the kernel module first); CUDA tests are marked
``cuda`` and skipped without a device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import callbacks
from callbacks.errors import ConfigError
from callbacks.hashing import hash_stats_tensor, hash_tensors, hash_with_stats, reference, resolve_backend, spec

ROOT = Path(__file__).resolve().parents[1]


def _dtypes() -> list[torch.dtype]:
    """Every dtype the hash covers, float8 types where this torch has them."""
    names = [
        "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
        "float16", "bfloat16", "float32", "float64", "complex64", "complex128",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    ]
    return [getattr(torch, n) for n in names if hasattr(torch, n)]


DTYPES = _dtypes()


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` (every bit pattern: NaNs, Infs, subnormals, -0.0 included)."""
    g = torch.Generator().manual_seed(seed)
    size = spec.element_size(dtype)
    numel = 1
    for d in shape:
        numel *= d
    raw = torch.randint(0, 256, (numel * size,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw &= 1
    return raw.view(dtype).reshape(shape)


def _spec_hash(t: torch.Tensor) -> int:
    """The hash computed from the spec's text with Python ints, one unit at a time (slow; tiny tensors only)."""
    data = bytes(t.contiguous().reshape(-1).view(torch.uint8).tolist())
    data += b"\0" * (-len(data) % spec.UNIT_BYTES)  # the last unit completed with zero bytes
    total = 0
    for j in range(len(data) // spec.UNIT_BYTES):
        u = int.from_bytes(data[j * spec.UNIT_BYTES:(j + 1) * spec.UNIT_BYTES], "little")
        total = (total + spec.mix64(u ^ (j * spec.KEY_MULT))) & spec.MASK64
    return spec.finalize(total, t.dtype, tuple(t.shape))


def test_worktree_package_is_imported():
    assert str(ROOT) in callbacks.__file__


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_equals_spec_text_and_sees_a_flipped_bit(dtype, monkeypatch):
    monkeypatch.setattr(reference, "CHUNK_UNITS", 8)  # several reference chunks even for tiny tensors
    t = _random(dtype, (3, 7), seed=1)
    h = reference.hash_tensor(t)
    assert h == _spec_hash(t)
    assert 0 <= h < 2**64
    # equal bytes in another storage: equal hash
    assert reference.hash_tensor(t.clone()) == h
    # one flipped bit anywhere changes it (bool: flip a whole element, the only valid change)
    raw = t.clone().reshape(-1).view(torch.uint8)
    raw[5] ^= 1
    assert reference.hash_tensor(raw.view(dtype).reshape(3, 7)) != h


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16, torch.float32, torch.float64, torch.complex64])
def test_swapping_two_elements_changes_the_hash(dtype):
    t = _random(dtype, (16,), seed=2)
    while bool((t.view(torch.uint8).reshape(16, -1)[3] == t.view(torch.uint8).reshape(16, -1)[11]).all()):
        t = _random(dtype, (16,), seed=3)
    swapped = t.clone()
    swapped[3], swapped[11] = t[11].clone(), t[3].clone()
    assert reference.hash_tensor(swapped) != reference.hash_tensor(t)
    if hasattr(torch, "hash_tensor") and dtype in (torch.int8,):
        # the peer is order-independent: it cannot see a swap (why our hash is keyed by position)
        assert torch.hash_tensor(swapped) == torch.hash_tensor(t)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_negative_zero_differs_from_zero(dtype):
    zero = torch.zeros(4, dtype=dtype)
    neg = zero.clone()
    neg[2] = -0.0
    assert torch.equal(zero, neg)  # equal by value...
    assert reference.hash_tensor(zero) != reference.hash_tensor(neg)  # ...not by bits


def test_dtype_and_shape_are_part_of_the_hash():
    t = _random(torch.bfloat16, (4, 6))
    assert reference.hash_tensor(t) != reference.hash_tensor(t.reshape(6, 4))
    assert reference.hash_tensor(t) != reference.hash_tensor(t.view(torch.int16))
    assert reference.hash_tensor(torch.empty(0)) != reference.hash_tensor(torch.empty(0, 3))
    assert reference.hash_tensor(torch.empty(0)) != reference.hash_tensor(torch.empty(0, dtype=torch.int32))


def test_empty_and_one_element_tensors():
    for t in (torch.empty(0), torch.empty(2, 0), torch.tensor(1.5), torch.tensor([7], dtype=torch.int64)):
        assert reference.hash_tensor(t) == _spec_hash(t)
    assert reference.hash_tensor(torch.tensor(1.5)) != reference.hash_tensor(torch.tensor([1.5]))
    assert reference.nonzero_count(torch.empty(0)) == 0


@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16, torch.bool])
def test_small_dtypes_pack_into_4_byte_units_wherever_they_sit(dtype):
    """1- and 2-byte elements share units; a tensor starting mid-unit or ending mid-unit hashes like its copy, and
    the zero padding of the last unit is not confused with zero elements (the shape is in the header)."""
    t = _random(dtype, (41,), seed=6)
    for view in (t[1:], t[2:], t[3:40], t[:-1]):  # every offset and length modulo 4 bytes
        assert reference.hash_tensor(view) == reference.hash_tensor(view.clone()) == _spec_hash(view.clone())
    zeros = torch.zeros(6, dtype=dtype)
    assert reference.hash_tensor(zeros[:5]) != reference.hash_tensor(zeros)


def test_non_contiguous_input_hashes_its_contiguous_bytes():
    t = _random(torch.float32, (5, 8))
    assert reference.hash_tensor(t.t()) == reference.hash_tensor(t.t().contiguous())
    assert reference.hash_tensor(t[:, ::2]) == reference.hash_tensor(t[:, ::2].contiguous())


def test_chunking_never_changes_the_reference(monkeypatch):
    t = _random(torch.bfloat16, (1000,), seed=4)
    expected = reference.hash_tensor(t)
    for chunk in (1, 7, 64, 999, 1000, 1001):
        monkeypatch.setattr(reference, "CHUNK_UNITS", chunk)
        assert reference.hash_tensor(t) == expected


def test_pinned_values_guard_the_spec():
    """Changing the spec changes stored ledgers: these values must only change on purpose."""
    assert reference.hash_tensor(torch.arange(10, dtype=torch.int32)) == PINNED["arange10_int32"]
    assert reference.hash_tensor(torch.zeros(3, dtype=torch.bfloat16)) == PINNED["zeros3_bf16"]
    assert reference.hash_tensor(torch.empty(0)) == PINNED["empty_f32"]
    assert reference.hash_tensor(torch.arange(5, dtype=torch.int8)) == PINNED["arange5_int8"]  # a padded unit


PINNED = {
    "arange10_int32": 5498160995656569308,
    "zeros3_bf16": 7673599088816712602,  # 4-byte units for every dtype since 2026-11-23 (was 7222232102072596795)
    "empty_f32": 16154367841826211821,
    "arange5_int8": 15080063756621666044,
}


def _special_values(dtype: torch.dtype) -> torch.Tensor:
    """NaN, +-Inf, +-0.0, a normal number and random bits."""
    specials = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.5]
    if dtype.is_complex:
        base = torch.tensor([complex(a, b) for a in specials for b in specials[3:]], dtype=dtype)
    else:
        base = torch.tensor(specials, dtype=torch.float32).to(dtype)
    return torch.cat([base, _random(dtype, (50,), seed=5)])


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d.is_floating_point or d.is_complex], ids=str)
def test_counts_match_torch_on_the_values(dtype):
    t = _special_values(dtype)
    values = t if (dtype.is_complex or spec.element_size(dtype) > 1) else t.float()
    nonfinite, nonzero = int((~torch.isfinite(values)).sum()), int(torch.count_nonzero(values))
    assert (reference.count_bits(t, "nonfinite"), reference.count_bits(t, "nonzero")) == (nonfinite, nonzero)
    assert (reference.nonfinite_count(t), reference.nonzero_count(t)) == (nonfinite, nonzero)
    assert 0 < nonfinite < nonzero < t.numel() or dtype == getattr(torch, "float8_e8m0fnu", None)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if not (d.is_floating_point or d.is_complex)], ids=str)
def test_counts_of_integer_and_bool_dtypes(dtype):
    t = torch.tensor([0, 1, 1, 0, 1], dtype=torch.uint8).view(torch.bool).to(dtype) if dtype != torch.bool else None
    t = torch.tensor([False, True, True, False, True]) if t is None else t
    assert (reference.count_bits(t, "nonfinite"), reference.count_bits(t, "nonzero")) == (0, 3)
    assert (reference.nonfinite_count(t), reference.nonzero_count(t)) == (0, 3)


def test_dispatch_torch_backend_and_auto_on_cpu():
    ts = [_random(torch.float32, (3, 3)), torch.tensor([float("nan"), 0.0, 2.0])]
    assert resolve_backend("auto", ts) == "torch"
    stats = hash_with_stats(ts, backend="torch")
    assert stats.hashes == reference.hash_tensors(ts) == hash_tensors(ts)
    assert stats.nonfinite == [reference.nonfinite_count(ts[0]), 1]
    assert stats.nonzero[1] == 2
    with pytest.raises(ConfigError):
        resolve_backend("cuda", ts)
    table = hash_stats_tensor(ts, backend="torch")
    assert table[:, 0].view(torch.uint64).tolist() == stats.hashes
    assert table[:, 1].tolist() == stats.nonfinite and table[:, 2].tolist() == stats.nonzero
    assert hash_stats_tensor([]).shape == (0, 3)


# ---------------------------------------------------------------------------------------------------------------
# The kernel under Triton's interpreter (CPU), in a subprocess.

_INTERPRETER_SCRIPT = r"""
import json, torch
from callbacks.hashing import fused, reference
from tests.test_hashing import DTYPES, _random, _special_values

CHUNK, ROWS = 256, 8  # small, so that small tensors cross many chunk and loop-iteration boundaries
BLOCK = 16 * ROWS // 2  # bf16 elements per iteration
cases = {}
def add(name, t):
    cases[name] = t
for d in DTYPES:
    add(f"{d}:random", _random(d, (5, 61), seed=7))
    if d.is_floating_point or d.is_complex:
        add(f"{d}:specials", _special_values(d))
for n in (0, 1, BLOCK - 1, BLOCK, BLOCK + 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5):
    add(f"bf16:numel={n}", _random(torch.bfloat16, (n,), seed=n))
for n in (1, 2, 3, 5, 4 * BLOCK - 1, CHUNK + 3):  # 1-byte elements: every fill of the last 4-byte unit
    add(f"fp8:numel={n}", _random(getattr(torch, "float8_e8m0fnu", torch.uint8), (n,), seed=n))  # 0x00 non-zero
    add(f"bool:numel={n}", _random(torch.bool, (n,), seed=n))
add("f32:scalar", torch.tensor(2.5))
add("f32:noncontiguous", _random(torch.float32, (20, 30), seed=8).t())
add("f32:-0.0", torch.tensor([0.0, -0.0, 0.0]))

names = list(cases)
tensors = [cases[n] for n in names]
stats = fused.fused_hash_with_stats(tensors, chunk=CHUNK, rows=ROWS)
result = {"cases": {}}
for i, n in enumerate(names):
    t = tensors[i]
    result["cases"][n] = {
        "kernel": [str(stats.hashes[i]), stats.nonfinite[i], stats.nonzero[i]],
        "reference": [str(reference.hash_tensor(t)), reference.nonfinite_count(t), reference.nonzero_count(t)],
    }

# a tensor whose address is not 16-byte aligned: its own launch takes the unhinted path; one that starts inside a
# 4-byte unit (a bf16 slice at an odd offset) is hashed from an aligned copy
source = _random(torch.bfloat16, (301,), seed=9)
unaligned, odd = source[2:], source[1:]
result["unaligned_equal"] = (
    fused.fused_hash_with_stats([unaligned], chunk=CHUNK, rows=ROWS).hashes == [reference.hash_tensor(unaligned)]
    and fused.fused_hash_with_stats([odd, unaligned], chunk=CHUNK, rows=ROWS).hashes
    == reference.hash_tensors([odd, unaligned])
    and not fused._plan_for([unaligned], CHUNK).aligned and fused._plan_for(tensors, CHUNK).aligned
)

# the layout cache: same tensors, no rebuild, and a data change is seen through the cached table
group = [_random(torch.float32, (100,), seed=10), _random(torch.int32, (40,), seed=11)]
before = fused.plan_builds
first = fused.fused_hash_with_stats(group, chunk=CHUNK, rows=ROWS).hashes
second = fused.fused_hash_with_stats(group, chunk=CHUNK, rows=ROWS).hashes
group[0].view(torch.int32)[17] ^= 1  # a one-bit change in place
third = fused.fused_hash_with_stats(group, chunk=CHUNK, rows=ROWS).hashes
builds_same_layout = fused.plan_builds - before
group[1] = group[1].clone()  # a new data_ptr: the table must be rebuilt
fourth = fused.fused_hash_with_stats(group, chunk=CHUNK, rows=ROWS).hashes
result["cache"] = {
    "builds_same_layout": builds_same_layout,
    "builds_after_new_ptr": fused.plan_builds - before,
    "repeat_equal": first == second,
    "change_seen": third[0] != first[0] and third[1] == first[1],
    "after_new_ptr_equal": fourth == third == reference.hash_tensors(group),
}
# default chunk and block on a tensor of a few chunks (the production configuration)
big = _random(torch.bfloat16, (70000,), seed=12)
result["default_config_equal"] = fused.fused_hash_with_stats([big]).hashes == [reference.hash_tensor(big)]
# the public dispatch with backend="triton" runs the kernel (here: interpreted on CPU tensors)
from callbacks.hashing import hash_stats_tensor, hash_with_stats
few = [cases["torch.bfloat16:specials"], cases["f32:noncontiguous"], cases["bf16:numel=0"]]
result["dispatch_equal"] = (
    hash_with_stats(few, backend="triton") == hash_with_stats(few, backend="torch")
    and torch.equal(hash_stats_tensor(few, backend="triton"), hash_stats_tensor(few, backend="torch"))
)
print("RESULT" + json.dumps(result))
"""


@pytest.fixture(scope="module")
def interpreted():
    """Run the kernel under TRITON_INTERPRET=1 in a fresh process and return its JSON result."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.mark.slow  # the interpreter subprocess (the module fixture)
def test_kernel_equals_reference_bit_for_bit_under_the_interpreter(interpreted):
    cases = interpreted["cases"]
    assert len(cases) > 30
    mismatches = {n: c for n, c in cases.items() if c["kernel"] != c["reference"]}
    assert not mismatches
    # the cases are not vacuous: hashes differ between tensors, specials are counted
    assert len({c["kernel"][0] for c in cases.values()}) == len(cases)
    assert cases["torch.float32:specials"]["kernel"][1] > 0
    assert cases["f32:-0.0"]["kernel"][2] == 0


@pytest.mark.slow
def test_kernel_layout_cache_under_the_interpreter(interpreted):
    cache = interpreted["cache"]
    assert cache["builds_same_layout"] == 1
    assert cache["builds_after_new_ptr"] == 2
    assert cache["repeat_equal"] and cache["change_seen"] and cache["after_new_ptr_equal"]
    assert interpreted["default_config_equal"]
    assert interpreted["dispatch_equal"]
    assert interpreted["unaligned_equal"]


_COMPILE_SCRIPT = r"""
import json, sys, triton
try:
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
except ImportError:
    print("NOBACKEND")
    sys.exit(0)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from callbacks.hashing import fused

def compile_ptx(widths, aligned):
    signature = {"table_ptr": "*i64", "chunk_ptr": "*i64", "out_ptr": "*i64", "CHUNK": "constexpr",
                 "ROWS": "constexpr", "WIDTHS": "constexpr", "ALIGNED": "constexpr"}
    constexprs = {"CHUNK": fused.DEFAULT_CHUNK, "ROWS": fused.DEFAULT_ROWS, "WIDTHS": widths, "ALIGNED": aligned}
    src = ASTSource(fn=fused._hash_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ptx"]

bf16 = compile_ptx(2, True)
every = compile_ptx(31, False)
print("RESULT" + json.dumps({"bf16_v4": "ld.global.v4" in bf16, "every_width": "ld.global" in every}))
"""


@pytest.mark.slow
def test_kernel_compiles_for_sm90_without_a_gpu():
    """The interpreter does not type-check like the compiler: compile every width for H100 (no GPU needed)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if "NOBACKEND" in proc.stdout:
        pytest.skip("this triton has no CUDA backend")
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[len("RESULT"):])
    assert result == {"bf16_v4": True, "every_width": True}  # 16-byte vector loads on the aligned bf16 path


def test_kernel_constants_are_the_spec_constants():
    source = (ROOT / "callbacks" / "hashing" / "fused.py").read_text()
    assert f"0x{spec.KEY_MULT:X}" in source and f"0x{spec.MIX_MULT:X}" in source


# ---------------------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
def test_cuda_kernel_equals_reference_for_every_dtype():
    pytest.importorskip("triton")
    from callbacks.hashing import fused

    tensors = []
    for d in DTYPES:
        tensors.append(_random(d, (123, 457), seed=13).cuda())
        if d.is_floating_point or d.is_complex:
            tensors.append(_special_values(d).cuda())
    tensors += [torch.empty(0, device="cuda"), torch.tensor(3.0, device="cuda"),
                _random(torch.bfloat16, (3 * fused.DEFAULT_CHUNK + 17,), seed=14).cuda(),
                _random(torch.float32, (64, 96), seed=15).cuda().t(),
                _random(torch.uint8, (1001,), seed=16).cuda()[3:], _random(torch.bfloat16, (999,), seed=17).cuda()[1:],
                _random(torch.bfloat16, (999,), seed=18).cuda()[2:]]
    assert resolve_backend("auto", tensors) == "triton"
    got = hash_with_stats(tensors, backend="auto")
    want = hash_with_stats(tensors, backend="torch")
    assert got == want
    assert want.hashes == hash_with_stats([t.cpu() for t in tensors], backend="torch").hashes
    assert torch.equal(hash_stats_tensor(tensors, backend="triton"), hash_stats_tensor(tensors, backend="torch"))


@pytest.mark.cuda
def test_cuda_layout_cache_sees_changes():
    pytest.importorskip("triton")
    from callbacks.hashing import fused

    ts = [torch.randn(5000, device="cuda", dtype=torch.bfloat16), torch.randn(77, device="cuda")]
    builds = fused.plan_builds
    a = hash_tensors(ts)
    b = hash_tensors(ts)
    ts[0][4999] = 1.0
    c = hash_tensors(ts)
    assert fused.plan_builds - builds == 1
    assert a == b and c[0] != a[0] and c == reference.hash_tensors(ts)
