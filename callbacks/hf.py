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

import os
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from callbacks.integration import MonitorOwner
from callbacks.metrics import finding_metrics

PREFIX_CHECKPOINT_DIR = "checkpoint"


class IntegrityCallback(MonitorOwner, TrainerCallback, ExportableState):
    """Runs the integrity checks inside ``transformers.Trainer``.

    ``Trainer(..., callbacks=[IntegrityCallback()])``; the arguments are :class:`~callbacks.integration.
    MonitorOwner`'s (``policy``, ``declare_ties``, ``checks``, ``report``). The monitor's state is exported
    with checkpoints (``trainer_state.json``, ``stateful_callbacks``) and read back when training resumes.
    """

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs: Any):
        """Resumed state is in place here: run ``load`` checks on the resumed checkpoint, then ``init``."""
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
        self.monitor.dispatch("checkpoint", model, step=state.global_step, checkpoint_dir=checkpoint_dir,
                              optimizer=optimizer, trainer="hf")

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs: Any):
        """Training finished: last checks, summary table and report."""
        self.monitor.dispatch("end", model, step=state.global_step, optimizer=optimizer, trainer="hf")

    def on_log(self, args, state, control, logs=None, **kwargs: Any):
        """Finding counts per code join the logs HF hands to the reporters after this callback (TensorBoard,
        W&B, ...); HF puts its reporters first, so place this callback before them to have the counts plotted."""
        if logs is not None:
            logs.update(finding_metrics(self.monitor.findings))

    # -- state with checkpoints (transformers' ExportableState protocol) --------------------------------------
    def state(self) -> dict[str, Any]:
        """What HF writes into ``trainer_state.json`` with each checkpoint (JSON data)."""
        return {"args": {}, "attributes": {"monitor_state": self.monitor.state_dict()}}

    def _restore(self, state) -> None:
        if isinstance(state.stateful_callbacks, dict):
            # a checkpoint written without this callback has no entry for it, and HF's next save indexes it
            state.stateful_callbacks.setdefault(type(self).__name__, self.state())
        stored = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(stored, list):
            stored = stored[0] if stored else None
        if stored and not self.monitor.findings:
            self.monitor.load_state_dict(stored.get("attributes", {}).get("monitor_state", {}))
