"""Lightning integration: a ``Callback`` whose hooks become events, nothing more.

Works with ``pytorch_lightning`` and ``lightning.pytorch``, whichever are installed: ``IntegrityCallback`` is a
``Callback`` of every installed package at once, so one class path
(``class_path: callbacks.lightning.IntegrityCallback``) serves both packages' ``LightningCLI`` and trainers.

================================  =====================================================================
hook                              event
================================  =====================================================================
``on_load_checkpoint``            ``load`` with the checkpoint's ``state_dict``
``on_fit_start``                  ``init`` (ties of a model built in ``configure_model`` are visible here)
``on_before_optimizer_step``      ``step`` / ``before_optimizer`` (Lightning calls it before clipping)
``on_train_batch_end``            ``step`` / ``after_optimizer``, only when the optimizer really stepped
                                  (it also fires on gradient-accumulation batches)
``on_save_checkpoint``            ``checkpoint`` with the dict's ``state_dict`` (before it is written); at
                                  the callback's next hook, ``checkpoint`` again with
                                  ``state_dict_revised=True`` if the LightningModule's own
                                  ``on_save_checkpoint`` (which Lightning calls after the callbacks') changed
                                  which tensors the dict holds
``on_fit_end``                    ``end``
(after each step)                 the finding counts per code go to the trainer's loggers at
                                  ``global_step`` (the step the report names)
================================  =====================================================================

The monitor's state is saved in the checkpoint under a per-instance ``state_key`` and restored on resume.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any

from callbacks.integration import MonitorOwner
from callbacks.metrics import finding_metrics


def _make_callback_class(bases: tuple[type, ...], finetuning: tuple[type, ...]) -> type:
    """The integrity callback class over the installed Lightning packages' ``Callback`` classes (``finetuning``:
    their ``BaseFinetuning`` classes, whose callbacks change the trainable set on purpose)."""

    class IntegrityCallback(MonitorOwner, *bases):
        """Runs the integrity checks inside a Lightning Trainer: Trainer(callbacks=[IntegrityCallback()]).

        Arguments are :class:`~callbacks.integration.MonitorOwner`'s (``policy``, ``declare_ties``,
        ``checks``, ``report``, ...), spelled out in its signature so ``LightningCLI`` validates each of them.
        """

        #: ``global_step`` at the last ``after_optimizer`` event (accumulation batches do not advance it)
        _last_stepped: int | None = None
        #: the checkpoint dict handed to ``on_save_checkpoint``, looked at again at the next hook
        _saved: _SavedCheckpoint | None = None

        @property
        def state_key(self) -> str:
            """Per-instance key: two integrity callbacks configured differently keep separate state."""
            return self._generate_state_key(config=self.config_digest)

        def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
            """A checkpoint is being restored: check its state dict against the model's ties."""
            self._look_again(pl_module)
            self.monitor.dispatch("load", pl_module, step=checkpoint.get("global_step"),
                                  state_dict=checkpoint.get("state_dict"), trainer="lightning")

        def on_fit_start(self, trainer, pl_module) -> None:
            """The model is set up (after ``configure_model``) and any checkpoint restored."""
            self._look_again(pl_module)
            self._last_stepped = trainer.global_step
            schedule = next((type(c).__name__ for c in trainer.callbacks
                             if finetuning and isinstance(c, finetuning)), None)
            self.monitor.dispatch("init", pl_module, step=trainer.global_step,
                                  optimizer=_first_optimizer(trainer), optimizers=_optimizers(trainer),
                                  trainable_schedule=schedule, trainer="lightning")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            """Gradients accumulated (and reduced); clipping has not run yet."""
            self._look_again(pl_module)
            self.monitor.dispatch("step", pl_module, step=trainer.global_step + 1, phase="before_optimizer",
                                  grads_clipped=False, optimizer=optimizer, optimizers=_optimizers(trainer),
                                  trainer="lightning")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            """After a batch: an ``after_optimizer`` step event only when ``global_step`` advanced."""
            self._look_again(pl_module)
            if self._last_stepped is not None and trainer.global_step == self._last_stepped:
                return  # an accumulation batch: no optimizer step happened
            self._last_stepped = trainer.global_step
            self.monitor.dispatch("step", pl_module, step=trainer.global_step, phase="after_optimizer",
                                  optimizer=_first_optimizer(trainer), optimizers=_optimizers(trainer),
                                  trainer="lightning")
            # straight to the loggers at global_step, the step the report names: pl_module.log would file them
            # under Lightning's batch counter, one lower here (after the step, before the counter advances)
            metrics = finding_metrics(self.monitor.findings)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

        def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
            """The checkpoint dict is built; its ``state_dict`` is what will be written."""
            self._look_again(pl_module)
            state = checkpoint.get("state_dict")
            self.monitor.dispatch("checkpoint", pl_module, step=trainer.global_step, state_dict=state,
                                  trainer="lightning")
            # the LightningModule's own on_save_checkpoint runs after this and may replace or edit "state_dict"
            self._saved = _SavedCheckpoint(trainer.global_step, checkpoint, _tensor_keys(state))

        def _look_again(self, pl_module) -> None:
            """Dispatch the last checkpoint's ``state_dict`` again if it changed after ``on_save_checkpoint``."""
            saved, self._saved = self._saved, None
            if saved is None:
                return
            state = saved.checkpoint.get("state_dict")
            if isinstance(state, Mapping) and _tensor_keys(state) != saved.tensor_keys:
                self.monitor.dispatch("checkpoint", pl_module, step=saved.step, state_dict=state,
                                      state_dict_revised=True, trainer="lightning")

        def on_fit_end(self, trainer, pl_module) -> None:
            """Training finished: last checks, summary table and report."""
            self._look_again(pl_module)
            self.monitor.dispatch("end", pl_module, step=trainer.global_step, trainer="lightning")

        def state_dict(self) -> dict[str, Any]:
            """Saved into Lightning checkpoints under :attr:`state_key`."""
            return self.monitor.state_dict()

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            """Restored from a Lightning checkpoint on resume."""
            self.monitor.load_state_dict(state_dict)

    IntegrityCallback.__module__ = __name__
    IntegrityCallback.__qualname__ = "IntegrityCallback"
    return IntegrityCallback


