"""Hostile and broken checkpoint files, built on disk: each is one named CheckpointReadError (the file and the
reason), in bounded time and memory, with no code from the file run; each has a healthy twin that lists clean."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import threading
import time
import tracemalloc
import warnings
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from callbacks.primitives.checkpoints import CheckpointReadError, list_checkpoint, read_tensors

#: every hostile input here must be refused within this many seconds (the slowest measured is ~0.3 s)
TIME_BOUND_S = 5.0
#: and with at most this much Python heap at peak (the largest hostile input here declares gigabytes)
MEMORY_BOUND = 64 * 2**20


def listed(path) -> tuple[object, float, int]:
    """``list_checkpoint(path)``, its wall time and its peak traced memory."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        listing = list_checkpoint(str(path))
    finally:
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return listing, elapsed, peak


def refused(path, file, *words: str) -> CheckpointReadError:
    """Assert ``path`` lists with exactly one error, on ``file``, whose reason holds ``words``, within bounds."""
    listing, elapsed, peak = listed(path)
    assert len(listing.errors) == 1, listing.errors
    err = listing.errors[0]
    assert err.path == str(file), err
    for word in words:
        assert word in err.reason, err.reason
    assert elapsed < TIME_BOUND_S and peak < MEMORY_BOUND, (elapsed, peak)
    return err


def clean(path) -> object:
    """Assert ``path`` lists without errors and with keys."""
    listing = list_checkpoint(str(path))
    assert not listing.errors and listing.keys, listing.errors
    return listing


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small state dict."""
    gen = torch.Generator().manual_seed(seed)
    return {"emb.weight": torch.randn(8, 4, generator=gen), "head.weight": torch.randn(3, 4, generator=gen),
            "head.bias": torch.zeros(3)}


def raw_safetensors(path, header: dict | bytes, data: bytes) -> str:
    """A safetensors file with exactly this header (a dict is JSON-encoded) and data section."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob + data)
    return str(path)


def torch_zip(path, pickle_bytes: bytes, compression: int = zipfile.ZIP_STORED) -> str:
    """A zip laid out as ``torch.save`` lays it out, whose ``data.pkl`` is ``pickle_bytes``."""
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/version", "3\n")
    return str(path)


# -- safetensors: lying headers -----------------------------------------------------------------------------------
def test_healthy_safetensors_twin_lists(tmp_path):
    save_file(state(), str(tmp_path / "model.safetensors"))
    assert sorted(clean(tmp_path).keys) == sorted(state())


@pytest.mark.parametrize("entries, words", [
    ({"w": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}}, ["malformed"]),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
      "v": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}}, ["overlaps"]),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, ["unowned bytes"]),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, ["belong to no header entry"]),
    ({"w": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 16]}}, ["does not fit"]),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "__metadata__": {"a": {"b": 1}}},
     ["__metadata__"]),
])
def test_lying_safetensors_header(tmp_path, entries, words):
    path = raw_safetensors(tmp_path / "model.safetensors", entries, b"\0" * 24)
    refused(tmp_path, path, *words)


def test_deeply_nested_safetensors_header(tmp_path):
    depth = 200_000
    blob = b'{"w":' + b"[" * depth + b"]" * depth + b"}"
    path = raw_safetensors(tmp_path / "model.safetensors", blob, b"")
    refused(tmp_path, path, "nests deeper")


def test_giant_declared_header_length(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2 ** 62) + b"{}")
    refused(tmp_path, path, "beyond the file")


