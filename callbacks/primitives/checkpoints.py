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

Files are hostile until proven otherwise (the ``MAX_*`` constants below are the limits): only regular
files are opened (never a FIFO, device or socket), every file a folder names resolves inside that folder (links
and index shard names included), headers, pickles and indexes are read up to a size bound, nesting and entry
counts are bounded, and torch zips must be stored uncompressed as torch writes them (no zip bomb inflates).

Why one file of about 800 lines: every reader shares those bounds, the one error type and the one rule for which
files a folder may name; kept together, no reader can skip them.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import re
import stat
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
#: Lightning ``ModelCheckpoint`` files (``last.ckpt``, ``epoch=0-step=3.ckpt``)
LIGHTNING_SUFFIX = ".ckpt"
#: DeepSpeed ``save_checkpoint`` (HF Trainer, accelerate, Lightning's DeepSpeed strategy): a ``latest`` file
#: naming the tag folder (HF: ``global_step<N>``, Lightning: ``checkpoint``) that holds per-rank
#: ``*model_states.pt`` (parameter names and full shapes; under ZeRO-3 the module's tensors are empty
#: placeholders) and ``*optim_states.pt`` (each data-parallel rank's partition of the values)
DEEPSPEED_LATEST = "latest"
ZERO_MODEL_STATES = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
ZERO_OPTIM_STATES = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
#: what a DeepSpeed user can set so a checkpoint folder also holds the consolidated weights
ZERO_WEIGHTS_HINT = ("DeepSpeed ZeRO-3 writes partitioned shards only: set zero_optimization."
                     "stage3_gather_16bit_weights_on_model_save: true to also write model.safetensors, or rebuild "
                     "the weights with the zero_to_fp32.py script DeepSpeed puts in the folder")
#: safetensors refuses headers above 100 MB; so do we (a larger length is a corrupt length field)
SAFETENSORS_MAX_HEADER = 100_000_000
#: index JSON files (``*.index.json``): real ones are a few hundred kB even for 1000-shard models
MAX_INDEX_BYTES = 64_000_000
#: a torch zip's ``data.pkl`` and a DCP ``.metadata``: a 10k-tensor model's pickle is ~1 MB
MAX_PICKLE_BYTES = 256_000_000
#: entries of one zip directory, tensors of one header, keys of one index
MAX_ENTRIES = 2_000_000
#: nested containers walked when flattening a pickle's object (shared references count once per visit)
MAX_NESTING = 64
MAX_VISITS = 1_000_000
#: a pickle's objects counted with shared references expanded, and their nesting, checked on the opcodes before
#: unpickling: a 500-byte pickle of tuples sharing tuples describes 2**60 objects, and hashing one (a dict key)
#: never ends; a real 10k-tensor state dict expands to about 10**5
MAX_PICKLE_OBJECTS = 20_000_000
MAX_PICKLE_DEPTH = 200

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
    """A checkpoint file that cannot be read; ``path`` and ``reason`` say which and why, ``hint`` (when the
    reader knows the format's own remedy) what to do."""

    def __init__(self, path: str, reason: str, hint: str | None = None):
        self.path, self.reason, self.hint = path, reason, hint
        super().__init__(f"{path}: {reason}")


def _short(obj: Any, limit: int = 200) -> str:
    """A bounded description of a hostile value (``repr`` of deep or huge input would itself hang or recurse)."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, limit, limit
    try:
        return short.repr(obj)[:limit]
    except Exception:  # noqa: BLE001 - a value whose repr raises still gets described
        return f"<{type(obj).__name__}>"


def _inside(path: str, root: str) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def regular_file_size(path: str, root: str | None = None) -> int:
    """Size of ``path`` if it is a regular file (links followed) inside ``root``; else :class:`CheckpointReadError`.

    FIFOs, devices and sockets are refused before they are opened (reading one hangs or never ends); ``root``
    is the checkpoint folder a file was found in: a link or name resolving outside it is refused, so a
    checkpoint whose weights live elsewhere never passes as complete.
    """
    try:
        info = os.stat(path)
    except OSError as err:
        raise CheckpointReadError(path, f"cannot read file ({err.strerror or err})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device" if stat.S_ISCHR(info.st_mode)
                or stat.S_ISBLK(info.st_mode) else "a socket" if stat.S_ISSOCK(info.st_mode)
                else "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file")
        raise CheckpointReadError(path, f"is {kind}; only regular files are read")
    if root is not None and not _inside(path, root):
        raise CheckpointReadError(
            path, f"resolves to {os.path.realpath(path)}, outside the checkpoint folder {root}; files outside "
                  "it are not read")
    return info.st_size


def read_bounded(path: str, limit: int, root: str | None = None, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see :func:`regular_file_size`)."""
    size = regular_file_size(path, root)
    if size > limit:
        raise CheckpointReadError(path, f"{what} of {size} bytes exceeds the {limit}-byte bound")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # swapped for a FIFO after the check
                raise CheckpointReadError(path, "is not a regular file; only regular files are read")
            return fh.read(min(size, limit) + 1)[:limit]  # never a buffer of `limit` for a small file
    except OSError as err:
        raise CheckpointReadError(path, f"cannot read file ({err.strerror or err})") from None


