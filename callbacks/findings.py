"""Findings: what a check reports, with a stable code, the parameters involved and the fix.

The code table is part of the public contract (see README): codes are never renamed, only added.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]

SEVERITIES: tuple[str, ...] = ("error", "warning", "info")
#: the order findings are shown and kept in when bounded: errors first
SEVERITY_RANK: dict[str, int] = {s: i for i, s in enumerate(SEVERITIES)}


@dataclasses.dataclass(frozen=True)
class CodeInfo:
    """Default severity and one-line meaning of a finding code."""

    severity: Severity
    meaning: str


#: Every finding code of the contract, with its default severity and meaning.
CODES: dict[str, CodeInfo] = {
    "TIE_BROKEN": CodeInfo("error", "parameters declared or recorded as tied no longer share storage"),
    "TIE_DIVERGED": CodeInfo(
        "error", "tied copies kept in separate storage no longer hold equal values"
    ),
    "TIE_CHECKPOINT_CONFLICT": CodeInfo(
        "error", "a checkpoint holds different values under keys that the model ties; loading keeps one"
    ),
    "TIE_UNDECLARED": CodeInfo("info", "parameters share storage without any declaration"),
    "MERGE_SIDE_EFFECT": CodeInfo(
        "error", "a merge changed parameters outside the merged adapters' targets"
    ),
    "MERGE_MISMATCH": CodeInfo(
        "error", "the merged model's output differs from the adapter model's beyond tolerance"
    ),
    "UNMERGE_MISMATCH": CodeInfo("error", "unmerge did not restore the base weights"),
    "ADAPTER_INIT_WRONG": CodeInfo("error", "adapter parameters violate their init contract"),
    "ADAPTER_NOT_IDENTITY": CodeInfo(
        "error", "a fresh adapter that promises identity changes the model's output"
    ),
    "ADAPTER_NOT_TRAINABLE": CodeInfo("error", "adapter parameters with requires_grad=False"),
    "ADAPTER_DEAD": CodeInfo(
        "error", "trainable adapter parameters received no gradient or an all-zero gradient"
    ),
    "UNSAVED_TRAINABLE": CodeInfo("error", "a trainable parameter is missing from the saved state"),
    "SAVED_VALUE_MISMATCH": CodeInfo(
        "error", "a saved tensor's value differs from the live parameter's"
    ),
    "CHECKPOINT_UNREADABLE": CodeInfo(
        "error", "a checkpoint file is truncated, corrupt or unreadable"
    ),
    "FROZEN_CHANGED": CodeInfo("error", "a parameter with requires_grad=False changed across a step"),
    "GRAD_REPLICA_MISMATCH": CodeInfo("error", "gradient hashes differ across data-parallel ranks"),
    "PARAM_REPLICA_MISMATCH": CodeInfo("error", "parameter hashes differ across data-parallel ranks"),
    "GRAD_NONFINITE": CodeInfo("error", "NaN or Inf in a gradient"),
    "TIE_REPLACED": CodeInfo(
        "info", "PEFT replaced one side of a tie by a trained copy (modules_to_save); what that means when saving"
    ),
    "ADAPTER_UNUSED": CodeInfo(
        "warning", "adapters that get no gradient while others of the same model train (outside the forward path)"
    ),
    "TRAINABLE_NOT_OPTIMIZED": CodeInfo(
        "error", "a requires_grad=True parameter that no optimizer parameter group holds"
    ),
    "TRAINABLE_SET_CHANGED": CodeInfo(
        "error", "the set of trainable parameters changed mid-run without a declared schedule"
    ),
    "PARAM_NOT_UPDATED": CodeInfo(
        "error", "a parameter the optimizer holds had non-zero gradients for K steps and never changed"
    ),
    "NAME_NOT_FOUND": CodeInfo(
        "error", "a name the configuration gives (declared ties, tied copies, module patterns) matches nothing"
    ),
    "CHECK_NOT_APPLICABLE": CodeInfo(
        "info", "a check could not judge this setup (e.g. an init that does not promise identity)"
    ),
    # A broken check must never kill training: it is a warning, so even policy "raise" goes on.
    "CHECK_FAILED": CodeInfo("warning", "a check itself raised; training goes on"),
}


#: the length a log line of a finding is kept within (the names may make it longer)
LOG_LINE_WIDTH = 200


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem (or fact) a check found.

    Attributes:
        code: a code of :data:`CODES`.
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        event: the event at which it was found (``init``, ``step``, ``checkpoint``, ``load``, ``merge``, ``end``).
        step: the optimizer step the event belongs to (``None`` where no step applies).
        params: parameter names as the user's model names them (wrapper prefixes stripped).
        message: what was found, with the numbers that show it.
        hint: the concrete fix.
        check: the name of the check family that reported it.
        details: extra JSON-serialisable facts (files read, expected vs found values, ranks...).
    """

    code: str
    severity: Severity
    event: str
    step: int | None
    params: tuple[str, ...]
    message: str
    hint: str
    check: str = ""
    details: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown finding code {self.code!r}; known codes: {sorted(CODES)}")
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")
        object.__setattr__(self, "params", tuple(self.params))

    @classmethod
    def make(
        cls,
        code: str,
        *,
        event: str,
        step: int | None,
        params: Iterable[str] = (),
        message: str,
        hint: str,
        severity: Severity | None = None,
        check: str = "",
        **details: Any,
    ) -> Finding:
        """Build a finding whose severity defaults to the code's own."""
        return cls(
            code=code,
            severity=severity or (CODES[code].severity if code in CODES else "error"),
            event=event,
            step=step,
            params=tuple(params),
            message=message,
            hint=hint,
            check=check,
            details=details,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        out = dataclasses.asdict(self)
        out["params"] = list(self.params)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        """Inverse of :meth:`to_dict`."""
        return cls(**{**data, "params": tuple(data.get("params", ()))})

    @property
    def where(self) -> str:
        """``event@step`` (``event`` alone when the step is unknown)."""
        return self.event if self.step is None else f"{self.event}@{self.step}"

    def _names(self, limit: int) -> str:
        extra = len(self.params) - limit
        return ", ".join(self.params[:limit]) + (f" (+{extra})" if extra > 0 else "")

    def log_line(self, width: int = LOG_LINE_WIDTH, fix_at: str = "in the integrity report") -> str:
        """One short line for logs and warnings: severity, code, ``event@step``, the first names, the start of the
        message, and where the fix is (``fix_at``; the report's table and JSON carry the whole message and fix)."""
        head = f"[{self.severity}] {self.code} at {self.where}"
        names = self._names(3)
        if names:
            head += f" [{names}]"
        tail = f" (fix: {self.code} {fix_at})"
        room = width - len(head) - len(tail) - 2
        message = self.message if len(self.message) <= room else self.message[: max(room - 3, 0)].rstrip() + "..."
        return f"{head}: {message}{tail}" if room > 10 else head + tail

    def __str__(self) -> str:
        names = self._names(4)
        return f"[{self.severity}] {self.code} at {self.where}: {self.message}" + (
            f" [{names}]" if names else ""
        ) + f" -> fix: {self.hint}"
