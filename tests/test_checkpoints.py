"""Checkpoint readers: keys from headers and metadata only, every format, and every corrupt-file case named."""

from __future__ import annotations

import json
import os
import pickle
import struct
import time
import warnings

import pytest
import torch
from safetensors.torch import save_file

from callbacks.primitives.checkpoints import (
    CheckpointReadError,
    checkpoint_parts,
    list_checkpoint,
    read_safetensors_header,
    read_tensors,
)
from tests.models import tiny_gpt2


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A little state dict of mixed dtypes and shapes."""
    gen = torch.Generator().manual_seed(seed)
    return {"emb.weight": torch.randn(8, 4, generator=gen), "head.weight": torch.randn(3, 4, generator=gen),
            "head.bias": torch.zeros(3, dtype=torch.bfloat16), "step": torch.tensor(7)}


def the_error(listing) -> CheckpointReadError:
    """The single error of a listing (the test fails if there is not exactly one)."""
    assert len(listing.errors) == 1, listing.errors
    return listing.errors[0]


# -- formats --------------------------------------------------------------------------------------------------
def test_safetensors_header_gives_keys_dtypes_shapes(tmp_path):
    path = str(tmp_path / "model.safetensors")
    save_file(small_state(), path)
    listing = list_checkpoint(str(tmp_path))
    assert not listing.errors
    assert listing.files == [path] and listing.formats == ["safetensors"]
    assert set(listing.keys) == set(small_state())
    assert listing.tensors["emb.weight"].shape == (8, 4) and listing.tensors["emb.weight"].dtype == "float32"
    assert listing.tensors["head.bias"].dtype == "bfloat16" and listing.tensors["step"].shape == ()


def test_listing_reads_no_tensor_data(tmp_path):
    """A header describing 4 GiB of data over a sparse file is listed at once: the data is never read."""
    path = str(tmp_path / "model.safetensors")
    numel = 1 << 30  # float32 -> 4 GiB
    header = json.dumps({"big": {"dtype": "F32", "shape": [numel], "data_offsets": [0, 4 * numel]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)) + header)
    os.truncate(path, 8 + len(header) + 4 * numel)  # sparse: no blocks allocated for the data
    start = time.perf_counter()
    listing = list_checkpoint(path)
    assert time.perf_counter() - start < 0.5
    assert not listing.errors and listing.tensors["big"].shape == (numel,)


def test_sharded_safetensors_with_index(tmp_path):
    model = tiny_gpt2(tie=False)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    listing = list_checkpoint(str(tmp_path))
    assert not listing.errors
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 1 and listing.formats == ["safetensors-index"]
    assert set(listing.keys) == set(model.state_dict())
    assert len(listing.files) == 1 + len(shards)


def test_lightning_ckpt_with_hyperparameter_objects_lists(tmp_path):
    """weights_only=True refuses a ckpt whose hyper_parameters hold a custom object; listing keys does not."""
    from argparse import Namespace

    state = small_state()
    torch.save({"state_dict": state, "hyper_parameters": {"args": Namespace(lr=0.1)}}, tmp_path / "x.ckpt")
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "x.ckpt", weights_only=True)
    listing = list_checkpoint(str(tmp_path / "x.ckpt"))
    assert not listing.errors and set(listing.keys) == set(state)
    assert listing.tensors["head.bias"].dtype == "bfloat16" and listing.tensors["emb.weight"].shape == (8, 4)


def test_torch_bin_lightning_ckpt_and_nested_dicts(tmp_path):
    state = small_state()
    torch.save(state, tmp_path / "pytorch_model.bin")
    assert set(list_checkpoint(str(tmp_path)).keys) == set(state)
    torch.save({"state_dict": state, "epoch": 1, "optimizer_states": [{}]}, tmp_path / "last.ckpt")
    listing = list_checkpoint(str(tmp_path / "last.ckpt"))
    assert set(listing.keys) == set(state) and listing.formats == ["lightning"]
    torch.save({"model": state, "optimizer": {"lr": 0.1}}, tmp_path / "custom.pt")
    assert set(list_checkpoint(str(tmp_path / "custom.pt")).keys) == {f"model.{k}" for k in state}


def test_dcp_folder_from_metadata_only(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process: DCP warns that no process group is set up
        dcp.save({"model": model.state_dict(), "step": 3}, checkpoint_id=str(tmp_path))
    listing = list_checkpoint(str(tmp_path))
    assert not listing.errors and listing.formats == ["dcp"]
    assert set(listing.keys) == {f"model.{k}" for k in model.state_dict()}
    assert listing.files == [str(tmp_path / ".metadata")]
    assert listing.tensors["model.0.weight"].shape == (4, 4)


def test_accelerate_save_state_folder(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(4, 2))
    accelerator.save_state(str(tmp_path))
    assert [p[1] for p in checkpoint_parts(str(tmp_path))] == ["safetensors"]
    assert set(list_checkpoint(str(tmp_path)).keys) == set(model.state_dict())


def test_peft_adapter_subfolders_are_groups(tmp_path):
    save_file({"a.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "second").mkdir()
    save_file({"a.lora_A.weight": torch.ones(2, 2)}, str(tmp_path / "second" / "adapter_model.safetensors"))
    listing = list_checkpoint(str(tmp_path))
    assert set(listing.groups) == {"", "second"}


def test_read_tensors_keeps_working(tmp_path):
    state = small_state()
    save_file(state, str(tmp_path / "model.safetensors"))
    got = read_tensors(str(tmp_path), ["head.weight"])
    assert list(got) == ["head.weight"] and torch.equal(got["head.weight"], state["head.weight"])
    torch.save(state, tmp_path / "x.bin")
    assert torch.equal(read_tensors(str(tmp_path / "x.bin"))["emb.weight"], state["emb.weight"])


# -- corrupt files --------------------------------------------------------------------------------------------
def write_safetensors(tmp_path) -> str:
    path = str(tmp_path / "model.safetensors")
    save_file(small_state(), path)
    return path


def test_file_shorter_than_length_field(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    assert "shorter than the 8-byte header length" in the_error(list_checkpoint(str(tmp_path))).reason


def test_header_length_beyond_file(tmp_path):
    path = write_safetensors(tmp_path)
    data = bytearray(open(path, "rb").read())
    data[:8] = struct.pack("<Q", len(data) * 10)
    open(path, "wb").write(bytes(data))
    err = the_error(list_checkpoint(str(tmp_path)))
    assert err.path == path and "beyond the file" in err.reason


def test_bad_safetensors_header_json(tmp_path):
    path = write_safetensors(tmp_path)
    data = bytearray(open(path, "rb").read())
    data[8:12] = b"\xff\xfe{{"
    open(path, "wb").write(bytes(data))
    assert "not valid JSON" in the_error(list_checkpoint(str(tmp_path))).reason


def test_malformed_header_entry(tmp_path):
    path = str(tmp_path / "model.safetensors")
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 4]}}).encode()
    open(path, "wb").write(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    assert "does not fit F32 shape [2, 2]" in the_error(list_checkpoint(path)).reason


def test_truncated_safetensors_data(tmp_path):
    path = write_safetensors(tmp_path)
    os.truncate(path, os.path.getsize(path) - 20)
    assert "tensor data truncated" in the_error(list_checkpoint(str(tmp_path))).reason


def test_broken_index_json(tmp_path):
    tiny_gpt2(tie=False).save_pretrained(tmp_path, max_shard_size="40KB")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(index.read_text()[:-30])
    err = the_error(list_checkpoint(str(tmp_path)))
    assert err.path == str(index) and "broken index JSON" in err.reason


def test_index_names_missing_shard_and_key(tmp_path):
    tiny_gpt2(tie=False).save_pretrained(tmp_path, max_shard_size="40KB")
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["ghost.weight"] = next(iter(data["weight_map"].values()))
    index.write_text(json.dumps(data))
    assert "does not hold" in the_error(list_checkpoint(str(tmp_path))).reason
    data["weight_map"]["ghost.weight"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(data))
    assert "does not exist" in the_error(list_checkpoint(str(tmp_path))).reason


def test_unreadable_and_truncated_pickles(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle at all" * 10)
    assert "unreadable torch file" in the_error(list_checkpoint(str(tmp_path))).reason
    torch.save(small_state(), tmp_path / "pytorch_model.bin")
    os.truncate(tmp_path / "pytorch_model.bin", os.path.getsize(tmp_path / "pytorch_model.bin") // 2)
    assert "unreadable torch file" in the_error(list_checkpoint(str(tmp_path))).reason


def test_pickle_with_code_is_refused_not_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"w": torch.zeros(1), "x": Evil()}, tmp_path / "pytorch_model.bin")
    # keys from data.pkl: the payload is an opaque stand-in, never run, and a weight file naming a global that
    # weights_only loading refuses is unreadable at listing time (its values could never be read)
    err = the_error(list_checkpoint(str(tmp_path)))
    assert err.path == str(tmp_path / "pytorch_model.bin") and "system" in err.reason
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(CheckpointReadError, match="weights_only=True refuses"):
        read_tensors(str(tmp_path))  # reading values is torch.load(weights_only=True): refused, not run
    assert not (tmp_path / "pwned").exists()
    os.makedirs(tmp_path / "dcp")
    with open(tmp_path / "dcp" / ".metadata", "wb") as fh:
        pickle.dump(Evil(), fh)
    err = the_error(list_checkpoint(str(tmp_path / "dcp")))
    assert "is not DCP metadata" in err.reason and not (tmp_path / "pwned").exists()


def test_missing_path_and_read_tensors_raises(tmp_path):
    assert "no such file" in the_error(list_checkpoint(str(tmp_path / "nope"))).reason
    path = write_safetensors(tmp_path)
    os.truncate(path, 30)
    with pytest.raises(CheckpointReadError, match="beyond the file"):
        read_tensors(str(tmp_path))
    with pytest.raises(CheckpointReadError):
        read_safetensors_header(path)