def _parse_json(path: str, raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CheckpointReadError(path, f"{what} nests deeper than the JSON parser's limit") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointReadError(path, f"{what} is not valid JSON ({_short(str(err))})") from None


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
        formats: the formats met (``safetensors``, ``safetensors-index``, ``torch``, ``lightning``, ``dcp``,
            ``deepspeed``).
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
def read_safetensors_header(path: str, root: str | None = None) -> tuple[dict[str, SavedTensor], dict[str, str]]:
    """Tensor entries and ``__metadata__`` of a safetensors file, validated against the file size.

    Reads 8 bytes and the JSON header, nothing else. Raises :class:`CheckpointReadError` for a file shorter
    than the length field, a header length beyond the file, a header that is not a JSON object, malformed
    entries (dimensions and offsets must be non-negative integers, ``true`` is not one), byte ranges that do not
    match dtype and shape or that overlap, leave gaps or stop short of the file's end (as safetensors itself
    refuses them), and tensor data cut off by truncation. ``root``: the checkpoint folder the file must lie in.
    """
    size = regular_file_size(path, root)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
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
        raise CheckpointReadError(path, f"cannot read file ({err.strerror or err})") from None
    header = _parse_json(path, raw, "header")
    if not isinstance(header, dict):
        raise CheckpointReadError(path, f"header is a JSON {type(header).__name__}, not an object")
    if len(header) > MAX_ENTRIES:
        raise CheckpointReadError(path, f"header lists {len(header)} entries, beyond the bound of {MAX_ENTRIES}")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointReadError(path, "header __metadata__ is not an object of strings")
    data_size = size - 8 - header_len
    entries: dict[str, SavedTensor] = {}
    ranges: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
                and len(entry["data_offsets"]) == 2
                and all(type(v) is int and v >= 0 for v in [*entry["shape"], *entry["data_offsets"]])):
            raise CheckpointReadError(path, f"header entry {_short(key)} is malformed: {_short(entry)}")
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointReadError(path, f"header entry {_short(key)} has unknown dtype {_short(entry['dtype'])}")
        begin, end = entry["data_offsets"]
        numel = 1
        for dim in entry["shape"]:
            numel *= dim
        if end < begin or (dtype[1] >= 1 and end - begin != numel * dtype[1]):
            raise CheckpointReadError(
                path, f"header entry {_short(key)}: byte range {begin}..{end} does not fit {entry['dtype']} "
                      f"shape {_short(entry['shape'])}")
        ranges.append((begin, end, key))
        entries[key] = SavedTensor(key=key, dtype=dtype[0], shape=tuple(entry["shape"]), file=path)
    data_end = max((end for _, end, _ in ranges), default=0)
    if data_end > data_size:
        raise CheckpointReadError(
            path, f"tensor data truncated: the header describes {data_end} bytes of data, the file holds "
                  f"{data_size}")
    position, previous = 0, None
    for begin, end, key in sorted(ranges):
        if begin != position:
            what = (f"overlaps {_short(previous)}" if begin < position
                    else f"leaves {begin - position} unowned bytes before it")
            raise CheckpointReadError(path, f"header entry {_short(key)}: byte range {begin}..{end} {what}")
        position, previous = end, key
    if position != data_size:
        raise CheckpointReadError(
            path, f"{data_size - position} bytes after the last tensor's data belong to no header entry")
    return entries, dict(metadata)


def read_safetensors_index(path: str, root: str | None = None) -> dict[str, str]:
    """The ``weight_map`` (key -> shard file name) of a sharded checkpoint's index JSON.

    Shard names must be plain relative names that stay inside the index's folder (no absolute path, no ``..``).
    """
    data = _parse_json(path, read_bounded(path, MAX_INDEX_BYTES, root, "index"), "broken index JSON: the file")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointReadError(path, "broken index JSON (weight_map is not an object of key -> file name)")
    if len(weight_map) > MAX_ENTRIES:
        raise CheckpointReadError(path, f"index lists {len(weight_map)} keys, beyond the bound of {MAX_ENTRIES}")
    for key, shard in weight_map.items():
        parts = shard.replace("\\", "/").split("/")
        if not shard or os.path.isabs(shard) or ".." in parts or "\0" in shard:
            raise CheckpointReadError(
                path, f"the index places {_short(key)} in {_short(shard)}, a path outside the checkpoint folder; "
                      "shards must be files of the index's own folder")
    return weight_map


