"""The engine: holds the enabled checks, dispatches named events to them, collects findings, applies the policy.

Integrations (HF, Lightning, accelerate) own a :class:`Monitor` and call :meth:`Monitor.dispatch` from their
hooks; custom loops call it directly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from callbacks.checks import REGISTRY, Check
from callbacks.errors import ConfigError, IntegrityError
from callbacks.events import EventContext
from callbacks.facts import ModelFacts, declared_names, establish_facts, name_not_found
from callbacks.findings import SEVERITY_RANK, Finding
from callbacks.primitives.collectives import distributed_rank
from callbacks.recipe import IntegrityConfig, load_recipe, parse_integrity_section
from callbacks.report import Report

logger = logging.getLogger("callbacks")

class IntegrityWarning(UserWarning):
    """Category of the warnings issued under policy ``warn``."""


def validate_declare_ties(declare_ties: Any) -> list[list[str]]:
    """``declare_ties`` as a list of name groups; anything else is a :class:`ConfigError` saying the fix."""
    if declare_ties is None:
        return []
    if isinstance(declare_ties, (str, bytes)) or not isinstance(declare_ties, Iterable):
        raise ConfigError(f"declare_ties must be a list of name groups like [('emb.weight', 'head.weight')], "
                          f"got {declare_ties!r}")
    groups = []
    for group in declare_ties:
        if isinstance(group, (str, bytes)) or not isinstance(group, Iterable):
            raise ConfigError(f"declare_ties: each entry must be a tuple of parameter names, got {group!r}")
        names = list(group)
        if len(set(names)) < 2 or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"declare_ties: each group needs two or more different names (str), got {group!r}")
        groups.append(names)
    return groups


def describe_error(err: BaseException) -> str:
    """``Type: message`` of an exception, even one whose ``__str__`` raises."""
    try:
        return f"{type(err).__name__}: {err}"
    except Exception:  # noqa: BLE001 - a custom exception may break its own message
        return f"{type(err).__name__} (its message could not be rendered)"


def check_failed(check: Check, event: str, step: int | None, what: str, hint: str) -> Finding:
    """The ``CHECK_FAILED`` finding for ``check`` at ``event``: ``what`` it did (``raised ...``), with the traceback."""
    return Finding.make("CHECK_FAILED", event=event, step=step, check=check.name,
                        message=f"check {check.name or type(check).__name__!r} {what}", hint=hint,
                        traceback=traceback.format_exc(limit=5))


def _plain(value: Any) -> Any:
    """A JSON stand-in for a detail value JSON cannot hold (a tensor, an object): a short description."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"<{type(value).__name__} shape {list(shape)}>"
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def accepted_finding(found: Any) -> Finding:
    """``found`` if it is a :class:`Finding` whose details JSON can hold; details it cannot hold are replaced by
    short descriptions (trainers save findings as JSON); anything else raises ``TypeError``."""
    if not isinstance(found, Finding):
        raise TypeError(f"returned {type(found).__name__} where a Finding was expected (build one with "
                        "self.finding(code, ctx, ...))")
    try:
        json.dumps(found.details)
    except (TypeError, ValueError):
        found = dataclasses.replace(found, details=json.loads(json.dumps(found.details, default=_plain)))
    return found


