"""Hash ledgers: one JSON line per hashed step, and the diff of two ledgers (``python -m callbacks diff A B``).

Format (JSON lines, UTF-8). A *layout* line names the tensors of one kind, in order; it is written before the
first record of that kind and again whenever the names change::

    {"layout": "grad", "names": ["emb.weight", "head.weight"]}

A *record* line holds one hashed step of one rank; ``h`` lists 16-hex-digit hashes in layout order (``null``
for a parameter without a gradient) and ``all`` folds them into one value for a quick comparison::

    {"step": 3, "rank": 0, "kind": "grad", "all": "9f0c...", "h": ["1a2b...", null], "clipped": true}

Kinds: ``param`` (trainable parameters after the optimizer step; at step 0 every parameter at init), ``grad``
(gradients after their reduction, before the optimizer step), ``frozen`` (parameters with requires_grad=False,
at the frozen re-hash cadence). Rank 0 writes ``PATH``; rank k writes ``PATH`` with ``.rank<k>`` before the
suffix (``hashes.rank1.jsonl``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

#: order of kinds within one step: gradients are hashed before the update, parameters after it
KIND_ORDER = {"param": 1, "grad": 0, "frozen": 2}
KIND_WORDS = {"grad": "gradients (after reduction, before the optimizer step)",
              "param": "trainable parameters (after the optimizer step)",
              "frozen": "frozen parameters"}


class LedgerError(ValueError):
    """A ledger file that cannot be read (missing, not JSON lines, records without a layout)."""


def rank_path(path: str | os.PathLike[str], rank: int) -> str:
    """The ledger file of ``rank``: ``path`` itself for rank 0, ``stem.rank<k>.suffix`` otherwise."""
    path = os.fspath(path)
    if rank == 0:
        return path
    stem, suffix = os.path.splitext(path)
    return f"{stem}.rank{rank}{suffix}"


def hex64(value: int | None) -> str | None:
    """A 64-bit hash as 16 hex digits (``None`` stays ``None``)."""
    return None if value is None else f"{value:016x}"


def fold(hashes: Sequence[int | None]) -> str:
    """One 64-bit value over an ordered list of hashes (the record's ``all``)."""
    digest = hashlib.blake2b(digest_size=8)
    for value in hashes:
        digest.update(b"\xff" * 8 if value is None else value.to_bytes(8, "little"))
    return digest.hexdigest()


class LedgerWriter:
    """Appends records of one rank to its ledger file, a line at a time (flushed, so a crash keeps the lines)."""

    def __init__(self, path: str | os.PathLike[str], rank: int = 0, append: bool = False):
        self.path = rank_path(path, rank)
        self.rank = rank
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self._fh = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._layouts: dict[str, tuple[str, ...]] = {}

    def write(self, step: int, kind: str, names: Sequence[str], hashes: Sequence[int | None],
              **extra: Any) -> None:
        """Write one record (and a layout line first when ``names`` changed for ``kind``)."""
        names = tuple(names)
        if self._layouts.get(kind) != names:
            self._layouts[kind] = names
            self._fh.write(json.dumps({"layout": kind, "names": list(names)}, separators=(",", ":")) + "\n")
        record = {"step": step, "rank": self.rank, "kind": kind, "all": fold(hashes),
                  "h": [hex64(v) for v in hashes], **extra}
        self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._fh.flush()

    def close(self) -> None:
        """Close the file (further writes fail)."""
        self._fh.close()


@dataclasses.dataclass(frozen=True)
class LedgerRecord:
    """One hashed step of one rank, with the tensor names resolved: ``hashes`` maps name -> hex (or None)."""

    step: int
    rank: int
    kind: str
    all: str
    hashes: dict[str, str | None]

    @property
    def key(self) -> tuple[int, int, int, str]:
        """Sort key: step, then gradients before parameters, then rank."""
        return (self.step, KIND_ORDER.get(self.kind, 9), self.rank, self.kind)


def read_ledger(path: str | os.PathLike[str]) -> list[LedgerRecord]:
    """Every record of a ledger file, in file order. Bad input raises :class:`LedgerError` naming the line."""
    path = os.fspath(path)
    layouts: dict[str, list[str]] = {}
    records = []
    try:
        fh = open(path, encoding="utf-8")  # noqa: SIM115
    except OSError as err:
        raise LedgerError(f"{path}: cannot read ledger ({err.strerror or err})") from None
    with fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if "layout" in data:
                    layouts[str(data["layout"])] = [str(n) for n in data["names"]]
                    continue
                kind = str(data["kind"])
                if kind not in layouts:
                    raise LedgerError(f"{path}:{lineno}: a {kind!r} record before any {kind!r} layout line")
                names = layouts[kind]
                values = data["h"]
                if len(values) != len(names):
                    raise LedgerError(f"{path}:{lineno}: {len(values)} hashes for a layout of {len(names)} names")
                records.append(LedgerRecord(step=int(data["step"]), rank=int(data["rank"]), kind=kind,
                                            all=str(data["all"]), hashes=dict(zip(names, values, strict=True))))
            except LedgerError:
                raise
            except (ValueError, KeyError, TypeError) as err:
                raise LedgerError(f"{path}:{lineno}: not a ledger line ({type(err).__name__}: {err})") from None
    return records


def _index(records: Sequence[LedgerRecord]) -> dict[tuple[int, int, int, str], LedgerRecord]:
    out: dict[tuple[int, int, int, str], LedgerRecord] = {}
    for record in records:
        out.setdefault(record.key, record)  # a resumed run repeats steps: the first occurrence counts
    return out


def _names(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def diff_ledgers(path_a: str | os.PathLike[str], path_b: str | os.PathLike[str]) -> tuple[int, str]:
    """Compare two ledgers: (0, "identical ...") or (1, the first differing step and tensors); 2 on bad input."""
    try:
        index_a, index_b = _index(read_ledger(path_a)), _index(read_ledger(path_b))
    except LedgerError as err:
        return 2, f"error: {err}"
    if not index_a and not index_b:
        return 2, f"error: {os.fspath(path_a)} and {os.fspath(path_b)} hold no records"
    for key in sorted(set(index_a) | set(index_b)):
        step, _, rank, kind = key
        where = f"step {step}, {KIND_WORDS.get(kind, kind)}, rank {rank}"
        if step == 0 and kind == "param":
            where = f"step 0, parameters at init, rank {rank}"
        rec_a, rec_b = index_a.get(key), index_b.get(key)
        if rec_a is None or rec_b is None:
            have, lack = (path_a, path_b) if rec_b is None else (path_b, path_a)
            return 1, (f"ledgers differ first at {where}: recorded in {os.fspath(have)} only "
                       f"({os.fspath(lack)} stops or hashes on another schedule)")
        if rec_a.all == rec_b.all and rec_a.hashes == rec_b.hashes:
            continue
        differ = [n for n in rec_a.hashes if n in rec_b.hashes and rec_a.hashes[n] != rec_b.hashes[n]]
        only_a = [n for n in rec_a.hashes if n not in rec_b.hashes]
        only_b = [n for n in rec_b.hashes if n not in rec_a.hashes]
        lines = [f"ledgers differ first at {where}:"]
        if differ:
            lines.append(f"  {len(differ)} of {len(rec_a.hashes)} tensors differ: {_names(differ)}")
        if only_a:
            lines.append(f"  only in {os.fspath(path_a)}: {_names(only_a)}")
        if only_b:
            lines.append(f"  only in {os.fspath(path_b)}: {_names(only_b)}")
        return 1, "\n".join(lines)
    steps = sorted({k[0] for k in index_a})
    return 0, f"ledgers are identical: {len(index_a)} records, steps {steps[0]}..{steps[-1]}"


__all__ = ["LedgerError", "LedgerRecord", "LedgerWriter", "diff_ledgers", "fold", "hex64", "rank_path",
           "read_ledger"]
