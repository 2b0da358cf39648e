"""What every trainer integration shares: building the Monitor from the same arguments and exposing it.

Integrations map hooks to events and hold no check logic; this mixin keeps their constructors identical.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from callbacks.checks.base import Check
from callbacks.findings import Finding
from callbacks.monitor import Monitor
from callbacks.recipe import IntegrityConfig, load_recipe
from callbacks.report import Report


class MonitorOwner:
    """Builds and exposes a :class:`Monitor`; the arguments mirror the recipe's ``integrity:`` section.

    Args:
        policy: ``raise`` | ``warn`` | ``log``.
        declare_ties: groups of parameter names that must share one tensor.
        checks: per-family options (``{"hashes": {"every_n_steps": 1}}``); ``{"name": {"enabled": False}}``
            turns a family off.
        report: path of the JSON report (written on rank 0 at the end).
        extra_checks: custom :class:`~callbacks.checks.base.Check` instances.
        monitor: an existing :class:`Monitor` to use instead (the other arguments must be left out).
    """

    def __init__(
        self,
        policy: str = "raise",
        declare_ties: Sequence[Sequence[str]] | None = None,
        checks: Mapping[str, Any] | None = None,
        report: str | os.PathLike[str] | None = None,
        *,
        extra_checks: Iterable[Check] = (),
        monitor: Monitor | None = None,
        config: IntegrityConfig | None = None,
    ):
        if monitor is None:
            monitor = Monitor(policy=policy, declare_ties=declare_ties, checks=checks, report=report,
                              extra_checks=extra_checks, config=config)
        self.monitor = monitor

    @classmethod
    def from_recipe(cls, path: str | os.PathLike[str], **kwargs: Any):
        """The callback configured by the ``integrity:`` section of the recipe at ``path``."""
        return cls(config=load_recipe(path), **kwargs)

    @property
    def findings(self) -> list[Finding]:
        """All findings so far."""
        return self.monitor.findings

    @property
    def report(self) -> Report:
        """The report so far (``str()`` is the console table, ``.to_json()`` the file)."""
        return self.monitor.report