class RankFindings:
    """Brings the findings of every rank to rank 0 at ``end``, so the report and the exit code are the job's.

    Each rank checks what it sees; a finding seen only on rank k (a rank-local fault, a tie broken on one replica)
    would otherwise stay in rank k's log at debug level. The exchange goes through a bounded gloo group of all
    ranks created at ``init`` (a collective every rank reaches); each rank sends at most
    :attr:`MAX_FINDINGS` findings in at most :attr:`MAX_BYTES` of JSON (never pickled objects), errors first.
    """

    MAX_FINDINGS = 200
    MAX_BYTES = 1 << 20
    TIMEOUT_S = 60.0

    def __init__(self, group: Any = None, failure: str | None = None):
        self.group = group
        self.failure = failure

    @classmethod
    def connect(cls) -> RankFindings | None:
        """The gatherer of an initialised multi-process job (a collective: every rank calls it at ``init``);
        ``None`` in a single process."""
        from callbacks.primitives.collectives import ReplicaGroup, distributed_world

        if distributed_world()[1] <= 1:
            return None
        try:
            return cls(ReplicaGroup(cls.TIMEOUT_S))
        except Exception as err:  # noqa: BLE001 - reported at end, where the findings would have been gathered
            return cls(failure=describe_error(err))

    def _payload(self, findings: Sequence[Finding]) -> str:
        order = sorted(findings, key=lambda f: SEVERITY_RANK[f.severity])
        chosen = [f.to_dict() for f in order[: self.MAX_FINDINGS]]
        text = json.dumps(chosen, default=str)
        while len(text) > self.MAX_BYTES and chosen:
            chosen = chosen[: len(chosen) // 2]
            text = json.dumps(chosen, default=str)
        return text

    def gather(self, findings: Sequence[Finding], step: int | None) -> list[Finding]:
        """On rank 0: the other ranks' findings that rank 0 lacks (details ``seen_on_ranks``; the message says
        which rank), or a ``CHECK_FAILED`` if the exchange could not be made. Elsewhere: nothing. A collective."""
        def failed(why: str) -> list[Finding]:
            self.failure, self.group = None, None  # said once; no later gather is tried
            return [Finding.make(
                "CHECK_FAILED", event="end", step=step, check="engine",
                message=f"the findings of the other ranks could not be gathered: {why}",
                hint="the report holds rank 0's findings only; look at every rank's log (the other ranks log "
                     "their findings at debug level)")]

        if self.failure is not None:
            return failed(self.failure)
        if self.group is None:
            return []
        try:
            gathered = self.group.all_gather_object(self._payload(findings))
        except Exception as err:  # noqa: BLE001 - a lost peer must not kill the end of training
            return failed(describe_error(err))
        if self.group.global_rank != 0:
            return []
        seen: dict[Finding, list[int]] = {}
        for position, text in enumerate(gathered):
            rank = self.group.ranks[position]
            if rank == 0 or not isinstance(text, str):
                continue
            try:
                theirs = [Finding.from_dict(d) for d in json.loads(text)]
            except Exception:  # noqa: BLE001, S112 - a peer of this job; a malformed entry is dropped
                continue
            for finding in theirs:
                if finding not in findings:
                    seen.setdefault(finding, []).append(rank)
        out = []
        for finding, ranks in seen.items():
            where = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks}"
            out.append(dataclasses.replace(finding, message=f"{finding.message} (seen on {where})",
                                           details={**finding.details, "seen_on_ranks": ranks}))
        return out


