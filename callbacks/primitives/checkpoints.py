"""Checkpoint readers: list keys and read chosen tensors from checkpoint files without loading the rest.

Formats: safetensors (single file, sharded with ``*.index.json``), torch pickles (``pytorch_model.bin``,
Lightning ``.ckpt``; always ``weights_only=True``, ``mmap=True``). Problems with a file raise
:class:`CheckpointReadError` naming the file and the reason, which checks turn into findings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
#: weight files an HF/PEFT checkpoint folder may hold, in the order transformers prefers them
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
    "adapter_model.safetensors", "adapter_model.bin",
)


class CheckpointReadError(Exception):
    """A checkpoint file that cannot be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


def find_weight_files(path: str) -> list[str]:
    """Weight files of a checkpoint: ``path`` itself if it is a file, else the files of its folder."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise CheckpointReadError(path, "no such file or folder")
    found = [os.path.join(path, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
    # a folder with both an index and a single file: the index wins, as transformers does
    return found


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file, reported as such
        raise CheckpointReadError(path, f"unreadable torch file ({type(err).__name__}: {err})") from None


def _state_dict_of(obj: Any, path: str) -> Mapping[str, Any]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        return obj["state_dict"]  # Lightning .ckpt
    if isinstance(obj, Mapping):
        return obj
    raise CheckpointReadError(path, f"expected a state dict, found {type(obj).__name__}")


def read_tensors(path: str, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read the tensors named ``keys`` (all when ``None``) from a weight file or checkpoint folder."""
    wanted = None if keys is None else set(keys)
    out: dict[str, torch.Tensor] = {}
    for file in find_weight_files(path):
        if file.endswith(".index.json"):
            try:
                with open(file, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CheckpointReadError(file, f"broken index JSON ({err})") from None
            shards: dict[str, list[str]] = {}
            for key, shard in weight_map.items():
                if wanted is None or key in wanted:
                    shards.setdefault(shard, []).append(key)
            for shard, shard_keys in shards.items():
                out.update(read_tensors(os.path.join(os.path.dirname(file), shard), shard_keys))
        elif file.endswith(".safetensors"):
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(file, framework="pt") as fh:
                    for key in fh.keys():
                        if wanted is None or key in wanted:
                            out[key] = fh.get_tensor(key)
            except (SafetensorError, OSError) as err:
                raise CheckpointReadError(file, f"unreadable safetensors file ({err})") from None
        else:
            state = _state_dict_of(_torch_load(file), file)
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and (wanted is None or key in wanted):
                    out[key] = value
    return out
