"""What every trainer integration shares: building the Monitor from the same arguments and exposing it.

Integrations map hooks to events and hold no check logic; this mixin keeps their constructors identical.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from callbacks.checks import Check
from callbacks.errors import ConfigError
from callbacks.findings import Finding
from callbacks.monitor import Monitor
from callbacks.recipe import ChecksConfig, IntegrityConfig, Policy, load_recipe
from callbacks.report import Report


class MonitorOwner:
    """Builds and exposes a :class:`Monitor`. The arguments mirror the recipe's ``integrity:`` section.

    (The Args below are plain text: jsonargparse prints them in LightningCLI's help.)

    Args:
        policy: raise (stop at the first event with error findings), warn or log.
        declare_ties: groups of parameter names that must share one tensor, e.g. [["emb.weight", "head.weight"]].
        checks: per-family options, e.g. {"hashes": {"every_n_steps": 1}}: a ChecksConfig or the same as a plain
            mapping (validated the same way; an unknown key is an error that names the allowed ones).
        report: path of the JSON report written at the end (and when raising); the HTML report is written beside
            it with .html.
        extra_checks: custom Check instances (callbacks.checks.Check subclasses).
        config: an already validated IntegrityConfig (instead of policy, checks and report), e.g. from
            from_recipe().
        monitor: an existing Monitor to use instead of building one (then no other argument is given).
    """

    def __init__(
        self,
        policy: Policy = "raise",
        declare_ties: Sequence[Sequence[str]] | None = None,
        checks: ChecksConfig = ChecksConfig(),  # type: ignore[valid-type]  # noqa: B008 - frozen, never mutated
        report: str | None = None,
        *,
        extra_checks: Sequence[Check] = (),
        config: IntegrityConfig | None = None,
        monitor: Monitor | None = None,
    ):
        if checks is None:  # the same as not given (code written for the earlier `checks=None` default)
            checks = ChecksConfig()
        if monitor is not None:
            given = [name for name, value in (("policy", policy != "raise"), ("declare_ties", declare_ties),
                                              ("checks", checks != ChecksConfig()), ("report", report),
                                              ("extra_checks", tuple(extra_checks)), ("config", config)) if value]
            if given:
                raise ConfigError(f"monitor= uses an existing Monitor, configured already; do not also pass "
                                  f"{', '.join(given)} (configure the Monitor itself)")
            self.monitor = monitor
        else:
            if config is not None and (policy != "raise" or checks != ChecksConfig() or report is not None):
                raise ConfigError("config= is a whole integrity configuration; give policy, checks and report "
                                  "in it, not beside it")
            if isinstance(checks, ChecksConfig):
                checks = checks.model_dump()
            self.monitor = Monitor(policy=policy, declare_ties=declare_ties, checks=checks, report=report,
                                   extra_checks=extra_checks, config=config)

    @classmethod
    def from_recipe(cls, path: str | os.PathLike[str], **kwargs: Any):
        """The callback configured by the ``integrity:`` section of the recipe at ``path``."""
        return cls(config=load_recipe(path), **kwargs)

    def constructor_args(self) -> dict[str, Any]:
        """JSON data that rebuilds an equally configured callback: ``type(self)(**self.constructor_args())``.

        Custom ``extra_checks`` are objects, not data: they are not part of it."""
        config = self.monitor.config.model_dump(mode="json")
        return {"policy": config["policy"], "declare_ties": [list(g) for g in self.monitor.declare_ties],
                "checks": config["checks"], "report": config["report"]}

    @property
    def config_digest(self) -> str:
        """12 hex digits naming this configuration: checkpoint state is keyed by it, so two integrity callbacks
        configured differently keep separate state."""
        identity = json.dumps([self.monitor.config.model_dump(mode="json"), self.monitor.declare_ties])
        return hashlib.sha1(identity.encode()).hexdigest()[:12]

    @property
    def findings(self) -> list[Finding]:
        """All findings so far."""
        return self.monitor.findings

    @property
    def report(self) -> Report:
        """The report so far (``str()`` is the console table, ``.to_json()`` the file)."""
        return self.monitor.report