class Monitor:
    """Dispatches events to checks and keeps their findings.

    Args:
        policy: ``raise`` (raise :class:`IntegrityError` at the first event with error findings), ``warn``
            (issue an :class:`IntegrityWarning` per finding) or ``log`` (log only).
        declare_ties: groups of parameter names that must share one tensor.
        checks: per-family options, as the recipe's ``checks:`` section (``{"hashes": {"every_n_steps": 1}}``).
        report: path of the JSON report written at the end (and when raising), on rank 0.
        extra_checks: additional :class:`~callbacks.checks.base.Check` instances (custom checks).
        config: an already validated :class:`IntegrityConfig` (instead of policy/checks/report).
    """

    def __init__(
        self,
        policy: str = "raise",
        declare_ties: Sequence[Sequence[str]] | None = None,
        checks: Mapping[str, Any] | None = None,
        report: str | os.PathLike[str] | None = None,
        *,
        extra_checks: Iterable[Check] = (),
        config: IntegrityConfig | None = None,
    ):
        if config is None:
            if checks is not None and not isinstance(checks, Mapping):
                raise ConfigError(f"checks must be a mapping of check name to options, got {type(checks).__name__}")
            section = {"policy": policy, "report": os.fspath(report) if report is not None else None,
                       "checks": dict(checks or {})}
            config = parse_integrity_section(section, source="arguments", prefix="")
        self.config = config
        self.declare_ties = validate_declare_ties(declare_ties)
        options = {"declare_ties": self.declare_ties}
        self.checks: list[Check] = []
        for name, cls in REGISTRY.items():
            check_config = getattr(config.checks, name)
            if check_config.enabled:
                self.checks.append(cls(check_config, monitor_options=options))
        for check in extra_checks:
            if not isinstance(check, Check):
                raise ConfigError(f"extra_checks entries must be Check instances, got {type(check).__name__}")
            self.checks.append(check)
        self._findings: list[Finding] = []
        self._summary_printed = False
        #: whether the ``end`` event prints the table; a job that checks more after training (a merge) sets it
        #: False and calls :meth:`finish` itself, so the terminal shows one table per job
        self.summary_at_end = True
        self._last_step: int | None = None
        self._merge_watch: Any = None
        #: what the engine established about the model at its first event (see :mod:`callbacks.facts`)
        self.facts: ModelFacts | None = None
        self._restored_ties: list[Any] = []
        #: the bounded group over every rank that gathers the ranks' findings to rank 0 at ``end``
        self._ranks: RankFindings | None = None

    @classmethod
    def from_recipe(cls, path: str | os.PathLike[str], **kwargs: Any) -> Monitor:
        """A monitor configured by the ``integrity:`` section of the recipe at ``path``."""
        return cls(config=load_recipe(path), **kwargs)

    # -- properties -------------------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This process's rank, resolved each time it is needed: Lightning's launcher starts rank 1 by re-running
        the script (the callback is built before the process group exists, without ``RANK``)."""
        return distributed_rank()

    @property
    def policy(self) -> str:
        """``raise``, ``warn`` or ``log``."""
        return self.config.policy

    @property
    def findings(self) -> list[Finding]:
        """All findings so far, in the order found."""
        return list(self._findings)

    @property
    def report(self) -> Report:
        """A :class:`Report` of all findings so far and the checks' report sections."""
        sections = {}
        for check in self.checks:
            try:
                section = check.report_section()
            except Exception as err:  # noqa: BLE001 - one broken section must not lose the report
                section = {"check_failed": f"report_section() raised {describe_error(err)}"}
            if section is not None:
                sections[check.name or type(check).__name__] = section
        return Report(findings=self.findings, sections=sections)

    def check(self, name: str) -> Check | None:
        """The enabled check of family ``name``, if any."""
        return next((c for c in self.checks if c.name == name), None)

    # -- dispatch ---------------------------------------------------------------------------------------------
    def dispatch(self, event: str, model: Any, **context: Any) -> list[Finding]:
        """Run every check on ``event`` and apply the policy. Returns this event's new findings.

        ``context`` fills :class:`~callbacks.events.EventContext` (``step``, ``phase``, ``state_dict``, ...).
        """
        new: list[Finding] = []
        if self.facts is None or (event in ("init", "load") and self.facts.model_id != id(model)):
            new.extend(self._establish(event, model, context.get("step")))
        context.setdefault("facts", self.facts)
        ctx = EventContext(event=event, model=model, **context)
        if ctx.step is not None:
            self._last_step = ctx.step
        if event == "init":
            self._watch_merges(model)
            if self._ranks is None:
                self._ranks = RankFindings.connect()
        for check in self.checks:
            try:
                new.extend(accepted_finding(f) for f in check.run(ctx))
            except Exception as err:  # noqa: BLE001 - a broken check must never kill training
                new.append(check_failed(check, event, ctx.step, f"raised {describe_error(err)}",
                                        "training goes on without this check at this event; if the message names "
                                        "a configuration problem fix it, otherwise report it with the traceback in "
                                        "details"))
        if event == "end" and self._ranks is not None:
            new.extend(self._ranks.gather(self._findings + new, step=ctx.step))
        self._findings.extend(new)
        self._apply_policy(new)
        if event == "end":
            if self.summary_at_end:
                self.finish()
            else:
                self._write_report()
        return new

    def _establish(self, event: str, model: Any, step: int | None) -> list[Finding]:
        """Build :attr:`facts` for ``model``; each configured name that matches nothing is one NAME_NOT_FOUND."""
        from torch import nn

        if not isinstance(model, nn.Module):
            return []
        try:
            self.facts = establish_facts(model, declared_names(self.declare_ties, self.config.checks),
                                         recorded=self._restored_ties)
        except Exception as err:  # noqa: BLE001 - checks then run without shared facts, as without a monitor
            return [Finding.make(
                "CHECK_FAILED", event=event, step=step, check="engine",
                message=f"the engine could not establish the model's names and ties: {type(err).__name__}: {err}",
                hint="checks run on their own view of the model; report this with the traceback in details",
                traceback=traceback.format_exc(limit=5))]
        return [name_not_found(u, event=event, step=step, check="engine") for u in self.facts.unknown]

    def _apply_policy(self, new: list[Finding]) -> None:
        for finding in new:
            level = {"error": logging.ERROR, "warning": logging.WARNING}.get(finding.severity, logging.INFO)
            if self.rank != 0:
                level = logging.DEBUG  # every rank checks; rank 0 speaks for the job (raise still raises)
            elif self.policy == "warn" and finding.severity != "info":
                warnings.warn(finding.log_line(), IntegrityWarning, stacklevel=3)
                continue
            logger.log(level, "%s", finding.log_line())
        errors = [f for f in new if f.severity == "error"]
        if errors and self.policy == "raise" and not self._summary_printed:
            self._summary_printed = True  # training stops here: the table now, once
            self._emit(final=True)
        if errors and self.policy == "raise":
            raise IntegrityError(errors)

    def finish(self) -> Report:
        """Print the summary table and write the JSON report (rank 0 only). Called at ``end``."""
        self._emit(final=True)
        return self.report

    def _emit(self, final: bool) -> None:
        if self.rank != 0:
            return
        print(str(self.report), file=sys.stdout, flush=True)
        if final:
            for kind, path in self._write_report():
                print(f"integrity: {kind} report {path}", file=sys.stdout, flush=True)

    @property
    def html_report_path(self) -> str | None:
        """Where the HTML report goes: beside the JSON report, with ``.html`` (``None`` without a report path)."""
        if not self.config.report:
            return None
        return os.path.splitext(os.path.abspath(self.config.report))[0] + ".html"

    def _write_report(self) -> list[tuple[str, str]]:
        """Write the JSON report and the HTML one beside it (rank 0, when a path is configured); (kind, absolute
        path) of each file written."""
        if self.rank != 0 or not self.config.report:
            return []
        from callbacks.report_html import render_html

        report = self.report
        written = []
        for kind, path, render in (("JSON", os.path.abspath(self.config.report), report.to_json),
                                   ("HTML", self.html_report_path, lambda: render_html(report))):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", encoding="utf-8") as fh:
                    fh.write(render())
            except OSError as err:  # the findings still stand (and a raise still raises): say where it failed
                logger.error("integrity: could not write the %s report %s: %s", kind, path, describe_error(err))
                continue
            written.append((kind, path))
        return written

    # -- merge ------------------------------------------------------------------------------------------------
    def _watch_merges(self, model: Any) -> None:
        """With ``merge: {watch: true}``, wrap the model's merge methods so the user's own merges are checked.

        The watch outlives training on purpose (a merge right after ``trainer.train()`` is the case it is for);
        :meth:`close` removes it.
        """
        if self._merge_watch is None:
            from callbacks.merging import install_merge_watch

            self._merge_watch = install_merge_watch(self, model, step=lambda: self._last_step)

    def close(self) -> None:
        """Remove what the monitor installed on the model (the merge watch). Safe to call twice."""
        if self._merge_watch is not None:
            self._merge_watch.remove()
            self._merge_watch = None

    def checked_merge(self, model: Any, method: str | None = None, **kwargs: Any) -> Any:
        """Merge adapters (PEFT ``merge_and_unload`` by default; ``merge_adapter``, ``unmerge_adapter``, or the
        ``adapters`` library's ``merge_adapter``/``reset_adapter``) and run the merge checks; returns the merged
        model. Findings are attributed to ``step=`` if given, else to the last step this monitor saw (a merge
        after training reports ``merge@<last step>``, the convention of every other event). See
        :func:`callbacks.merging.checked_merge`."""
        from callbacks.merging import checked_merge

        kwargs.setdefault("step", lambda: self._last_step)
        return checked_merge(self, model, method, **kwargs)

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Picklable state: findings so far and each check's state (saved with trainer checkpoints)."""
        checks: dict[str, Any] = {}
        for check in self.checks:
            if not check.name:
                continue
            try:
                checks[check.name] = check.state_dict()
            except Exception as err:  # noqa: BLE001 - the trainer's save must not fail because a check did
                failed = check_failed(check, "checkpoint", self._last_step,
                                      f"state_dict() raised {describe_error(err)}",
                                      "its state is left out of this checkpoint (it starts fresh on resume)")
                if failed not in self._findings:
                    self._findings.append(failed)
        state = {"findings": [f.to_dict() for f in self._findings], "checks": checks}
        recorded = self.facts.expected_ties if self.facts is not None else self._restored_ties
        state["expected_ties"] = [[list(t.names), t.source] for t in recorded if t.source == "recorded"]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (on resume). Malformed state is a ``CHECK_FAILED``; training goes on."""
        try:
            self._load_state_dict(state)
        except Exception as err:  # noqa: BLE001 - a resume must not fail because the saved monitor state is bad
            self._findings.append(Finding.make(
                "CHECK_FAILED", event="load", step=self._last_step, check="engine",
                message=f"the saved monitor state could not be restored: {describe_error(err)}",
                hint="the checks start fresh from this resume; if the checkpoint was edited or written by another "
                     "version, that explains it",
                traceback=traceback.format_exc(limit=5)))

    def _load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"expected a mapping, got {type(state).__name__}")
        restored = [Finding.from_dict(d) for d in state.get("findings", [])]
        # trainers may restore callback state after running load checks (Lightning does): keep both
        self._findings = restored + [f for f in self._findings if f not in restored]
        from callbacks.primitives.tiemap import ExpectedTie

        self._restored_ties = [ExpectedTie(names=tuple(n), source=s) for n, s in state.get("expected_ties", [])]
        if self.facts is not None and self._restored_ties:
            known = {t.names for t in self.facts.expected_ties}
            self.facts.expected_ties += [t for t in self._restored_ties if t.names not in known
                                         and all(n in self.facts.names for n in t.names)]
        for check in self.checks:
            if check.name in state.get("checks", {}):
                try:
                    check.load_state_dict(state["checks"][check.name])
                except Exception as err:  # noqa: BLE001 - this check starts fresh; the others are restored
                    self._findings.append(check_failed(
                        check, "load", self._last_step, f"load_state_dict() raised {describe_error(err)}",
                        "this check starts fresh from this resume"))
