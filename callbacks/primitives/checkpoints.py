"""Checkpoint readers: list a checkpoint's keys from headers and metadata only, and read chosen tensors.

Formats:

- safetensors: one file, or shards with a ``*.safetensors.index.json``. Keys, dtypes and shapes come from the
  JSON header (parsed and validated here: the header length, the JSON, each entry's byte range against the
  file size); no tensor data is read to list keys.
- torch zip pickles: ``pytorch_model.bin``, Lightning ``.ckpt``, accelerate ``pytorch_model[_i].bin``. Keys come
  from the zip's ``data.pkl`` alone, unpickled by a restricted unpickler that builds (dtype, shape) records and
  imports nothing else: no storage is read and no code from the file runs. Reading values (``read_tensors``)
  is ``torch.load(weights_only=True, mmap=True)``.
- ``torch.distributed.checkpoint`` folders: the ``.metadata`` file only, unpickled by a restricted unpickler that
  builds nothing but DCP metadata classes (``FileSystemReader.read_metadata`` would use plain ``pickle``).

Folders are HF Trainer ``checkpoint-N/`` folders, PEFT ``save_pretrained`` folders (adapters other than
``default`` in sub-folders), ``accelerate`` ``save_state`` folders (``model[_i].safetensors``,
``pytorch_model[_i].bin``, FSDP ``pytorch_model_fsdp_i/`` DCP folders) and DCP folders.

:func:`list_checkpoint` never raises for a bad file: each problem is a :class:`CheckpointReadError` in the
listing's ``errors`` (the file and the reason). :func:`read_tensors` raises the first one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import torch

SAFETENSORS_INDEX_SUFFIX = ".safetensors.index.json"
#: weight files an HF/PEFT checkpoint folder may hold, in the order transformers prefers them
WEIGHT_FILES: tuple[str, ...] = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
    "adapter_model.safetensors", "adapter_model.bin",
)
#: accelerate ``save_state`` writes the i-th prepared model (i >= 1) as ``model_i.safetensors`` /
#: ``pytorch_model_i.bin`` and FSDP sharded state as ``pytorch_model_fsdp_i/`` (a DCP folder)
ACCELERATE_MODEL_FILE = re.compile(r"^(model_\d+\.safetensors|pytorch_model_\d+\.bin)$")
ACCELERATE_FSDP_FOLDER = re.compile(r"^pytorch_model_fsdp_\d+$")
DCP_METADATA = ".metadata"
#: safetensors refuses headers above 100 MB; so do we (a larger length is a corrupt length field)
SAFETENSORS_MAX_HEADER = 100_000_000

#: safetensors dtype tag -> (torch dtype name, bytes per element; 0 for sub-byte types checked loosely)
SAFETENSORS_DTYPES: dict[str, tuple[str, float]] = {
    "BOOL": ("bool", 1), "U8": ("uint8", 1), "I8": ("int8", 1), "U16": ("uint16", 2), "I16": ("int16", 2),
    "F16": ("float16", 2), "BF16": ("bfloat16", 2), "U32": ("uint32", 4), "I32": ("int32", 4),
    "F32": ("float32", 4), "U64": ("uint64", 8), "I64": ("int64", 8), "F64": ("float64", 8),
    "C64": ("complex64", 8), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1), "F4": ("float4_e2m1fn_x2", 0.5), "F6_E2M3": ("float6_e2m3", 0.75),
    "F6_E3M2": ("float6_e3m2", 0.75),
}


class CheckpointReadError(Exception):
    """A checkpoint file that cannot be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


