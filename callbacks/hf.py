"""HF ``transformers.Trainer`` integration: a ``TrainerCallback`` whose hooks become events, nothing more.

================================  =====================================================================
hook                              event
================================  =====================================================================
``on_train_begin``                ``load`` (when resuming: the checkpoint is already in place), ``init``
``on_pre_optimizer_step``         ``step`` / ``before_optimizer`` (HF calls it after gradient clipping)
``on_optimizer_step``             ``step`` / ``after_optimizer``
``on_save``                       ``checkpoint`` with ``checkpoint_dir`` (the files are on disk)
``on_train_end``                  ``end``
================================  =====================================================================

HF has no load hook, so load-time checks run in ``on_train_begin``. Callbacks receive (args, state, control)
and the objects HF passes as keyword arguments (model, optimizer); they never reach into the trainer.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import warnings
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from callbacks.integration import MonitorOwner
from callbacks.metrics import finding_metrics

logger = logging.getLogger("callbacks")

PREFIX_CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE_NAME = "trainer_state.json"


class IntegrityCallback(MonitorOwner, TrainerCallback, ExportableState):
    """Runs the integrity checks inside ``transformers.Trainer``.

    ``Trainer(..., callbacks=[IntegrityCallback()])``; the arguments are :class:`~callbacks.integration.
    MonitorOwner`'s (``policy``, ``declare_ties``, ``checks``, ``report``). The monitor's state is exported
    with checkpoints (``trainer_state.json``, ``stateful_callbacks``, keyed by :attr:`state_key`) and read back
    when training resumes. With ``TrainingArguments(restore_callback_states_from_checkpoint=True)`` HF replaces
    the callback object by one rebuilt from the checkpoint's exported arguments (same configuration, same
    state); read it back as ``[cb for cb in trainer.callback_handler.callbacks if isinstance(cb,
    IntegrityCallback)]``.
    """

    _reporter_warning_given = False

    def on_init_end(self, args, state, control, **kwargs: Any):
        """The trainer is built: take a place before its reporters, so they plot the finding counts."""
        self._log_before_reporters(args)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs: Any):
        """Resumed state is in place here: run ``load`` checks on the resumed checkpoint, then ``init``."""
        self._log_before_reporters(args)  # HF appends callbacks it rebuilt on resume at the end
        step = state.global_step
        if step > 0:
            self._restore(state)
            checkpoint_dir = args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, str) else None
            guess = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
            if checkpoint_dir is None and os.path.isdir(guess):
                checkpoint_dir = guess
            self.monitor.dispatch("load", model, step=step, checkpoint_dir=checkpoint_dir, optimizer=optimizer,
                                  trainer="hf")
        self.monitor.dispatch("init", model, step=step, optimizer=optimizer, trainer="hf")

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs: Any):
        """Gradients are reduced and clipped; the optimizer has not stepped (``state.global_step`` is the last)."""
        self.monitor.dispatch("step", model, step=state.global_step + 1, phase="before_optimizer",
                              grads_clipped=bool(args.max_grad_norm), optimizer=optimizer, trainer="hf")

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs: Any):
        """The optimizer stepped (HF increments ``global_step`` right after this hook)."""
        self.monitor.dispatch("step", model, step=state.global_step + 1, phase="after_optimizer",
                              optimizer=optimizer, trainer="hf")

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs: Any):
        """A ``checkpoint-N`` folder was written."""
        checkpoint_dir = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        try:
            self.monitor.dispatch("checkpoint", model, step=state.global_step, checkpoint_dir=checkpoint_dir,
                                  checkpoint_writer=bool(getattr(args, "should_save", True)),
                                  trainer_world_size=getattr(args, "world_size", None), optimizer=optimizer,
                                  trainer="hf")
        finally:  # also when the policy raises: the checkpoint on disk then holds what stopped the run
            self._store_checkpoint_state(args, state, checkpoint_dir)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs: Any):
        """Training finished: last checks, summary table and report."""
        self.monitor.dispatch("end", model, step=state.global_step, optimizer=optimizer, trainer="hf")

    def on_log(self, args, state, control, logs=None, **kwargs: Any):
        """Finding counts per code join the logs HF hands to the reporters (TensorBoard, W&B, MLflow, ...):
        this callback runs before them (see :meth:`on_init_end`)."""
        if logs is not None:
            logs.update(finding_metrics(self.monitor.findings))

    def _log_before_reporters(self, args) -> None:
        """Move this callback before the first other callback with its own ``on_log`` (HF's reporters from
        ``report_to``, its console printers, TRL's and the user's loggers).

        HF adds the callbacks given as ``Trainer(callbacks=...)`` after its reporters and calls ``on_log`` in
        list order, so the counts would reach only the console. Callbacks do not receive the trainer; the
        handler that calls this hook is found on the call stack. Moving an element of the list to an earlier
        place while HF iterates over it never skips or repeats a callback (the ones after it keep their place).
        """
        handler = _calling_handler(self)
        if handler is None:
            if not self._reporter_warning_given and _reports_to(args):
                self._reporter_warning_given = True
                warnings.warn(f"integrity/* counts may not reach the reporters {_reports_to(args)}: the trainer's "
                              "callback list was not found; put this callback first with "
                              "trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(callback))",
                              stacklevel=3)
            return
        callbacks = handler.callbacks
        mine = next(i for i, cb in enumerate(callbacks) if cb is self)
        first = next((i for i, cb in enumerate(callbacks[:mine]) if _has_own_on_log(cb)), None)
        if first is not None:
            callbacks.insert(first, callbacks.pop(mine))

    # -- state with checkpoints (transformers' ExportableState protocol) --------------------------------------
    @property
    def state_key(self) -> str:
        """Key of this callback's entries in ``trainer_state.json``: two integrity callbacks configured
        differently each restore their own state (HF stores same-named callbacks as one list)."""
        return f"{type(self).__name__}{{'config': '{self.config_digest}'}}"

    def state(self) -> dict[str, Any]:
        """What HF writes into ``trainer_state.json`` with each checkpoint (JSON data).

        ``args`` rebuild the same callback (HF does so with ``restore_callback_states_from_checkpoint=True``);
        ``monitor_state`` sits beside ``attributes`` because HF would set attributes on the rebuilt object,
        and the state is restored at ``on_train_begin`` from the entry under :attr:`state_key` instead."""
        return {"args": self.constructor_args(), "attributes": {}, "state_key": self.state_key,
                "monitor_state": self.monitor.state_dict()}

    def _restore(self, state) -> None:
        if not isinstance(state.stateful_callbacks, dict):
            return
        name = type(self).__name__
        stored = state.stateful_callbacks.get(name)
        own = _own_entry(stored, self.state_key)
        if own is None:
            # a checkpoint written without this callback (or another configuration of it) has no entry for it,
            # and HF's next save indexes the entry by class name
            entry = self.state()
            if stored is None:
                state.stateful_callbacks[name] = entry
            elif isinstance(stored, list):
                stored.append(entry)
            else:
                state.stateful_callbacks[name] = [stored, entry]
            return
        if not self.monitor.findings:
            self.monitor.load_state_dict(own.get("monitor_state") or own.get("attributes", {}).get("monitor_state")
                                         or {})

    def _store_checkpoint_state(self, args, state, checkpoint_dir: str) -> None:
        """HF wrote ``trainer_state.json`` before ``on_save``: put what this checkpoint's own event found into
        our entry there (and in the live state), so resuming from checkpoint N restores checkpoint N's
        findings. Only our entry changes; the file is replaced atomically, by the process that saves."""
        name, fresh = type(self).__name__, self.state()
        if isinstance(state.stateful_callbacks, dict):
            replaced = _replace_own_entry(state.stateful_callbacks.get(name), fresh)
            if replaced is not None:
                state.stateful_callbacks[name] = replaced
        path = os.path.join(checkpoint_dir, TRAINER_STATE_NAME)
        if not args.should_save or not os.path.isfile(path):
            return
        try:
            with open(path, encoding="utf-8") as fh:
                data = json.load(fh)
            stored = data["stateful_callbacks"][name]
        except (OSError, ValueError, KeyError, TypeError):
            return  # not a trainer_state.json we can read: leave HF's file alone
        replaced = _replace_own_entry(stored, fresh)
        if replaced is None:
            return
        data["stateful_callbacks"][name] = replaced
        # a name of this process's own: when two processes both save (DeepSpeed on CPU leaves HF believing every
        # rank is the main one), neither renames the other's file away; the last replace wins, whole
        tmp = f"{path}.integrity-{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(data, indent=2, sort_keys=True) + "\n")  # HF's own layout
            os.replace(tmp, path)
        except OSError as err:  # the checkpoint keeps HF's own entry; training goes on
            logger.warning("integrity: could not store this checkpoint's findings in %s: %s", path, err)
            with contextlib.suppress(OSError):
                os.remove(tmp)


def _calling_handler(callback: Any) -> Any:
    """The ``CallbackHandler`` on the call stack whose callback list holds ``callback``, if any."""
    from transformers.trainer_callback import CallbackHandler

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, CallbackHandler) and any(cb is callback for cb in candidate.callbacks):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame  # a frame held in a local keeps the whole stack alive


def _has_own_on_log(callback: Any) -> bool:
    return not isinstance(callback, IntegrityCallback) and type(callback).on_log is not TrainerCallback.on_log


def _reports_to(args: Any) -> list[str]:
    report_to = getattr(args, "report_to", None) or []
    return [report_to] if isinstance(report_to, str) else [r for r in report_to if r != "none"]


def _own_index(entries: list[Any], key: str) -> int | None:
    """Index of the latest entry under ``key`` in HF's list of stored states for one class name."""
    return next((i for i in range(len(entries) - 1, -1, -1)
                 if isinstance(entries[i], dict) and entries[i].get("state_key") == key), None)


def _own_entry(stored: Any, key: str) -> dict[str, Any] | None:
    """The latest entry under ``key`` among HF's stored states for one class name (one dict, or a list that
    HF appends to at every save); an unkeyed single entry is one written before entries carried keys."""
    entries = stored if isinstance(stored, list) else [stored]
    index = _own_index(entries, key)
    if index is not None:
        return entries[index]
    if isinstance(stored, dict) and "state_key" not in stored:
        return stored
    return None


def _replace_own_entry(stored: Any, fresh: dict[str, Any]) -> Any:
    """``stored`` with its latest entry under ``fresh['state_key']`` replaced by ``fresh``; None if it has none."""
    if isinstance(stored, dict):
        return fresh if stored.get("state_key") == fresh["state_key"] else None
    index = _own_index(stored, fresh["state_key"]) if isinstance(stored, list) else None
    if index is None:
        return None
    stored[index] = fresh
    return stored
