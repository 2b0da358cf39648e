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


def test_zip_member_claiming_a_zip_version_zipfile_lacks(tmp_path):
    """Found by the fuzzer: a central-directory entry needing zip version 6.4 makes zipfile raise
    NotImplementedError when the member is opened; it is one CHECKPOINT_UNREADABLE, never a traceback."""
    torch.save(state(), tmp_path / "pytorch_model.bin")
    path = tmp_path / "pytorch_model.bin"
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0 and b"data.pkl" not in data[at + 46: at + 46 + 64]:
        at = data.find(b"PK\x01\x02", at + 4)
    data[at + 6: at + 8] = struct.pack("<H", 64)  # version needed to extract: 6.4
    path.write_bytes(bytes(data))
    refused(tmp_path, path, "zip file version 6.4")


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


# -- reference bombs: hashing or walking what a small pickle describes -------------------------------------------
def tuple_hash_bomb(levels: int = 60) -> bytes:
    """A ~500-byte protocol-2 pickle of ``{t: 1}`` where ``t`` nests ``levels`` tuples that each hold the one below
    twice: hashing the key visits 2**levels tuples (``pickle.loads`` of it never returns)."""
    ops = bytearray(b"\x80\x02}q\x00)q\x010")  # PROTO 2, {} -> memo 0, () -> memo 1, POP
    for i in range(1, levels + 1):  # memo i+1 = (memo i, memo i)
        ops += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) + b"0"
    return bytes(ops + b"h" + bytes([levels + 1]) + b"K\x01s.")  # key, 1, SETITEM, STOP


def test_tuple_hash_bomb_torch_file_is_refused(tmp_path):
    blob = tuple_hash_bomb()
    assert len(blob) < 1000
    path = torch_zip(tmp_path / "pytorch_model.bin", blob)
    refused(tmp_path, path, "reference bomb")
    with pytest.raises(CheckpointReadError, match="reference bomb"):  # torch's own unpickler is never reached
        read_tensors(str(tmp_path))


def test_tuple_hash_bomb_dcp_metadata_is_refused(tmp_path):
    (tmp_path / ".metadata").write_bytes(tuple_hash_bomb())
    refused(tmp_path, tmp_path / ".metadata", "reference bomb")


def test_deep_tuple_pickle_is_refused_before_unpickling(tmp_path):
    # 100k nested tuples: hashing or printing one would overflow the C stack
    blob = b"\x80\x02)" + b"\x85" * 100_000 + b"."
    (tmp_path / ".metadata").write_bytes(blob)
    refused(tmp_path, tmp_path / ".metadata", "nested deeper")


def test_healthy_large_lightning_ckpt_lists_within_bounds(tmp_path):
    # 5k tensors and an optimizer state: far below every bound, so listed in full (and quickly)
    sd = {f"layer.{i}.weight": torch.zeros(2) for i in range(5000)}
    torch.save({"state_dict": sd, "optimizer_states": [{"state": {i: {"exp_avg": torch.zeros(1)}
                                                                   for i in range(5000)}}]}, tmp_path / "last.ckpt")
    start = time.perf_counter()
    listing = clean(tmp_path)
    assert len(listing.keys) == 5000 and time.perf_counter() - start < TIME_BOUND_S


# -- DCP: the allow-list is exact, not "anything a DCP module can reach" ----------------------------------------
class SideEffect:
    """Creates ``marker`` when built: planted into a DCP module, it must still never be built from a file."""

    marker = ""

    def __init__(self, *args):
        open(self.marker, "w").close()


def listening_ports() -> set[str]:
    """Local ``address:port`` of every listening TCP socket of this machine (``/proc/net/tcp*``)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            with open(table) as fh:
                ports |= {row.split()[1] for row in fh.readlines()[1:] if row.split()[3] == "0A"}
    return ports


def socket_fds() -> int:
    """Open socket descriptors of this process."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


@pytest.mark.parametrize("module", ["torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"])
def test_a_class_planted_in_a_dcp_module_is_never_built(tmp_path, monkeypatch, module):
    import importlib

    SideEffect.marker = str(tmp_path / "built")
    monkeypatch.setattr(importlib.import_module(module), "SideEffect", SideEffect, raising=False)
    folder = tmp_path / "dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(dcp_global_call(module, "SideEffect", 1))
    refused(folder, folder / ".metadata", "is not DCP metadata")
    assert not os.path.exists(SideEffect.marker)
    SideEffect(1)  # the marker mechanism itself works: the assertion above could fail
    assert os.path.exists(SideEffect.marker)