@dataclasses.dataclass
class _SavedCheckpoint:
    """A checkpoint dict handed to ``on_save_checkpoint``, with the tensor keys its state dict held then."""

    step: int
    checkpoint: Mapping[str, Any]
    tensor_keys: frozenset[str]


def _tensor_keys(state: Any) -> frozenset[str]:
    if not isinstance(state, Mapping):
        return frozenset()
    import torch

    return frozenset(k for k, v in state.items() if isinstance(v, torch.Tensor))


def _optimizers(trainer) -> tuple[Any, ...]:
    return tuple(getattr(trainer, "optimizers", None) or ())


def _first_optimizer(trainer) -> Any:
    return next(iter(_optimizers(trainer)), None)


_BASES: list[type] = []
_FINETUNING: list[type] = []
for _package in ("pytorch_lightning", "lightning.pytorch"):
    try:
        _BASES.append(importlib.import_module(_package).Callback)
    except ImportError:
        continue
    _finetuning = getattr(importlib.import_module(f"{_package}.callbacks"), "BaseFinetuning", None)
    if _finetuning is not None:
        _FINETUNING.append(_finetuning)

if not _BASES:
    raise ImportError("callbacks.lightning needs pytorch-lightning (pip install 'integrity-callbacks[lightning]')")

#: the integrity callback: a ``Callback`` of ``pytorch_lightning`` and of ``lightning.pytorch``, as installed
IntegrityCallback = _make_callback_class(tuple(_BASES), tuple(_FINETUNING))


def lightning_pytorch_callback() -> type:
    """The integrity callback class for ``lightning.pytorch`` trainers: :data:`IntegrityCallback` itself (kept for
    code that asked for it by this name; raises ImportError if ``lightning`` is not installed)."""
    import lightning.pytorch  # noqa: F401 - the ImportError when it is not installed

    return IntegrityCallback