# -- pickles and torch zips ---------------------------------------------------------------------------------------
class Payload:
    """Pickles to a call that creates ``marker``: if the file ever appears, a reader ran code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_bin_is_unreadable_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"w": torch.zeros(2), "x": Payload(marker)}, tmp_path / "pytorch_model.bin")
    refused(tmp_path, tmp_path / "pytorch_model.bin", "weights_only", "system")
    with pytest.raises(CheckpointReadError):
        read_tensors(str(tmp_path))
    assert not marker.exists()


def test_lightning_ckpt_with_a_payload_beside_state_dict_lists_but_never_runs(tmp_path):
    # hyper-parameter objects beside state_dict are what Lightning files carry: keys list, nothing runs
    marker = tmp_path / "ran"
    torch.save({"state_dict": state(), "hyper_parameters": Payload(marker)}, tmp_path / "last.ckpt")
    assert sorted(clean(tmp_path).keys) == sorted(state()) and not marker.exists()


def test_zip_bomb_bin_is_refused_without_inflating(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("archive/data.pkl", "w", force_zip64=True) as fh:
            chunk = b"\0" * 2 ** 24
            for _ in range(16):  # 256 MiB of zeros (4x the memory bound) in about 260 kB
                fh.write(chunk)
    assert os.path.getsize(path) < 2 ** 20
    refused(tmp_path, path, "compressed")


def test_zip_member_declaring_more_bytes_than_the_file(tmp_path):
    path = torch_zip(tmp_path / "pytorch_model.bin", pickle.dumps({"a": 1}))
    data = bytearray(open(path, "rb").read())
    # the central directory's uncompressed size of the first member: claim 4 GiB - 1
    at = data.rfind(b"PK\x01\x02")
    while at > 0 and not data[at + 46: at + 46 + 16].startswith(b"archive/data.pkl"):
        at = data.rfind(b"PK\x01\x02", 0, at)
    data[at + 24: at + 28] = struct.pack("<I", 2 ** 32 - 2)
    open(path, "wb").write(bytes(data))
    err = refused(tmp_path, path)
    assert "declares" in err.reason or "unreadable torch file" in err.reason


def test_shared_reference_pickle_bomb_is_bounded(tmp_path):
    node: dict = {"leaf": torch.zeros(1)}
    for _ in range(60):  # 2**60 paths through 61 dicts: a small pickle, an endless walk
        node = {"a": node, "b": node}
    blob = pickle.dumps(node, protocol=2)
    assert len(blob) < 4000
    path = torch_zip(tmp_path / "pytorch_model.bin", blob)
    refused(tmp_path, path, "nested entries")


def test_self_containing_pickle_is_refused(tmp_path):
    node: dict = {"w": torch.zeros(1)}
    node["self"] = node
    path = torch_zip(tmp_path / "pytorch_model.bin", pickle.dumps(node, protocol=2))
    refused(tmp_path, path, "contains itself")


def test_deep_container_pickle_is_bounded(tmp_path):
    node: dict = {"w": torch.zeros(1)}
    for _ in range(200):
        node = {"x": node}
    path = torch_zip(tmp_path / "pytorch_model.bin", pickle.dumps(node, protocol=2))
    refused(tmp_path, path, "nested deeper")


def test_healthy_nested_torch_file_twin_lists(tmp_path):
    torch.save({"model": state(), "step": 3}, tmp_path / "pytorch_model.bin")
    assert sorted(clean(tmp_path).keys) == sorted(f"model.{k}" for k in state())


# -- DCP metadata -------------------------------------------------------------------------------------------------
def dcp_global_call(module: str, name: str, *args) -> bytes:
    """A protocol-0 pickle that calls ``module.name(*args)`` (what a crafted ``.metadata`` does)."""
    body = b"".join(pickle.dumps(a, protocol=0)[:-1] for a in args)  # each argument without its STOP
    return f"c{module}\n{name}\n(".encode() + body + b"tR."


@pytest.mark.parametrize("module, name, args", [
    ("torch.distributed.checkpoint._async_process_executor", "TCPStore", ("127.0.0.1", 1, 1, False)),
    ("torch.distributed.checkpoint.filesystem", "FileSystemWriter", ("{tmp}/made",)),
    ("multiprocessing.connection", "Connection", (1,)),
    ("builtins", "bytearray", (5 * 2 ** 30,)),
    ("os", "system", ("touch {tmp}/ran",)),
])
def test_crafted_dcp_metadata_builds_nothing(tmp_path, module, name, args):
    folder = tmp_path / "dcp"
    folder.mkdir()
    args = tuple(a.format(tmp=tmp_path) if isinstance(a, str) else a for a in args)
    (folder / ".metadata").write_bytes(dcp_global_call(module, name, *args))
    refused(folder, folder / ".metadata", "is not DCP metadata")
    assert not (tmp_path / "made").exists() and not (tmp_path / "ran").exists()


def test_healthy_dcp_twin_lists(tmp_path):
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state()}, checkpoint_id=str(tmp_path))
    assert sorted(clean(tmp_path).keys) == sorted(f"model.{k}" for k in state())


# -- files that are not regular, and paths that leave the folder --------------------------------------------------
def test_fifo_in_checkpoint_folder_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    result: list = []
    reader = threading.Thread(target=lambda: result.append(listed(tmp_path)), daemon=True)
    reader.start()
    reader.join(TIME_BOUND_S)
    if reader.is_alive():  # unblock the reader before failing, or the test run would hang with it
        with open(tmp_path / "model.safetensors", "wb"):
            pass
        pytest.fail("listing a folder with a FIFO hung")
    listing = result[0][0]
    assert [(e.path, "FIFO" in e.reason) for e in listing.errors] == [(str(tmp_path / "model.safetensors"), True)]


def test_link_to_dev_zero_is_not_read(tmp_path):
    os.symlink("/dev/zero", tmp_path / "model.safetensors")
    refused(tmp_path, tmp_path / "model.safetensors", "device")
    os.remove(tmp_path / "model.safetensors")
    os.symlink("/dev/zero", tmp_path / "pytorch_model.bin")
    refused(tmp_path, tmp_path / "pytorch_model.bin", "device")


def test_link_out_of_the_folder_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_file(state(), str(elsewhere / "model.safetensors"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    os.symlink(elsewhere / "model.safetensors", ckpt / "model.safetensors")
    refused(ckpt, ckpt / "model.safetensors", "outside the checkpoint folder")


@pytest.mark.parametrize("shard", ["../elsewhere/model-00001.safetensors", "{abs}"])
def test_index_shards_outside_the_folder_are_refused(tmp_path, shard):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_file(state(), str(elsewhere / "model-00001.safetensors"))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shard = shard.format(abs=elsewhere / "model-00001.safetensors")
    index = ckpt / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {k: shard for k in state()}}))
    refused(ckpt, index, "outside the checkpoint folder")


def test_healthy_sharded_twin_lists(tmp_path):
    save_file(state(), str(tmp_path / "model-00001.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: "model-00001.safetensors" for k in state()}}))
    assert sorted(clean(tmp_path).keys) == sorted(state())


def test_deeply_nested_index_json(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(tmp_path, index, "nests deeper")


# -- Lightning folders --------------------------------------------------------------------------------------------
def test_lightning_ckpt_folder_is_read(tmp_path):
    torch.save({"state_dict": state(), "epoch": 0}, tmp_path / "last.ckpt")
    listing = clean(tmp_path)
    assert listing.formats == ["lightning"] and sorted(listing.keys) == sorted(state())


def test_truncated_lightning_ckpt_in_a_folder_is_unreadable(tmp_path):
    torch.save({"state_dict": state(), "epoch": 0}, tmp_path / "epoch=0-step=3.ckpt")
    os.truncate(tmp_path / "epoch=0-step=3.ckpt", 200)
    refused(tmp_path, tmp_path / "epoch=0-step=3.ckpt", "unreadable torch file")


def test_bytes_io_torch_save_round_trip_helper_is_real():
    # the hand-built zips above must look like torch's own: torch reads one of them back
    buffer = io.BytesIO()
    torch.save({"a": torch.ones(1)}, buffer)
    names = zipfile.ZipFile(io.BytesIO(buffer.getvalue())).namelist()
    assert any(n.endswith("/data.pkl") for n in names)
    assert all(i.compress_type == zipfile.ZIP_STORED for i in zipfile.ZipFile(io.BytesIO(buffer.getvalue())).infolist())
