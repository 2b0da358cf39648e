"""A custom ``accelerate`` loop: the same events, called at the places the loop already has.

There is no callback system in a hand-written loop, so :class:`AcceleratorHooks` gives one method per moment;
each becomes an event, nothing more::

    hooks = AcceleratorHooks(accelerator, policy="warn")
    hooks.begin(model, optimizer=optimizer)       # after accelerator.prepare (and load_state when resuming)
    for step, batch in enumerate(loader, 1):
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model, batch))
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            hooks.before_optimizer_step(model, optimizer)   # no-op on accumulation micro-batches
            optimizer.step()
            hooks.after_optimizer_step(model, optimizer)
            optimizer.zero_grad()
    accelerator.save_state(out_dir); hooks.saved(model, out_dir)
    hooks.end(model)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from callbacks.checks import Check
from callbacks.integration import MonitorOwner
from callbacks.monitor import Monitor
from callbacks.recipe import ChecksConfig, IntegrityConfig, Policy


class AcceleratorHooks(MonitorOwner):
    """Integrity hooks for an ``accelerate`` training loop.

    Args:
        accelerator: the ``accelerate.Accelerator`` (read for ``sync_gradients``: an optimizer step only
            happens when gradients are synchronised).
        The other arguments are :class:`~callbacks.integration.MonitorOwner`'s (``policy``, ``checks``, ...).
    """

    def __init__(
        self,
        accelerator: Any,
        policy: Policy = "raise",
        declare_ties: Sequence[Sequence[str]] | None = None,
        checks: ChecksConfig = ChecksConfig(),  # type: ignore[valid-type]  # noqa: B008 - frozen, never mutated
        report: str | None = None,
        *,
        extra_checks: Sequence[Check] = (),
        config: IntegrityConfig | None = None,
        monitor: Monitor | None = None,
    ):
        super().__init__(policy, declare_ties, checks, report, extra_checks=extra_checks, config=config,
                         monitor=monitor)
        self.accelerator = accelerator
        self.step = 0

    def _stepping(self) -> bool:
        return bool(getattr(self.accelerator, "sync_gradients", True))

    def begin(self, model: Any, resumed_from: str | None = None, optimizer: Any = None) -> None:
        """Model (and ``optimizer``: one, or a list) prepared; ``resumed_from`` is the ``load_state`` folder when
        resuming (runs ``load`` first). With the optimizer, the checks see from the start what it holds."""
        optimizers = tuple(optimizer) if isinstance(optimizer, (list, tuple)) else ()
        first = optimizers[0] if optimizers else optimizer
        if resumed_from is not None:
            self.monitor.dispatch("load", model, step=self.step, checkpoint_dir=resumed_from, optimizer=first,
                                  optimizers=optimizers, trainer="accelerate")
        self.monitor.dispatch("init", model, step=self.step, optimizer=first, optimizers=optimizers,
                              trainer="accelerate")

    def before_optimizer_step(self, model: Any, optimizer: Any = None, grads_clipped: bool | None = None) -> None:
        """Gradients reduced, before ``optimizer.step()``; ignored on accumulation micro-batches."""
        if self._stepping():
            self.monitor.dispatch("step", model, step=self.step + 1, phase="before_optimizer",
                                  grads_clipped=grads_clipped, optimizer=optimizer, trainer="accelerate")

    def after_optimizer_step(self, model: Any, optimizer: Any = None) -> None:
        """After ``optimizer.step()``; ignored on accumulation micro-batches."""
        if self._stepping():
            self.step += 1
            self.monitor.dispatch("step", model, step=self.step, phase="after_optimizer", optimizer=optimizer,
                                  trainer="accelerate")

    def saved(self, model: Any, checkpoint_dir: str) -> None:
        """``accelerator.save_state`` / ``save_model`` wrote ``checkpoint_dir``."""
        self.monitor.dispatch("checkpoint", model, step=self.step, checkpoint_dir=checkpoint_dir,
                              trainer="accelerate")

    def end(self, model: Any) -> None:
        """Training finished: last checks, summary table and report."""
        self.monitor.dispatch("end", model, step=self.step, trainer="accelerate")
