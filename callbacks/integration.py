"""What every trainer integration shares: building the Monitor from the same arguments and exposing it.

Integrations map hooks to events and hold no check logic; this mixin keeps their constructors identical.
"""

from __future__ import annotations

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

    @property
    def findings(self) -> list[Finding]:
        """All findings so far."""
        return self.monitor.findings

    @property
    def report(self) -> Report:
        """The report so far (``str()`` is the console table, ``.to_json()`` the file)."""
        return self.monitor.report
