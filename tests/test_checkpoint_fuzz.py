"""Fuzzers for the checkpoint readers: the safetensors header, the torch zip/pickle key reader and the DCP metadata
reader. Whatever the bytes, a reader returns a listing or one :class:`CheckpointReadError` (never another exception),
within a time bound, with bounded memory, and what it accepts the real library reads back the same; files the
real writers produce always list clean."""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import resource
import struct
import tempfile
import time
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from callbacks.primitives import checkpoints as ck
from callbacks.primitives.checkpoints import CheckpointReadError, list_checkpoint

#: each example is judged within this (the slowest measured is a few ms); hypothesis' deadline is the same
TIME_BOUND_S = 5.0
#: the whole fuzz run may grow the process's peak RSS by at most this
RSS_BOUND = 512 * 2**20
#: CI runs the same examples every time (a fixed seed: a red CI is a reproducible finding, never a flake);
#: FUZZ_RANDOM=1 explores new ones (a failure it finds becomes a regression test in test_hostile_checkpoints.py)
RANDOM = bool(os.environ.get("FUZZ_RANDOM"))
FUZZ = settings(max_examples=200, deadline=TIME_BOUND_S * 1000, database=None, derandomize=not RANDOM,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def peak_rss() -> int:
    """Peak resident set size of this process so far, bytes (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.fixture(autouse=True)
def memory_bound():
    """Every fuzzer here leaves the process's peak RSS within :data:`RSS_BOUND` of where it started."""
    before = peak_rss()
    yield
    assert peak_rss() - before < RSS_BOUND, (peak_rss() - before) / 2**20


def judged(folder: str):
    """``list_checkpoint(folder)`` within the time bound; only CheckpointReadErrors, each naming a file."""
    start = time.perf_counter()
    listing = list_checkpoint(folder)
    assert time.perf_counter() - start < TIME_BOUND_S
    for err in listing.errors:
        assert isinstance(err, CheckpointReadError) and err.path and err.reason
    return listing


def mutate(data: st.DataObject, blob: bytes) -> bytes:
    """``blob`` with a few bytes overwritten, then maybe cut short or extended."""
    out = bytearray(blob)
    for _ in range(data.draw(st.integers(0, 6), label="edits")):
        if out:
            out[data.draw(st.integers(0, len(out) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.sampled_from(["keep", "truncate", "append"]))
    if cut == "truncate" and out:
        out = out[: data.draw(st.integers(0, len(out) - 1))]
    elif cut == "append":
        out += data.draw(st.binary(max_size=64))
    return bytes(out)


# -- safetensors headers --------------------------------------------------------------------------------------
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "U8": torch.uint8,
          "BOOL": torch.bool, "I32": torch.int32, "F64": torch.float64}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
ENTRY = st.fixed_dictionaries({
    "dtype": st.sampled_from([*DTYPES, "F4", "X9", ""]) | JSON_VALUES,
    "shape": st.lists(st.integers(-2, 6) | st.booleans() | st.floats(0, 4), max_size=3) | JSON_VALUES,
    "data_offsets": st.lists(st.integers(-4, 200) | st.booleans(), min_size=0, max_size=3) | JSON_VALUES,
})


def write_safetensors(folder: str, header: object, data: bytes) -> str:
    blob = json.dumps(header).encode()
    path = os.path.join(folder, "model.safetensors")
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob + data)
    return path


def assert_safetensors_reads_back(path: str, listing) -> None:
    """What the header reader accepted, safetensors itself reads, with the same dtypes and shapes."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as fh:
        for key, entry in listing.tensors.items():
            tensor = fh.get_tensor(key)
            assert (str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)) == (entry.dtype, entry.shape)


@FUZZ
@given(header=st.dictionaries(st.text(max_size=6), ENTRY, max_size=4)
       | st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=4) | JSON_VALUES,
       data_len=st.integers(0, 256))
def test_fuzzed_safetensors_header(header, data_len):
    with tempfile.TemporaryDirectory() as folder:
        path = write_safetensors(folder, header, b"\0" * data_len)
        listing = judged(folder)
        if not listing.errors:
            assert_safetensors_reads_back(path, listing)


SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1, "I32": 4, "F64": 8}


@st.composite
def nearly_valid_headers(draw) -> tuple[dict, int]:
    """A header whose entries are laid out as safetensors lays them out, then maybe lied about in one place:
    a boolean or float dimension, an offset moved (overlap or gap), the data section one byte off."""
    entries, position = {}, 0
    for key in draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=4, unique=True)):
        dtype = draw(st.sampled_from(sorted(SIZES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        numel = 1
        for dim in shape:
            numel *= dim
        entries[key] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + numel * SIZES[dtype]]}
        position += numel * SIZES[dtype]
    data_len = position
    lie = draw(st.sampled_from(["none", "bool-dim", "float-dim", "shift", "data"]))
    entry = entries[draw(st.sampled_from(sorted(entries)))]
    if lie == "bool-dim" and entry["shape"]:
        entry["shape"][0] = bool(entry["shape"][0]) if entry["shape"][0] in (0, 1) else entry["shape"][0]
    elif lie == "float-dim" and entry["shape"]:
        entry["shape"][0] = float(entry["shape"][0])
    elif lie == "shift":
        delta = draw(st.integers(-8, 8))
        entry["data_offsets"] = [max(0, v + delta) for v in entry["data_offsets"]]
    elif lie == "data":
        data_len = max(0, data_len + draw(st.sampled_from([-1, 1])))
    return entries, data_len


@FUZZ
@given(case=nearly_valid_headers())
def test_fuzzed_nearly_valid_safetensors_header(case):
    header, data_len = case
    with tempfile.TemporaryDirectory() as folder:
        path = write_safetensors(folder, header, bytes(range(256)) * (data_len // 256) + bytes(data_len % 256))
        listing = judged(folder)
        if not listing.errors:  # accepted: safetensors reads it, and it held no lie
            assert_safetensors_reads_back(path, listing)
            assert all(type(d) is int for e in header.values() for d in e["shape"])


@FUZZ
@given(data=st.data(), shapes=st.dictionaries(st.text(min_size=1, max_size=8), st.tuples(
    st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 4), max_size=3)), min_size=1, max_size=4))
def test_fuzzed_bytes_of_a_real_safetensors_file(data, shapes):
    tensors = {k: torch.zeros(shape, dtype=DTYPES[dtype]) for k, (dtype, shape) in shapes.items()}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.safetensors")
        save_file(tensors, path)
        healthy = judged(folder)  # the twin: what safetensors writes lists clean, exactly
        assert not healthy.errors and {k: (e.dtype, e.shape) for k, e in healthy.tensors.items()} == {
            k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in tensors.items()}
        blob = open(path, "rb").read()
        broken = mutate(data, blob)
        with open(path, "wb") as fh:
            fh.write(broken)
        listing = judged(folder)
        if not listing.errors:
            assert_safetensors_reads_back(path, listing)


# -- torch zips and their pickles -----------------------------------------------------------------------------
KEYS = st.text(st.characters(codec="ascii", exclude_characters="."), min_size=1, max_size=6)
TENSORS = st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype), st.lists(st.integers(0, 3), max_size=3),
                    st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]))
STATES = st.recursive(TENSORS, lambda inner: st.dictionaries(KEYS, inner, min_size=1, max_size=4), max_leaves=10)


def flat(obj, prefix: str = "") -> dict[str, tuple[str, tuple[int, ...]]]:
    """Dotted key -> (dtype, shape) of every tensor in nested dicts."""
    if isinstance(obj, torch.Tensor):
        return {prefix[:-1]: (str(obj.dtype).removeprefix("torch."), tuple(obj.shape))}
    return {k: v for key, value in obj.items() for k, v in flat(value, f"{prefix}{key}.").items()}


@FUZZ
@given(data=st.data(), state=st.dictionaries(KEYS, STATES, min_size=1, max_size=4), lightning=st.booleans())
def test_fuzzed_bytes_of_a_real_torch_file(data, state, lightning):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "last.ckpt" if lightning else "pytorch_model.bin")
        torch.save({"state_dict": state, "epoch": 1} if lightning else state, path)
        healthy = judged(folder)  # the twin: what torch.save writes lists clean, exactly
        assert not healthy.errors
        assert {k: (e.dtype, e.shape) for k, e in healthy.tensors.items()} == flat(state)
        blob = open(path, "rb").read()
        with open(path, "wb") as fh:
            fh.write(mutate(data, blob))
        judged(folder)


#: opcodes a hostile pickle is built from: containers, memo sharing, calls, globals
OPCODES = st.sampled_from([
    b"}", b"]", b")", b"(", b"t", b"l", b"d", b"\x85", b"\x86", b"\x87", b"a", b"e", b"s", b"u", b"R", b"b", b"0",
    b"2", b"1", b"K\x01", b"N", b"\x88", b"q\x00", b"q\x01", b"h\x00", b"h\x01", b"X\x01\x00\x00\x00a",
    b"ctorch._utils\n_rebuild_tensor_v2\n", b"ccollections\nOrderedDict\n", b"cos\nsystem\n", b"cbuiltins\nset\n",
    b"ctorch\nFloatStorage\n", b"Q", b"\x95\x10\x00\x00\x00\x00\x00\x00\x00", b"\x94", b"\x8c\x01a",
])


@FUZZ
@given(ops=st.lists(OPCODES, max_size=120), proto=st.sampled_from([b"", b"\x80\x02", b"\x80\x04"]),
       repeat=st.integers(1, 40))
def test_fuzzed_pickle_opcodes_in_a_torch_zip(ops, proto, repeat):
    # a short opcode program repeated: sharing through the memo is how small pickles describe huge objects
    blob = proto + b"".join(ops) * repeat + b"."
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "pytorch_model.bin")
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("archive/data.pkl", blob)
            archive.writestr("archive/version", "3\n")
        marker = os.path.join(folder, "ran")
        judged(folder)
        assert not os.path.exists(marker)


@st.composite
def reference_bombs(draw) -> bytes:
    """A protocol-2 pickle of ``levels`` containers (tuples, lists or dicts), each holding the one below twice
    through the memo, used as a dict key (hashed), a value, or the whole object: 2**levels objects in a few
    hundred bytes. Without the opcode bound, 30 levels of tuple keys already take minutes to hash."""
    levels = draw(st.integers(1, 64))
    kind = draw(st.sampled_from(["tuple", "list", "dict"]))
    use = draw(st.sampled_from(["key", "value", "top"]) if kind == "tuple" else st.sampled_from(["value", "top"]))
    ops = bytearray(b"\x80\x02}q\x00)q\x010" if kind == "tuple" else b"\x80\x02}q\x00}q\x010")
    for i in range(1, levels + 1):
        get = b"h" + bytes([i])
        body = {"tuple": get + get + b"\x86", "list": b"](" + get + get + b"e",
                "dict": b"}(X\x01\x00\x00\x00a" + get + b"X\x01\x00\x00\x00b" + get + b"u"}[kind]
        ops += body + b"q" + bytes([i + 1]) + b"0"
    last = b"h" + bytes([levels + 1])
    if use == "top":
        return bytes(ops + last + b".")  # the bomb is the pickle's object
    if use == "key":
        return bytes(ops + last + b"K\x01s.")
    return bytes(ops + b"X\x01\x00\x00\x00w" + last + b"s.")


@settings(max_examples=60, deadline=TIME_BOUND_S * 1000, database=None, derandomize=not RANDOM)
@given(blob=reference_bombs(), dcp=st.booleans())
def test_fuzzed_reference_bombs_are_bounded(blob, dcp):
    assert len(blob) < 2000
    with tempfile.TemporaryDirectory() as folder:
        if dcp:
            with open(os.path.join(folder, ".metadata"), "wb") as fh:
                fh.write(blob)
        else:
            with zipfile.ZipFile(os.path.join(folder, "pytorch_model.bin"), "w") as archive:
                archive.writestr("archive/data.pkl", blob)
                archive.writestr("archive/version", "3\n")
        judged(folder)


# -- DCP metadata ---------------------------------------------------------------------------------------------
#: what a DCP ``.metadata`` may build: the metadata records, their field types, torch dtypes/layouts/formats/Size
ALLOWED_DCP = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("torch", "Size"), ("torch.serialization", "_get_layout")} | {
    ("pathlib", n) for n in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path")}
DCP_MODULES = ["torch.distributed.checkpoint", "torch.distributed.checkpoint.metadata",
               "torch.distributed.checkpoint.filesystem", "torch.distributed.checkpoint.state_dict_loader",
               "torch.distributed.checkpoint._async_process_executor", "torch.distributed.checkpoint.utils",
               "torch", "builtins", "os", "pathlib", "collections", "multiprocessing.connection", "subprocess"]


def _names() -> list[tuple[str, str]]:
    names = []
    for module in DCP_MODULES:
        try:
            names += [(module, n) for n in dir(importlib.import_module(module))]
        except ImportError:
            pass
    return sorted(set(names))


MODULE_NAMES = _names()


def _allowed(module: str, name: str, obj: object) -> bool:
    if (module, name) in ALLOWED_DCP:
        return True
    return module == "torch" and isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))


@settings(max_examples=600, deadline=None, database=None)
@given(pair=st.sampled_from(MODULE_NAMES) | st.tuples(st.sampled_from(DCP_MODULES), st.text(max_size=12)))
def test_fuzzed_dcp_globals_admit_only_the_allow_list(pair):
    module, name = pair
    unpickler = ck._DCPMetadataUnpickler(io.BytesIO(b""))
    try:
        obj = unpickler.find_class(module, name)
    except pickle.UnpicklingError:
        return
    assert _allowed(module, name, obj), (module, name, obj)


def real_dcp_metadata() -> bytes:
    """The ``.metadata`` ``torch.distributed.checkpoint.save`` writes for a small state dict."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.zeros(3, 2), "b": torch.ones(2)}, "step": 4}, checkpoint_id=folder)
        return open(os.path.join(folder, ".metadata"), "rb").read()


REAL_DCP = real_dcp_metadata()


@FUZZ
@given(data=st.data())
def test_fuzzed_bytes_of_real_dcp_metadata(data):
    blob = mutate(data, REAL_DCP)
    assume(blob != REAL_DCP)
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, ".metadata"), "wb") as fh:
            fh.write(blob)
        judged(folder)


@FUZZ
@given(ops=st.lists(OPCODES | st.sampled_from([
    b"ctorch.distributed.checkpoint.metadata\nMetadata\n",
    b"ctorch.distributed.checkpoint.metadata\nTensorProperties\n",
    b"ctorch\nSize\n", b"ctorch\nfloat32\n", b"cpathlib\nPosixPath\n", b"cbuiltins\nfrozenset\n"]), max_size=120),
    repeat=st.integers(1, 40))
def test_fuzzed_dcp_metadata_opcodes(ops, repeat):
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, ".metadata"), "wb") as fh:
            fh.write(b"\x80\x04" + b"".join(ops) * repeat + b".")
        judged(folder)


def test_real_dcp_metadata_twin_lists_clean():
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, ".metadata"), "wb") as fh:
            fh.write(REAL_DCP)
        listing = judged(folder)
        assert not listing.errors and sorted(listing.keys) == ["model.b", "model.w"]