# -- torch pickles --------------------------------------------------------------------------------------------
def torch_load_mmap(path: str, root: str | None = None) -> Any:
    """``torch.load(path, weights_only=True, mmap=True)`` on CPU; failures as :class:`CheckpointReadError`.

    The zip is checked first (:func:`check_torch_zip`): a regular file inside ``root``, stored uncompressed.
    """
    read_data_pkl(path, root)  # bounded before torch's own unpickler builds (and hashes) anything
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file, reported as such
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Weights only load failed" in str(err):
            reason = "holds objects that weights_only=True refuses: " + " ".join(str(err).split())[:300]
        raise CheckpointReadError(path, f"unreadable torch file ({type(err).__name__}: {reason})") from None


#: opcodes that change the object below their arguments in place (the first of ``stack_before``)
_IN_PLACE_OPS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
#: zero-argument opcodes whose object later opcodes fill in place: each gets its own cell
_FRESH_OPS = frozenset({"EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"})
_LEAF = (1, 0)


def _opcode_plan() -> dict[str, tuple[int, int, int, int]]:
    """Per opcode name: (kind, items below the mark or -1 without one, items popped, items pushed).

    kind: 0 memo store, 1 memo read, 2 mark, 3 pop, 4 in place, 5 same object, 6 leaf, 7 fresh leaf, 8 new object.
    """
    import pickletools

    plan = {}
    for op in pickletools.opcodes:
        name, before = op.name, op.stack_before
        kind = (0 if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE")
                else 1 if name in ("GET", "BINGET", "LONG_BINGET") else 2 if name == "MARK" else 3 if name == "POP"
                else 4 if name in _IN_PLACE_OPS
                else 5 if name in ("DUP", "READONLY_BUFFER", "READWRITE_BUFFER") else 7 if name in _FRESH_OPS
                else 6 if not before and len(op.stack_after) == 1 else 8)
        mark = before.index(pickletools.markobject) if pickletools.markobject in before else -1
        plan[name] = (kind, mark, len(before), len(op.stack_after))
    return plan


_OPCODE_PLAN = _opcode_plan()


def check_pickle_bounds(raw: bytes, path: str, what: str) -> None:
    """Refuse a pickle whose objects, shared references expanded, exceed :data:`MAX_PICKLE_OBJECTS`, or nest
    deeper than :data:`MAX_PICKLE_DEPTH`, before anything is unpickled.

    Runs the opcodes on a stack of (size, depth) cells instead of objects (``pickletools`` gives each opcode's
    stack effect), in time linear in the pickle: no object is built, so nothing can hash, compare or recurse.
    """
    import pickletools

    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[Any, Any] = {}
    plan = _OPCODE_PLAN

    def refuse(reason: str) -> CheckpointReadError:
        return CheckpointReadError(path, f"{what}: {reason}")

    try:
        for op, arg, _ in pickletools.genops(raw):
            kind, mark, popped, pushed = plan[op.name]
            if kind == 6:
                stack.append(_LEAF)
                continue
            if kind == 0:
                if not stack:
                    raise refuse("malformed pickle (memo store on an empty stack)")
                memo[len(memo) if op.name == "MEMOIZE" else arg] = stack[-1]
                continue
            if kind == 1:
                if arg not in memo:
                    raise refuse(f"malformed pickle (memo key {_short(arg)} read before it is written)")
                stack.append(memo[arg])
                continue
            if kind == 2:
                marks.append(len(stack))
                continue
            if kind == 7:
                stack.append([1, 0])
                continue
            if kind == 3 and marks and marks[-1] == len(stack):
                marks.pop()
                continue
            if mark >= 0:
                if not marks:
                    raise refuse(f"malformed pickle ({op.name} without a mark)")
                base = marks.pop() - mark
            else:
                base = len(stack) - popped
            if base < (marks[-1] if marks else 0):
                raise refuse(f"malformed pickle ({op.name} on a stack too short)")
            args = stack[base:]
            del stack[base:]
            if kind == 4:
                cell, rest = args[0], args[1:]
                if type(cell) is not list:  # an in-place change of a leaf (BUILD on a global): its own cell now
                    cell = list(cell)
                cell[0] += sum(c[0] for c in rest)
                cell[1] = max(cell[1], 1 + max((c[1] for c in rest), default=0))
            elif kind == 5:
                cell = args[0]
            else:
                cell = [1 + sum(c[0] for c in args), 1 + max((c[1] for c in args), default=-1)]
            if cell[0] > MAX_PICKLE_OBJECTS:
                raise refuse(f"its pickle describes more than {MAX_PICKLE_OBJECTS} nested entries once shared "
                             "references are expanded (a reference bomb)")
            if cell[1] > MAX_PICKLE_DEPTH:
                raise refuse(f"its pickle has objects nested deeper than {MAX_PICKLE_DEPTH} levels")
            for _ in range(pushed):
                stack.append(cell)
    except CheckpointReadError:
        raise
    except Exception as err:  # noqa: BLE001 - pickletools' ValueError for a truncated or unknown opcode, etc.
        raise refuse(f"malformed pickle ({type(err).__name__}: {_short(str(err))})") from None


