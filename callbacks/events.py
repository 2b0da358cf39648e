"""The named events the engine dispatches, and the context each check receives.

Events and what integrations map to them:

=============  ===================================================  =========================================
event          when                                                  HF Trainer / Lightning hook
=============  ===================================================  =========================================
``init``       model ready, before the first step                    on_train_begin / on_fit_start
``step``       phase ``before_optimizer``: gradients reduced, before  on_pre_optimizer_step (after clipping) /
               ``optimizer.step``; phase ``after_optimizer``          on_before_optimizer_step (before clipping);
                                                                     on_optimizer_step / on_train_batch_end
                                                                     (only when the optimizer really stepped)
``checkpoint`` a checkpoint was written (``checkpoint_dir``) or its   on_save / on_save_checkpoint
               state dict is about to be (``state_dict``)
``load``       state loaded or resumed                               on_train_begin when resumed /
                                                                     on_load_checkpoint
``merge``      adapters merged into or unmerged from base weights    Monitor.checked_merge
``end``        training finished                                     on_train_end / on_fit_end
=============  ===================================================  =========================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

EVENTS: tuple[str, ...] = ("init", "step", "checkpoint", "load", "merge", "end")

StepPhase = Literal["before_optimizer", "after_optimizer"]
STEP_PHASES: tuple[str, ...] = ("before_optimizer", "after_optimizer")


@dataclasses.dataclass
class EventContext:
    """What a check receives at an event. Checks read it and never mutate what it points to.

    Attributes:
        event: one of :data:`EVENTS`.
        model: the model as the trainer holds it (may be wrapped by DDP, compile, PEFT).
        step: 1-based index of the optimizer step the event belongs to (0 before training, the number of
            completed steps at ``checkpoint``/``end``/``load``).
        phase: for ``step`` events, ``before_optimizer`` or ``after_optimizer``.
        grads_clipped: for ``before_optimizer``: whether gradient clipping already ran (True under HF,
            False under Lightning); recorded with gradient hashes.
        optimizer: the optimizer, when the trainer exposes it.
        optimizers: every optimizer, when the trainer has several (Lightning ``trainer.optimizers``); empty
            means ``(optimizer,)``.
        trainable_schedule: who changes the trainable set on purpose, when the trainer announces it (Lightning:
            the class name of a ``BaseFinetuning`` callback such as ``BackboneFinetuning``).
        state_dict: ``checkpoint``: the dict about to be saved; ``load``: the dict about to be / just loaded.
        checkpoint_dir: ``checkpoint``/``load``: a folder or file written / read by the trainer.
        checkpoint_writer: ``checkpoint``: whether this process writes ``checkpoint_dir`` (HF: ``args.should_save``).
            A process that does not write must not judge the folder: the writer may still be writing it.
        trainer_world_size: how many processes the trainer believes it runs (HF: ``args.world_size``); None when
            it does not say. DeepSpeed on CPU leaves HF believing 1 while torch.distributed runs several.
        trainer: which integration dispatched (``hf``, ``lightning``, ``accelerate``, ``custom``).
        state_dict_revised: ``checkpoint``: ``state_dict`` is the same checkpoint's dict as edited after the
            first ``checkpoint`` event of this step (Lightning calls the LightningModule's own
            ``on_save_checkpoint`` after the callbacks'); checks report only what the first look did not.
        probe_batch: ``init``: a batch the model accepts, for checks that run the model (identity probe);
            ``None``: the check builds one from the model's config.
        grad_scaler: ``step``: the dynamic loss scaler in use (AMP), when the loop has one.
        merge_method: ``merge``: the merge method that ran (``merge_and_unload``, ``unmerge_adapter``, ...).
        merge: ``merge``: the :class:`~callbacks.checks.merge.MergeObservation` (what the model held before and
            after); ``None`` when the merge ran unobserved.
        merge_error: ``merge``: why observing the merge failed (the merge itself ran); the merge check turns
            it into CHECK_FAILED.
        extra: free-form data for custom checks; the package's own checks read only the typed fields.
        facts: the :class:`~callbacks.facts.ModelFacts` the engine established at its first event (names,
            expected ties, resolved configuration); ``None`` when a check runs without a monitor.
    """

    event: str
    model: Any
    step: int | None = None
    phase: StepPhase | None = None
    grads_clipped: bool | None = None
    optimizer: Any = None
    optimizers: tuple[Any, ...] = ()
    trainable_schedule: str | None = None
    state_dict: Mapping[str, Any] | None = None
    checkpoint_dir: str | None = None
    checkpoint_writer: bool = True
    trainer_world_size: int | None = None
    trainer: str = "custom"
    state_dict_revised: bool = False
    probe_batch: Mapping[str, Any] | None = None
    grad_scaler: Any = None
    merge_method: str | None = None
    merge: Any = None
    merge_error: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    facts: Any = None

    @property
    def all_optimizers(self) -> tuple[Any, ...]:
        """Every optimizer the trainer exposes: ``optimizers``, else ``(optimizer,)``, else none."""
        if self.optimizers:
            return tuple(self.optimizers)
        return (self.optimizer,) if self.optimizer is not None else ()

    def __post_init__(self) -> None:
        if self.event not in EVENTS:
            raise ValueError(f"unknown event {self.event!r}; events are {EVENTS}")
        if self.event == "step" and self.phase not in STEP_PHASES:
            raise ValueError(f"a step event needs phase in {STEP_PHASES}, got {self.phase!r}")
