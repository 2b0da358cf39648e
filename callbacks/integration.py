"""What every trainer integration shares: building the Monitor from the same arguments and exposing it.

Integrations map hooks to events and hold no check logic; this mixin keeps their constructors identical.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from callbacks.findings import Finding
from callbacks.monitor import Monitor
from callbacks.recipe import load_recipe
from callbacks.report import Report


class MonitorOwner:
    """Builds and exposes a :class:`Monitor`; keyword arguments are :class:`Monitor`'s and mirror the recipe's
    ``integrity:`` section (``policy``, ``declare_ties``, ``checks``, ``report``, ``extra_checks``, ``config``).
    ``monitor=`` uses an existing :class:`Monitor` instead.
    """

    def __init__(self, *, monitor: Monitor | None = None, **monitor_kwargs: Any):
        self.monitor = monitor if monitor is not None else Monitor(**monitor_kwargs)

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