@dataclasses.dataclass(frozen=True)
class SavedTensor:
    """One tensor entry of a checkpoint, from its header: key as written, dtype (torch name), shape, file."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    file: str


@dataclasses.dataclass
class CheckpointListing:
    """What a checkpoint holds, from headers/metadata only.

    Attributes:
        path: the file or folder asked for.
        files: every file read (weight files, indexes, DCP metadata), in reading order.
        tensors: key as written -> :class:`SavedTensor` (for DCP and nested torch files, keys are dotted paths).
        groups: sub-checkpoints the keys came from (``""`` for the folder itself, the sub-folder or file stem for
            PEFT adapter sub-folders and accelerate's extra models), each key -> :class:`SavedTensor`; keys of
            different groups may repeat (every PEFT adapter saves ``...lora_A.weight``).
        errors: one :class:`CheckpointReadError` per unreadable file; keys of such files are missing.
        formats: the formats met (``safetensors``, ``safetensors-index``, ``torch``, ``lightning``, ``dcp``).
    """

    path: str
    files: list[str] = dataclasses.field(default_factory=list)
    tensors: dict[str, SavedTensor] = dataclasses.field(default_factory=dict)
    groups: dict[str, dict[str, SavedTensor]] = dataclasses.field(default_factory=dict)
    errors: list[CheckpointReadError] = dataclasses.field(default_factory=list)
    formats: list[str] = dataclasses.field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        """Every key written, in file order."""
        return list(self.tensors)

    def add(self, group: str, entries: Iterable[SavedTensor]) -> None:
        """Record tensors of one sub-checkpoint."""
        keys = self.groups.setdefault(group, {})
        for entry in entries:
            self.tensors.setdefault(entry.key, entry)
            keys[entry.key] = entry


# -- safetensors ----------------------------------------------------------------------------------------------
def read_safetensors_header(path: str) -> tuple[dict[str, SavedTensor], dict[str, str]]:
    """Tensor entries and ``__metadata__`` of a safetensors file, validated against the file size.

    Reads 8 bytes and the JSON header, nothing else. Raises :class:`CheckpointReadError` for a file shorter
    than the length field, a header length beyond the file, a header that is not a JSON object, malformed
    entries, byte ranges that do not match dtype and shape, and tensor data cut off by truncation.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointReadError(path, f"file of {size} bytes is shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise CheckpointReadError(
                    path, f"header length {header_len} is beyond the file ({size} bytes): truncated or not "
                          "a safetensors file")
            if header_len > SAFETENSORS_MAX_HEADER:
                raise CheckpointReadError(path, f"header length {header_len} exceeds safetensors' 100 MB limit")
            raw = fh.read(header_len)
    except OSError as err:
        raise CheckpointReadError(path, f"cannot read file ({err})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointReadError(path, f"header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointReadError(path, f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointReadError(path, "header __metadata__ is not an object")
    data_size = size - 8 - header_len
    entries: dict[str, SavedTensor] = {}
    data_end = 0
    for key, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
                and len(entry["data_offsets"]) == 2
                and all(isinstance(v, int) and v >= 0 for v in [*entry["shape"], *entry["data_offsets"]])):
            raise CheckpointReadError(path, f"header entry {key!r} is malformed: {str(entry)[:200]}")
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointReadError(path, f"header entry {key!r} has unknown dtype {entry['dtype']!r}")
        begin, end = entry["data_offsets"]
        numel = 1
        for dim in entry["shape"]:
            numel *= dim
        if end < begin or (dtype[1] >= 1 and end - begin != numel * dtype[1]):
            raise CheckpointReadError(
                path, f"header entry {key!r}: byte range {begin}..{end} does not fit {entry['dtype']} "
                      f"shape {entry['shape']}")
        data_end = max(data_end, end)
        entries[key] = SavedTensor(key=key, dtype=dtype[0], shape=tuple(entry["shape"]), file=path)
    if data_end > data_size:
        raise CheckpointReadError(
            path, f"tensor data truncated: the header describes {data_end} bytes of data, the file holds "
                  f"{data_size}")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def read_safetensors_index(path: str) -> dict[str, str]:
    """The ``weight_map`` (key -> shard file name) of a sharded checkpoint's index JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
    except OSError as err:
        raise CheckpointReadError(path, f"cannot read index ({err})") from None
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointReadError(path, f"broken index JSON ({type(err).__name__}: {err})") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointReadError(path, "broken index JSON (weight_map is not an object of key -> file name)")
    return weight_map


# -- torch pickles --------------------------------------------------------------------------------------------
def torch_load_mmap(path: str) -> Any:
    """``torch.load(path, weights_only=True, mmap=True)`` on CPU; failures as :class:`CheckpointReadError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file, reported as such
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Weights only load failed" in str(err):
            reason = "holds objects that weights_only=True refuses: " + " ".join(str(err).split())[:300]
        raise CheckpointReadError(path, f"unreadable torch file ({type(err).__name__}: {reason})") from None


def _flatten(obj: Any, prefix: str, out: dict[str, Any], leaf: type = torch.Tensor) -> None:
    if isinstance(obj, leaf):
        out[prefix[:-1]] = obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            if isinstance(key, str):
                _flatten(value, f"{prefix}{key}.", out, leaf)


def torch_state_dict(obj: Any, path: str) -> tuple[Mapping[str, Any], str]:
    """The state dict inside a loaded torch file, and its format (``lightning`` or ``torch``).

    A Lightning ``.ckpt`` keeps it under ``"state_dict"``; a plain state dict is itself; other nested dicts
    (``{"model": sd, "optimizer": ...}``) are flattened to dotted keys.
    """
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return obj["state_dict"], "lightning"
    if isinstance(obj, Mapping):
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, "torch"
        flat: dict[str, torch.Tensor] = {}
        _flatten(obj, "", flat)
        return flat, "torch"
    raise CheckpointReadError(path, f"expected a state dict, found {type(obj).__name__}")


#: legacy typed-storage class names in torch pickles -> dtype name
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "Float8_e4m3fnStorage": "float8_e4m3fn", "Float8_e5m2Storage": "float8_e5m2",
}


@dataclasses.dataclass(frozen=True)
class _StorageMeta:
    dtype: str
    key: str
    numel: int


@dataclasses.dataclass(frozen=True)
class TensorMeta:
    """A tensor as a torch pickle describes it (dtype and shape), built without its storage."""

    dtype: str
    shape: tuple[int, ...]


class _Opaque:
    """Stands in for any object of a torch pickle other than tensors and containers; runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Opaque:
        return _Opaque()


def _rebuild_tensor_meta(storage: Any, storage_offset: int, size: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(storage, _StorageMeta):
        return TensorMeta(dtype=storage.dtype, shape=tuple(int(s) for s in size))
    return _Opaque()


def _rebuild_parameter_meta(data: Any, *args: Any, **kwargs: Any) -> Any:
    return data


class _TorchMetadataUnpickler(pickle.Unpickler):
    """Unpickles a torch zip's ``data.pkl`` into :class:`TensorMeta` and containers: storages are never loaded
    and no global is imported except the safe containers below (everything else becomes :class:`_Opaque`)."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_meta
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter_meta
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return str(getattr(torch, name)).removeprefix("torch.")
        return _Opaque

    def persistent_load(self, pid: Any) -> Any:
        # ("storage", storage type (a dtype name from find_class, or a torch.dtype), key, location, numel)
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            dtype = pid[1] if isinstance(pid[1], str) else "unknown"
            return _StorageMeta(dtype=dtype, key=str(pid[2]), numel=int(pid[4]))
        return _Opaque()


def read_torch_metadata(path: str) -> Any:
    """The object a torch zip pickle holds, with every tensor as a :class:`TensorMeta` (dtype, shape).

    Reads the zip directory and ``data.pkl`` only; no storage is read and no code from the file runs, so
    checkpoints whose extra entries (hyper-parameters, configs) ``weights_only=True`` would refuse still list.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if not pickles:
                raise CheckpointReadError(path, "unreadable torch file (a zip without data.pkl)")
            data = archive.read(pickles[0])
    except zipfile.BadZipFile as err:
        reason = "not a zip archive: truncated, corrupt, or the legacy (pre-1.6) torch format"
        raise CheckpointReadError(path, f"unreadable torch file ({reason}: {err})") from None
    except OSError as err:
        raise CheckpointReadError(path, f"cannot read file ({err})") from None
    try:
        return _TorchMetadataUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointReadError(path, f"unreadable torch file (data.pkl: {type(err).__name__}: {err})") from None


def list_torch_file(path: str) -> tuple[dict[str, SavedTensor], str]:
    """Tensor entries of a torch zip pickle from its ``data.pkl`` only (:func:`read_torch_metadata`), and its
    format (``lightning`` or ``torch``)."""
    obj = read_torch_metadata(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state, fmt = obj["state_dict"], "lightning"
    elif isinstance(obj, Mapping):
        state, fmt = {}, "torch"
        _flatten(obj, "", state, TensorMeta)
    else:
        raise CheckpointReadError(path, f"expected a state dict, found {type(obj).__name__}")
    entries = {}
    for key, value in state.items():
        if isinstance(value, TensorMeta) and isinstance(key, str):
            entries[key] = SavedTensor(key=key, dtype=value.dtype, shape=value.shape, file=path)
    return entries, fmt


# -- torch.distributed.checkpoint -----------------------------------------------------------------------------
class _DCPMetadataUnpickler(pickle.Unpickler):
    """Builds only DCP metadata classes, torch dtypes/layouts/sizes and paths; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint"):
            import importlib

            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type):
                return obj
        elif module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)) or obj is torch.Size:
                return obj
        elif module == "torch.serialization" and name == "_get_layout":
            return torch.serialization._get_layout
        elif module in ("pathlib", "collections") and name in (
                "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path", "OrderedDict"):
            import importlib

            return getattr(importlib.import_module(module), name)
        elif module == "builtins" and name in ("set", "frozenset", "tuple", "list", "dict"):
            import builtins

            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not DCP metadata")


def list_dcp(folder: str) -> dict[str, SavedTensor]:
    """Tensor entries of a ``torch.distributed.checkpoint`` folder, from its ``.metadata`` file only."""
    path = os.path.join(folder, DCP_METADATA)
    try:
        with open(path, "rb") as fh:
            metadata = _DCPMetadataUnpickler(fh).load()
    except OSError as err:
        raise CheckpointReadError(path, f"cannot read DCP metadata ({err})") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointReadError(path, f"unreadable DCP metadata ({type(err).__name__}: {err})") from None
    items = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(items, Mapping):
        raise CheckpointReadError(path, f"DCP metadata without state_dict_metadata ({type(metadata).__name__})")
    entries = {}
    for key, meta in items.items():
        props, size = getattr(meta, "properties", None), getattr(meta, "size", None)
        if props is None or size is None:  # BytesStorageMetadata: a non-tensor object
            continue
        entries[key] = SavedTensor(key=key, dtype=str(props.dtype).removeprefix("torch."), shape=tuple(size),
                                   file=path)
    return entries


# -- discovery ------------------------------------------------------------------------------------------------
def _file_kind(path: str) -> str:
    if path.endswith(SAFETENSORS_INDEX_SUFFIX):
        return "safetensors-index"
    if path.endswith(".index.json"):
        return "torch-index"
    if path.endswith(".safetensors"):
        return "safetensors"
    return "torch"


def checkpoint_parts(path: str) -> list[tuple[str, str, str]]:
    """``(group, kind, path)`` of every weight source of a checkpoint file or folder.

    ``kind`` is ``safetensors``, ``safetensors-index``, ``torch``, ``torch-index`` or ``dcp``; ``group`` is
    ``""`` for the checkpoint itself and the sub-folder name for PEFT adapter sub-folders and accelerate
    FSDP folders. An index wins over the single file it replaces, as in transformers; safetensors wins over
    ``.bin`` for adapters, as in PEFT.
    """
    if os.path.isfile(path):
        if os.path.basename(path) == DCP_METADATA:
            return [("", "dcp", os.path.dirname(path))]
        return [("", _file_kind(path), path)]
    if not os.path.isdir(path):
        raise CheckpointReadError(path, "no such file or folder")
    names = set(os.listdir(path))
    parts: list[tuple[str, str, str]] = []
    if DCP_METADATA in names:
        parts.append(("", "dcp", path))
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if index in names:
            parts.append(("", _file_kind(index), os.path.join(path, index)))
        elif single in names:
            parts.append(("", _file_kind(single), os.path.join(path, single)))
    for adapter in ("adapter_model.safetensors", "adapter_model.bin"):
        if adapter in names:
            parts.append(("", _file_kind(adapter), os.path.join(path, adapter)))
            break
    for name in sorted(names):
        full = os.path.join(path, name)
        if ACCELERATE_MODEL_FILE.match(name):
            parts.append((name.split(".")[0], _file_kind(name), full))
        elif ACCELERATE_FSDP_FOLDER.match(name) and os.path.isfile(os.path.join(full, DCP_METADATA)):
            parts.append((name, "dcp", full))
        elif os.path.isdir(full) and not name.startswith("."):
            for adapter in ("adapter_model.safetensors", "adapter_model.bin"):
                if os.path.isfile(os.path.join(full, adapter)):  # PEFT: adapter `name` saved in a sub-folder
                    parts.append((name, _file_kind(adapter), os.path.join(full, adapter)))
                    break
    return parts


def find_weight_files(path: str) -> list[str]:
    """Weight files (and DCP folders) of a checkpoint: ``path`` itself if it is a file, else those of its folder."""
    return [part for _, _, part in checkpoint_parts(path)]


def _list_part(listing: CheckpointListing, group: str, kind: str, path: str) -> None:
    if kind == "safetensors":
        entries, _ = read_safetensors_header(path)
        listing.files.append(path)
        listing.add(group, entries.values())
    elif kind in ("safetensors-index", "torch-index"):
        weight_map = read_safetensors_index(path)
        listing.files.append(path)
        folder = os.path.dirname(path)
        by_shard: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(key)
        for shard, keys in by_shard.items():
            shard_path = os.path.join(folder, shard)
            if not os.path.isfile(shard_path):
                raise CheckpointReadError(path, f"the index names shard {shard!r}, which does not exist")
            if kind == "safetensors-index":
                entries, _ = read_safetensors_header(shard_path)
            else:
                entries, _ = list_torch_file(shard_path)
            listing.files.append(shard_path)
            absent = [k for k in keys if k not in entries]
            if absent:
                raise CheckpointReadError(
                    path, f"the index places {len(absent)} key(s) in {shard!r} that it does not hold "
                          f"(first: {absent[0]!r})")
            listing.add(group, (entries[k] for k in keys))
    elif kind == "dcp":
        entries = list_dcp(path)
        listing.files.append(os.path.join(path, DCP_METADATA))
        listing.add(group, entries.values())
    else:
        entries, fmt = list_torch_file(path)
        listing.files.append(path)
        listing.add(group, entries.values())
        kind = fmt
    if kind not in listing.formats:
        listing.formats.append(kind)


def list_checkpoint(path: str) -> CheckpointListing:
    """Keys, dtypes and shapes of every weight source of a checkpoint file or folder, from headers only.

    Never raises for unreadable files: they are recorded in ``errors`` (file and reason) and their keys are
    absent from the listing.
    """
    listing = CheckpointListing(path=path)
    try:
        parts = checkpoint_parts(path)
    except CheckpointReadError as err:
        listing.errors.append(err)
        return listing
    for group, kind, part in parts:
        try:
            _list_part(listing, group, kind, part)
        except CheckpointReadError as err:
            listing.errors.append(err)
    return listing


# -- reading values -------------------------------------------------------------------------------------------
def read_tensors(path: str, keys: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Read the tensors named ``keys`` (all when ``None``) from a weight file or checkpoint folder.

    safetensors files are validated from their header before any tensor is read; torch files are loaded with
    ``weights_only=True, mmap=True`` so only the wanted tensors' pages are touched. DCP folders are not read
    (listing only). Raises :class:`CheckpointReadError` for the first unreadable file.
    """
    wanted = None if keys is None else set(keys)
    out: dict[str, torch.Tensor] = {}
    for _, kind, part in checkpoint_parts(path):
        if kind in ("safetensors-index", "torch-index"):
            weight_map = read_safetensors_index(part)
            shards: dict[str, list[str]] = {}
            for key, shard in weight_map.items():
                if wanted is None or key in wanted:
                    shards.setdefault(shard, []).append(key)
            for shard, shard_keys in shards.items():
                out.update(read_tensors(os.path.join(os.path.dirname(part), shard), shard_keys))
        elif kind == "safetensors":
            from safetensors import SafetensorError, safe_open

            entries, _ = read_safetensors_header(part)
            try:
                with safe_open(part, framework="pt") as fh:
                    for key in entries:
                        if wanted is None or key in wanted:
                            out[key] = fh.get_tensor(key)
            except (SafetensorError, OSError) as err:
                raise CheckpointReadError(part, f"unreadable safetensors file ({err})") from None
        elif kind == "torch":
            state, _ = torch_state_dict(torch_load_mmap(part), part)
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and (wanted is None or key in wanted):
                    out[key] = value
    return out