class _TooLarge(Exception):
    """A pickle's object exceeds :data:`MAX_NESTING` or :data:`MAX_VISITS` while being flattened."""


def _check_tree(obj: Any) -> None:
    """Refuse an object whose flattened tree is too large, too deep or cyclic, in time linear in its containers.

    A pickle can share one container under many keys: a 2 kB file describes 2**60 paths. Subtree sizes are
    counted once per distinct container (post-order, no recursion), so the bound is checked before any walk.
    """
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(obj, False)]
    while stack:
        item, done = stack.pop()
        if not isinstance(item, Mapping):
            continue
        key = id(item)
        children = [v for k, v in item.items() if isinstance(k, str)]
        if done:
            on_path.discard(key)
            nested = [id(v) for v in children if isinstance(v, Mapping)]
            sizes[key] = 1 + len(children) - len(nested) + sum(sizes[n] for n in nested)
            depths[key] = 1 + max((depths[n] for n in nested), default=0)
            if sizes[key] > MAX_VISITS:
                raise _TooLarge(f"more than {MAX_VISITS} nested entries (shared references repeated?)")
            if depths[key] > MAX_NESTING:
                raise _TooLarge(f"containers nested deeper than {MAX_NESTING} levels")
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise _TooLarge("a container that contains itself")
        on_path.add(key)
        stack.append((item, True))
        stack.extend((v, False) for v in children if isinstance(v, Mapping) and id(v) not in sizes)


def _flatten(obj: Any, prefix: str, out: dict[str, Any], leaf: type = torch.Tensor) -> None:
    _check_tree(obj)  # bounds the walk below
    stack: list[tuple[Any, str]] = [(obj, prefix)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, leaf):
            out[path[:-1]] = item
        elif isinstance(item, Mapping):
            stack.extend(reversed([(v, f"{path}{k}.") for k, v in item.items() if isinstance(k, str)]))


def flatten_state(obj: Any, path: str, leaf: type = torch.Tensor) -> dict[str, Any]:
    """Dotted key -> ``leaf`` of every leaf inside nested mappings; bounded (:class:`CheckpointReadError`)."""
    out: dict[str, Any] = {}
    try:
        _flatten(obj, "", out, leaf)
    except _TooLarge as err:
        raise CheckpointReadError(path, f"unreadable torch file (its object has {err})") from None
    return out


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
        return flatten_state(obj, path), "torch"
    raise CheckpointReadError(path, f"expected a state dict, found {type(obj).__name__}")


#: legacy typed-storage class names in torch pickles -> dtype name
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "Float8_e4m3fnStorage": "float8_e4m3fn", "Float8_e5m2Storage": "float8_e5m2",
}


def _weights_only_globals() -> frozenset[str]:
    """``module.name`` of every global ``torch.load(weights_only=True)`` admits (torch's own allow-list)."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        names = set(_get_allowed_globals())
    except Exception:  # noqa: BLE001 - a torch without the private list: only the names this reader builds
        names = set()
    for obj in torch.serialization.get_safe_globals():
        target = obj[0] if isinstance(obj, tuple) else obj
        names.add(f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}")
    return frozenset(names)


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
    if isinstance(storage, _StorageMeta) and isinstance(size, (tuple, list)) and all(type(s) is int for s in size):
        return TensorMeta(dtype=storage.dtype, shape=tuple(size))
    return _Opaque()


def _rebuild_parameter_meta(data: Any, *args: Any, **kwargs: Any) -> Any:
    return data


def _size_meta(dims: Any = ()) -> Any:
    """``torch.Size`` as a tuple of ints (DeepSpeed records parameter shapes as ``torch.Size``)."""
    if isinstance(dims, (tuple, list)) and all(type(d) is int and d >= 0 for d in dims):
        return tuple(dims)
    return _Opaque()


class _TorchMetadataUnpickler(pickle.Unpickler):
    """Unpickles a torch zip's ``data.pkl`` into :class:`TensorMeta` and containers: storages are never loaded
    and no global is imported except the safe containers below (everything else becomes :class:`_Opaque`).

    ``foreign`` collects the globals the pickle names that ``torch.load(weights_only=True)`` would refuse: a
    weight file naming one cannot be read for its values, so listing it as fine would call it clean.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.foreign: list[str] = []

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
        if module == "torch" and name == "Size":
            return _size_meta
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return str(getattr(torch, name)).removeprefix("torch.")
        if f"{module}.{name}" not in _WEIGHTS_ONLY_GLOBALS and len(self.foreign) < 20:
            self.foreign.append(f"{module}.{name}"[:200])
        return _Opaque

    def persistent_load(self, pid: Any) -> Any:
        # ("storage", storage type (a dtype name from find_class, or a torch.dtype), key, location, numel)
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and type(pid[4]) is int:
            dtype = pid[1] if isinstance(pid[1], str) else "unknown"
            return _StorageMeta(dtype=dtype, key=str(pid[2])[:200], numel=pid[4])
        return _Opaque()