@pytest.mark.parametrize("master", [True, False], ids=["listening", "connecting"])
def test_crafted_tcpstore_metadata_binds_and_connects_nothing(tmp_path, master):
    # a TCPStore on port 29517: listening would add a LISTEN row, connecting would hang for the 600 s timeout
    before_ports, before_fds = listening_ports(), socket_fds()
    blob = dcp_global_call("torch.distributed.checkpoint._async_process_executor", "TCPStore",
                           "127.0.0.1", 29517, 2, master)
    (tmp_path / ".metadata").write_bytes(blob)
    refused(tmp_path, tmp_path / ".metadata", "is not DCP metadata")
    assert listening_ports() <= before_ports and socket_fds() <= before_fds


# -- audit: a folder it could not read never exits 0 ------------------------------------------------------------
def tiny_hf_folder(path) -> str:
    """A real HF ``save_pretrained`` folder of a 1-layer GPT-2 (config.json + model.safetensors)."""
    import transformers

    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=8, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(str(path))
    return str(path)


def audit(folder, capsys) -> tuple[int, str]:
    """``python -m callbacks audit folder``: exit code and everything printed."""
    from callbacks.runner.cli import main

    code = main(["audit", str(folder)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_audit_of_a_healthy_folder_exits_0(tmp_path, capsys):
    code, text = audit(tiny_hf_folder(tmp_path / "ckpt"), capsys)
    assert code == 0, text


@pytest.mark.parametrize("damage", ["truncate", "fifo", "zero-link", "true-dimension"])
def test_audit_of_an_unreadable_folder_exits_1_naming_the_file(tmp_path, capsys, damage):
    folder = tiny_hf_folder(tmp_path / "ckpt")
    weights = os.path.join(folder, "model.safetensors")
    if damage == "truncate":
        os.truncate(weights, os.path.getsize(weights) - 100)
    else:
        os.remove(weights)
        if damage == "fifo":
            os.mkfifo(weights)
        elif damage == "zero-link":
            os.symlink("/dev/zero", weights)
        else:
            raw_safetensors(weights, {"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4)
    start = time.perf_counter()
    code, text = audit(folder, capsys)
    assert code == 1 and "CHECKPOINT_UNREADABLE" in text and "model.safetensors" in text, text
    assert time.perf_counter() - start < 60


def test_audit_reads_lightning_ckpt_files(tmp_path, capsys):
    import transformers

    folder = tiny_hf_folder(tmp_path / "ckpt")
    model = transformers.GPT2LMHeadModel.from_pretrained(folder)
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save({"state_dict": model.state_dict(), "epoch": 0}, os.path.join(folder, "last.ckpt"))
    code, text = audit(folder, capsys)
    assert code == 0 and "holds no weight file" not in text, text
    os.truncate(os.path.join(folder, "last.ckpt"), 300)
    code, text = audit(folder, capsys)
    assert code == 1 and "CHECKPOINT_UNREADABLE" in text and "last.ckpt" in text, text


@pytest.mark.parametrize("name, content, words", [
    ("config.json", '{"architectures": ' + "[" * 100_000 + "]" * 100_000 + "}", ["config.json", "nests deeper"]),
    ("config.json", "[1, 2]", ["config.json", "JSON object"]),
    ("config.json", '{"architectures": "GPT2LMHeadModel"}', ["config.json", "architectures"]),
    ("config.json", '{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": "wide"}',
     ["config.json", "cannot be built"]),
    ("config.json", b"\xff\xfe{", ["config.json", "cannot read JSON"]),
    ("trainer_state.json", '{"global_step": -3}', ["trainer_state.json", "global_step"]),
    ("trainer_state.json", '{"global_step": ' + "[" * 100_000 + "]" * 100_000 + "}",
     ["trainer_state.json", "nests deeper"]),
    ("adapter_config.json", '{"base_model_name_or_path": {"a": 1}}', ["adapter_config.json", "base_model_name"]),
    ("adapter_config.json", "{" * 50_000, ["adapter_config.json"]),
])
def test_audit_of_hostile_json_exits_2_naming_file_and_reason(tmp_path, capsys, name, content, words):
    folder = tiny_hf_folder(tmp_path / "ckpt")
    path = os.path.join(folder, name)
    with open(path, "wb") as fh:
        fh.write(content if isinstance(content, bytes) else content.encode())
    code, text = audit(folder, capsys)
    assert code == 2 and "Traceback" not in text, text
    for word in words:
        assert word in text, text


def test_audit_of_a_fifo_config_exits_2_without_hanging(tmp_path, capsys):
    folder = tiny_hf_folder(tmp_path / "ckpt")
    os.remove(os.path.join(folder, "config.json"))
    os.mkfifo(os.path.join(folder, "config.json"))
    code, text = audit(folder, capsys)
    assert code == 2 and "FIFO" in text, text
