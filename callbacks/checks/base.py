"""The base class every check family derives from.

A check is framework-free: it receives an :class:`~callbacks.events.EventContext`, returns findings, and never
mutates the model, optimizer, RNG state or checkpoint files. Its persistent state (what it recorded at earlier
events) round-trips through :meth:`Check.state_dict` / :meth:`Check.load_state_dict` as plain picklable data,
so it is saved and restored with trainer checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from callbacks.events import EventContext
from callbacks.facts import DeclaredNames, ModelFacts, establish_facts
from callbacks.findings import Finding, Severity


class CheckConfig(BaseModel):
    """Options common to every check: ``enabled``. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = Field(True, description="run this family of checks")


class ReportedOnce:
    """Which failures were reported, per code, so each is reported once while it lasts.

    :meth:`new` is "once until it recovers": a key that stops failing becomes reportable again. :meth:`first`
    is "once for the run": a key is never reported twice. Keys are strings or tuples of strings; the state is
    plain lists (picklable and JSON-ready).
    """

    def __init__(self) -> None:
        self._keys: dict[str, set[Any]] = {}

    def new(self, code: str, failing: Iterable[Any]) -> list[Any]:
        """The keys of ``failing`` not reported for ``code`` at the last call; they now count as reported, and
        keys that are no longer failing are forgotten (reported again if they fail again)."""
        failing = list(failing)
        before = self._keys.get(code, set())
        self._keys[code] = set(failing)
        return [k for k in failing if k not in before]

    def first(self, code: str, failing: Iterable[Any]) -> list[Any]:
        """The keys of ``failing`` never reported for ``code``; they now count as reported for good."""
        seen = self._keys.setdefault(code, set())
        new = [k for k in dict.fromkeys(failing) if k not in seen]
        seen.update(new)
        return new

    def keys(self, code: str) -> set[Any]:
        """The keys currently counted as reported for ``code``."""
        return set(self._keys.get(code, set()))

    def state_dict(self) -> dict[str, list[Any]]:
        """``{code: sorted keys}``, tuples as lists."""
        return {code: sorted(list(k) if isinstance(k, tuple) else k for k in keys)
                for code, keys in self._keys.items()}

    def load_state_dict(self, state: dict[str, list[Any]]) -> None:
        """Restore :meth:`state_dict`."""
        self._keys = {code: {tuple(k) if isinstance(k, list) else k for k in keys} for code, keys in state.items()}


class Check:
    """One family of checks. Subclasses set :attr:`name`, :attr:`Config`, and override ``on_<event>``.

    ``on_<event>(ctx)`` returns an iterable of findings; the default returns none. Use :meth:`finding` to
    build findings: it fills in the event, step and check name.
    """

    #: the key of this family in the recipe's ``checks:`` section
    name: ClassVar[str] = ""
    #: pydantic model of this family's options
    Config: ClassVar[type[CheckConfig]] = CheckConfig

    def __init__(self, config: CheckConfig | None = None, *, monitor_options: dict[str, Any] | None = None):
        self.config = config if config is not None else self.Config()
        #: options the engine passes to every check (custom checks may read them)
        self.monitor_options = dict(monitor_options or {})
        self._own_facts: ModelFacts | None = None
        self._not_applicable_said: set[str] = set()

    # -- dispatch ---------------------------------------------------------------------------------------------
    def run(self, ctx: EventContext) -> list[Finding]:
        """Run this check's handler for ``ctx.event`` and return its findings."""
        handler = getattr(self, f"on_{ctx.event}", None)
        if handler is None:
            return []
        return list(handler(ctx) or ())

    def on_init(self, ctx: EventContext) -> Iterable[Finding]:
        """Model ready, before the first step."""
        return ()

    def on_step(self, ctx: EventContext) -> Iterable[Finding]:
        """Around an optimizer step (``ctx.phase``)."""
        return ()

    def on_checkpoint(self, ctx: EventContext) -> Iterable[Finding]:
        """A checkpoint was written or is about to be."""
        return ()

    def on_load(self, ctx: EventContext) -> Iterable[Finding]:
        """State was loaded or is about to be."""
        return ()

    def on_merge(self, ctx: EventContext) -> Iterable[Finding]:
        """Adapters were merged or unmerged."""
        return ()

    def on_end(self, ctx: EventContext) -> Iterable[Finding]:
        """Training finished."""
        return ()

    # -- helpers ----------------------------------------------------------------------------------------------
    def facts_of(self, ctx: EventContext) -> ModelFacts:
        """The engine's facts about the model (``ctx.facts``); a check run without a monitor establishes its
        own from :meth:`declared_names` (names that match nothing are then left out silently)."""
        if ctx.facts is not None:
            return ctx.facts
        if self._own_facts is None or self._own_facts.model_id != id(ctx.model):
            self._own_facts = establish_facts(ctx.model, self.declared_names())
        return self._own_facts

    def declared_names(self) -> list[DeclaredNames]:
        """Names this family's own configuration gives (used only when no engine established the facts)."""
        return []

    def finding(self, code: str, ctx: EventContext, *, params: Iterable[str] = (), message: str, hint: str,
                severity: Severity | None = None, **details: Any) -> Finding:
        """Build a :class:`Finding` at ``ctx``'s event and step, attributed to this check. ``severity``
        overrides the code's default (e.g. ``warning`` where the condition is expected under a loss scaler)."""
        return Finding.make(code, event=ctx.event, step=ctx.step, params=params, message=message, hint=hint,
                            severity=severity, check=self.name, **details)

    def not_applicable_once(self, ctx: EventContext, what: str, message: str, hint: str) -> list[Finding]:
        """One ``CHECK_NOT_APPLICABLE`` for ``what`` (a short key) the first time it is asked for, then none: what a
        check cannot see stays unseen at every later event, and saying so again would only repeat it."""
        if what in self._not_applicable_said:
            return []
        self._not_applicable_said.add(what)
        return [self.finding("CHECK_NOT_APPLICABLE", ctx, message=message, hint=hint)]

    def report_section(self) -> dict[str, Any] | None:
        """Extra JSON-ready data this check adds to the report (e.g. the tie map); ``None`` for nothing."""
        return None

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Picklable state recorded so far (restored on resume). Plain Python data only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