_WEIGHTS_ONLY_GLOBALS = _weights_only_globals()


def check_torch_zip(path: str, root: str | None = None) -> Any:
    """Open a torch zip checkpoint after checking it cannot inflate: returns the open ``ZipFile``.

    A regular file inside ``root``; at most :data:`MAX_ENTRIES` members, each stored uncompressed (torch writes
    every record so; a compressed member is how a 1 MB file inflates to gigabytes) and inside the file's size.
    """
    import zipfile

    size = regular_file_size(path, root)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        reason = "not a zip archive: truncated, corrupt, or the legacy (pre-1.6) torch format"
        raise CheckpointReadError(path, f"unreadable torch file ({reason}: {err})") from None
    except Exception as err:  # noqa: BLE001 - any zipfile failure on a hostile file ("zip file version 6.4")
        raise CheckpointReadError(path, f"cannot read file ({type(err).__name__}: {_short(str(err))})") from None
    members = archive.infolist()
    problem = None
    if len(members) > MAX_ENTRIES:
        problem = f"{len(members)} zip members, beyond the bound of {MAX_ENTRIES}"
    else:
        for info in members:
            if info.compress_type != zipfile.ZIP_STORED:
                problem = (f"member {_short(info.filename)} is compressed ({info.compress_size} -> {info.file_size} "
                           "bytes); torch stores every record uncompressed, so this is not a torch checkpoint")
                break
            if info.file_size > size:
                problem = f"member {_short(info.filename)} declares {info.file_size} bytes, beyond the file's {size}"
                break
    if problem is not None:
        archive.close()
        raise CheckpointReadError(path, f"unreadable torch file ({problem})")
    return archive


def read_data_pkl(path: str, root: str | None = None) -> bytes:
    """The ``data.pkl`` of a torch zip (:func:`check_torch_zip`), checked by :func:`check_pickle_bounds`."""

    with check_torch_zip(path, root) as archive:
        pickles = [i for i in archive.infolist() if i.filename == "data.pkl" or i.filename.endswith("/data.pkl")]
        if not pickles:
            raise CheckpointReadError(path, "unreadable torch file (a zip without data.pkl)")
        if len(pickles) > 1:  # torch.load picks one by the zip's record prefix: the one checked must be it
            raise CheckpointReadError(
                path, f"unreadable torch file ({len(pickles)} data.pkl members; torch writes one)")
        if pickles[0].file_size > MAX_PICKLE_BYTES:
            raise CheckpointReadError(
                path, f"unreadable torch file (data.pkl of {pickles[0].file_size} bytes exceeds the "
                      f"{MAX_PICKLE_BYTES}-byte bound)")
        try:
            with archive.open(pickles[0]) as fh:
                data = fh.read(MAX_PICKLE_BYTES + 1)
        except Exception as err:  # noqa: BLE001 - a member header claiming a zip version or feature zipfile lacks
            raise CheckpointReadError(path, f"unreadable torch file (data.pkl: {_short(str(err))})") from None
    check_pickle_bounds(data, path, "unreadable torch file (data.pkl)")
    return data


def read_torch_metadata(path: str, root: str | None = None, foreign: list[str] | None = None) -> Any:
    """The object a torch zip pickle holds, with every tensor as a :class:`TensorMeta` (dtype, shape).

    Reads the zip directory and ``data.pkl`` only; no storage is read and no code from the file runs, so
    checkpoints whose extra entries (hyper-parameters, configs) ``weights_only=True`` would refuse still list.
    Globals the pickle names beyond ``weights_only``'s allow-list are appended to ``foreign``.
    """
    data = read_data_pkl(path, root)
    unpickler = _TorchMetadataUnpickler(io.BytesIO(data))
    try:
        obj = unpickler.load()
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointReadError(
            path, f"unreadable torch file (data.pkl: {type(err).__name__}: {_short(str(err))})") from None
    if foreign is not None:
        foreign.extend(unpickler.foreign)
    return obj


def list_torch_file(path: str, root: str | None = None) -> tuple[dict[str, SavedTensor], str]:
    """Tensor entries of a torch zip pickle from its ``data.pkl`` only (:func:`read_torch_metadata`), and its
    format (``lightning`` or ``torch``).

    A plain torch file (``pytorch_model.bin``) whose pickle names globals ``weights_only`` loading refuses is a
    :class:`CheckpointReadError`: its values could not be read, so it is not called readable. Lightning
    ``.ckpt`` files may carry such objects beside ``state_dict`` (hyper-parameters); they list.
    """
    foreign: list[str] = []
    obj = read_torch_metadata(path, root, foreign)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state, fmt = obj["state_dict"], "lightning"
        state = flatten_state(state, path, TensorMeta) if not all(
            isinstance(v, TensorMeta) for v in state.values()) else state
    elif isinstance(obj, Mapping):
        state, fmt = flatten_state(obj, path, TensorMeta), "torch"
        if foreign:
            raise CheckpointReadError(
                path, f"unreadable torch file (its pickle names {', '.join(foreign[:3])}, which weights_only "
                      "loading refuses; nothing from it was run)")
    else:
        raise CheckpointReadError(path, f"expected a state dict, found {type(obj).__name__}")
    entries = {}
    for key, value in state.items():
        if isinstance(value, TensorMeta) and isinstance(key, str):
            entries[key] = SavedTensor(key=key, dtype=value.dtype, shape=value.shape, file=path)
    return entries, fmt


# -- torch.distributed.checkpoint -----------------------------------------------------------------------------
#: the exact classes a DCP ``.metadata`` pickle is built from (torch 2.x ``FileSystemWriter``): metadata
#: records, their field types, and nothing those modules merely import (a TCPStore, a Connection, ...)
_DCP_CLASSES: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo", "_StoragePrefix"}),
    "pathlib": frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset"}),
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Builds only the DCP metadata classes of :data:`_DCP_CLASSES`, torch dtypes/layouts/memory formats,
    ``torch.Size`` and paths; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_CLASSES.get(module, ()):
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
        raise pickle.UnpicklingError(f"global {_short(module)}.{_short(name)} is not DCP metadata")


def list_dcp(folder: str, root: str | None = None) -> dict[str, SavedTensor]:
    """Tensor entries of a ``torch.distributed.checkpoint`` folder, from its ``.metadata`` file only."""
    path = os.path.join(folder, DCP_METADATA)
    raw = read_bounded(path, MAX_PICKLE_BYTES, root or folder, "DCP metadata")
    check_pickle_bounds(raw, path, "unreadable DCP metadata")
    try:
        metadata = _DCPMetadataUnpickler(io.BytesIO(raw)).load()
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointReadError(
            path, f"unreadable DCP metadata ({type(err).__name__}: {_short(str(err))})") from None
    items = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(items, Mapping):
        raise CheckpointReadError(path, f"DCP metadata without state_dict_metadata ({type(metadata).__name__})")
    entries = {}
    for key, meta in items.items():
        props, size = getattr(meta, "properties", None), getattr(meta, "size", None)
        if props is None and size is None:  # BytesStorageMetadata: a non-tensor object
            continue
        dtype = getattr(props, "dtype", None)
        if not (isinstance(key, str) and isinstance(dtype, torch.dtype) and isinstance(size, (tuple, list))
                and all(type(d) is int and d >= 0 for d in size)):
            raise CheckpointReadError(path, f"DCP metadata entry {_short(key)} is malformed: {_short(meta)}")
        entries[key] = SavedTensor(key=key, dtype=str(dtype).removeprefix("torch."), shape=tuple(size), file=path)
    return entries


# -- DeepSpeed ------------------------------------------------------------------------------------------------
def deepspeed_tag_folder(folder: str) -> str | None:
    """The tag folder named by a DeepSpeed checkpoint's ``latest`` file, or ``None`` when ``folder`` has none."""
    latest = os.path.join(folder, DEEPSPEED_LATEST)
    if not os.path.lexists(latest):
        return None
    tag = read_bounded(latest, 4096, folder, "DeepSpeed 'latest' file").decode("utf-8", "replace").strip()
    if not tag or "/" in tag or "\\" in tag or tag in (".", ".."):
        raise CheckpointReadError(latest, f"the DeepSpeed 'latest' file names no tag folder (it holds {_short(tag)})")
    tag_folder = os.path.join(folder, tag)
    if not os.path.isdir(tag_folder) or not _inside(tag_folder, folder):
        raise CheckpointReadError(latest, f"names the tag {_short(tag)}, which is not a folder of this checkpoint")
    return tag_folder


def _zero_shapes(value: Any, path: str, what: str) -> dict[str, tuple[int, ...]]:
    if value is None:
        return {}
    groups = value if isinstance(value, list) else [value]
    out: dict[str, tuple[int, ...]] = {}
    for group in groups:
        if not isinstance(group, Mapping):
            raise CheckpointReadError(path, f"DeepSpeed {what} is malformed ({type(group).__name__})")
        for name, shape in group.items():
            if not (isinstance(name, str) and isinstance(shape, tuple)):
                raise CheckpointReadError(path, f"DeepSpeed {what} entry {_short(name)} is malformed")
            out[name] = shape
    return out


def list_zero(folder: str, root: str | None = None) -> tuple[dict[str, SavedTensor], str]:
    """Tensor entries of a DeepSpeed checkpoint folder (the one holding ``latest``) and the model-states file
    they came from: names and full shapes from rank 0's ``*model_states.pt`` (``param_shapes``,
    ``frozen_param_shapes``, buffers, and ``shared_params`` aliases such as a tied ``lm_head.weight``), read by
    the metadata unpickler; values are not read.

    A checkpoint missing the partition of a data-parallel rank (``dp_world_size`` in the model states) cannot be
    rebuilt: a :class:`CheckpointReadError` naming the ranks."""
    root = root or folder
    tag_folder = deepspeed_tag_folder(folder)
    if tag_folder is None:
        raise CheckpointReadError(folder, "not a DeepSpeed checkpoint (no 'latest' file)")
    names = os.listdir(tag_folder)
    if len(names) > MAX_ENTRIES:
        raise CheckpointReadError(tag_folder, f"{len(names)} files, beyond the bound of {MAX_ENTRIES}")
    models = {n: ZERO_MODEL_STATES.match(n) for n in names}
    models = {n: m for n, m in models.items() if m}
    if not models:
        raise CheckpointReadError(tag_folder, "a DeepSpeed tag folder without *_model_states.pt files")
    first = min(models, key=lambda n: (int(models[n].group(1) or 0), int(models[n].group(2))))
    path = os.path.join(tag_folder, first)
    obj = read_torch_metadata(path, root)
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(path, f"expected DeepSpeed model states (a dict), found {type(obj).__name__}")
    dp = obj.get("dp_world_size", 1)
    if type(dp) is not int or not 1 <= dp <= MAX_ENTRIES:
        raise CheckpointReadError(path, f"DeepSpeed model states with a malformed dp_world_size ({_short(dp)})")
    optim_ranks = {int(m.group(1)) for n in names if (m := ZERO_OPTIM_STATES.match(n))}
    missing = [r for r in range(dp) if r not in optim_ranks]
    if any(m.group(1) is not None for m in models.values()):  # ZeRO-3: each rank's model states too
        model_ranks = {int(m.group(1)) for m in models.values() if m.group(1) is not None}
        missing = sorted(set(missing) | {r for r in range(dp) if r not in model_ranks})
    if missing:
        raise CheckpointReadError(
            tag_folder, f"incomplete DeepSpeed checkpoint: no partition of data-parallel rank(s) {missing[:8]} "
                        f"(of {dp}); the saved values cannot be rebuilt",
            hint="every rank writes its own partition: a rank that crashed or ran out of disk during the save, or "
                 "ranks on different machines writing to local disks, leave it incomplete; save to storage every "
                 "node shares (or copy each node's tag folder together) and check the save finished on all ranks")
    for name in names:  # every partition file must be a regular file inside the checkpoint
        if ZERO_OPTIM_STATES.match(name) or name in models:
            regular_file_size(os.path.join(tag_folder, name), root)
    module = obj.get("module")
    module = module if isinstance(module, Mapping) else {}
    shapes = _zero_shapes(obj.get("param_shapes"), path, "param_shapes")
    shapes.update(_zero_shapes(obj.get("frozen_param_shapes"), path, "frozen_param_shapes"))
    buffers = obj.get("buffer_names") or []
    if not isinstance(buffers, (list, tuple)):
        raise CheckpointReadError(path, "DeepSpeed buffer_names is malformed")
    for name in buffers:
        meta = module.get(name)
        if isinstance(name, str) and isinstance(meta, TensorMeta):
            shapes.setdefault(name, meta.shape)
    entries: dict[str, SavedTensor] = {}
    for name, shape in shapes.items():
        meta = module.get(name)
        dtype = meta.dtype if isinstance(meta, TensorMeta) else "unknown"
        entries[name] = SavedTensor(key=name, dtype=dtype, shape=shape, file=path)
    shared = obj.get("shared_params") or {}
    if not isinstance(shared, Mapping):
        raise CheckpointReadError(path, "DeepSpeed shared_params is malformed")
    for alias, source in shared.items():  # tied names: zero_to_fp32 writes the alias with the source's values
        if isinstance(alias, str) and source in entries:
            entries[alias] = dataclasses.replace(entries[source], key=alias)
    return entries, path


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

    ``kind`` is ``safetensors``, ``safetensors-index``, ``torch``, ``torch-index``, ``dcp`` or ``deepspeed``
    (a folder holding only DeepSpeed's partitioned shards); ``group`` is
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
    if not parts and DEEPSPEED_LATEST in names:  # only DeepSpeed's partitioned shards (ZeRO-3 without gathering)
        parts.append(("", "deepspeed", path))
    if not parts:  # a Lightning checkpoint folder: every .ckpt in it (one: the folder's own keys)
        ckpts = sorted(n for n in names if n.endswith(LIGHTNING_SUFFIX) and not n.startswith("."))
        for name in ckpts:
            full = os.path.join(path, name)
            # Lightning's DeepSpeed strategy saves each .ckpt as a DeepSpeed checkpoint folder
            kind = "deepspeed" if os.path.isdir(full) and DEEPSPEED_LATEST in os.listdir(full) else "torch"
            parts.append(("" if len(ckpts) == 1 else name, kind, full))
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


def _list_part(listing: CheckpointListing, group: str, kind: str, path: str, root: str | None) -> None:
    if kind == "safetensors":
        entries, _ = read_safetensors_header(path, root)
        listing.files.append(path)
        listing.add(group, entries.values())
    elif kind in ("safetensors-index", "torch-index"):
        folder = os.path.dirname(path)
        weight_map = read_safetensors_index(path, root)
        listing.files.append(path)
        by_shard: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(key)
        for shard, keys in by_shard.items():
            shard_path = os.path.join(folder, shard)
            if not os.path.lexists(shard_path):
                raise CheckpointReadError(path, f"the index names shard {shard!r}, which does not exist")
            if kind == "safetensors-index":
                entries, _ = read_safetensors_header(shard_path, folder)
            else:
                entries, _ = list_torch_file(shard_path, folder)
            listing.files.append(shard_path)
            absent = [k for k in keys if k not in entries]
            if absent:
                raise CheckpointReadError(
                    path, f"the index places {len(absent)} key(s) in {shard!r} that it does not hold "
                          f"(first: {absent[0]!r})")
            listing.add(group, (entries[k] for k in keys))
    elif kind == "dcp":
        entries = list_dcp(path, root or path)
        listing.files.append(os.path.join(path, DCP_METADATA))
        listing.add(group, entries.values())
    elif kind == "deepspeed":
        entries, states = list_zero(path, root or path)
        listing.files.append(states)
        listing.add(group, entries.values())
    else:
        entries, fmt = list_torch_file(path, root)
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
    root = path if os.path.isdir(path) else None
    for group, kind, part in parts:
        try:
            _list_part(listing, group, kind, part, root)
        except CheckpointReadError as err:
            listing.errors.append(err)
        except RecursionError:  # a reader missed a nesting bound: still a finding, never a traceback
            listing.errors.append(CheckpointReadError(part, "nests deeper than the reader's limit"))
    return listing


# -- reading values -------------------------------------------------------------------------------------------
def read_tensors(path: str, keys: Iterable[str] | None = None, *, root: str | None = None) -> dict[str, torch.Tensor]:
    """Read the tensors named ``keys`` (all when ``None``) from a weight file or checkpoint folder.

    safetensors files are validated from their header before any tensor is read; torch files are checked
    (:func:`check_torch_zip`) and loaded with ``weights_only=True, mmap=True`` so only the wanted tensors' pages
    are touched. DCP and DeepSpeed folders are not read (listing only: their values are partitioned). Files
    must lie inside ``root`` (the folder when ``path`` is one). Raises :class:`CheckpointReadError` for the first
    unreadable file.
    """
    wanted = None if keys is None else set(keys)
    if root is None and os.path.isdir(path):
        root = path
    out: dict[str, torch.Tensor] = {}
    for _, kind, part in checkpoint_parts(path):
        if kind in ("safetensors-index", "torch-index"):
            weight_map = read_safetensors_index(part, root)
            shards: dict[str, list[str]] = {}
            for key, shard in weight_map.items():
                if wanted is None or key in wanted:
                    shards.setdefault(shard, []).append(key)
            folder = os.path.dirname(part)
            for shard, shard_keys in shards.items():
                out.update(read_tensors(os.path.join(folder, shard), shard_keys, root=folder))
        elif kind == "safetensors":
            from safetensors import SafetensorError, safe_open

            entries, _ = read_safetensors_header(part, root)
            try:
                with safe_open(part, framework="pt") as fh:
                    for key in entries:
                        if wanted is None or key in wanted:
                            out[key] = fh.get_tensor(key)
            except (SafetensorError, OSError) as err:
                raise CheckpointReadError(part, f"unreadable safetensors file ({err})") from None
        elif kind == "torch":
            state, _ = torch_state_dict(torch_load_mmap(part, root), part)
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and (wanted is None or key in wanted):
                    out[key] = value
    return out
