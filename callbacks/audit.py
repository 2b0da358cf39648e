"""``python -m callbacks audit CHECKPOINT [--recipe R]``: the checks on a checkpoint folder, offline.

For a run that did not use the callbacks. The model is rebuilt from configs with nothing downloaded and no
weights loaded (the checks read the files themselves): from the folder's ``config.json``, from
``adapter_config.json`` (PEFT) over a base model found locally (its ``base_model_name_or_path`` folder, or the
recipe's ``model:``), or wholly from a recipe (whose ``model.freeze`` / ``adapter.unfreeze`` say what trained).
Then the ``load`` and ``checkpoint`` events run with ``checkpoint_dir`` = the folder: tie conflicts in the
files, trainable parameters the files do not hold, unreadable files.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from callbacks.errors import IntegrityError, RecipeError
from callbacks.monitor import Monitor
from callbacks.recipe import IntegrityConfig

ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        raise RecipeError(path, "", f"cannot read JSON: {err}") from None


def _model_from_folder(folder: str) -> torch.nn.Module:
    """The model ``folder``'s ``config.json`` describes (class from ``architectures``), freshly initialised.

    The weights are not loaded: the checks read the files themselves, and a model built from its config holds
    the ties the config promises (loading may silently drop one, which is what the checks look for).
    """
    import transformers

    config = _read_json(os.path.join(folder, MODEL_CONFIG))
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise RecipeError(os.path.join(folder, MODEL_CONFIG), "architectures",
                          f"names no transformers model class ({names!r}); pass --recipe to build the model")
    return cls(transformers.AutoConfig.from_pretrained(folder, local_files_only=True))


def build_audit_model(folder: str, recipe: str | None) -> tuple[torch.nn.Module, IntegrityConfig | None]:
    """The model the checkpoint belongs to, built from its configs (weights are not loaded)."""
    from callbacks.job import _set_trainable, build_model, load_job

    job, integrity = load_job(recipe) if recipe else (None, None)
    adapter_config = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(adapter_config):
        if os.path.isfile(os.path.join(folder, MODEL_CONFIG)):
            model = _model_from_folder(folder)
        elif job is not None:
            model = build_model(job.model, recipe)
        else:
            raise RecipeError(folder, "", f"holds neither {MODEL_CONFIG} nor {ADAPTER_CONFIG}; pass --recipe")
        if job is not None:
            _set_trainable(model, job.model.freeze, False, recipe, "model.freeze")
        return model, integrity
    from peft import PeftConfig, get_peft_model

    if job is not None:
        base = build_model(job.model, recipe)
    else:
        base_path = _read_json(adapter_config).get("base_model_name_or_path") or ""
        if not os.path.isfile(os.path.join(base_path, MODEL_CONFIG)):
            raise RecipeError(adapter_config, "base_model_name_or_path",
                              f"{base_path!r} is not a local model folder (nothing is downloaded); pass --recipe "
                              "with the base model's model: section")
        base = _model_from_folder(base_path)
    # the adapter's structure from its config, not its weights: the checks read the files themselves, and
    # PeftModel.from_pretrained fails on some folders PEFT itself wrote (peft 0.21.2: modules_to_save naming a
    # module with children raises KeyError on load)
    config = PeftConfig.from_pretrained(folder)
    config.inference_mode = False
    model = get_peft_model(base, config)
    if job is not None and job.adapter is not None:
        _set_trainable(model, job.adapter.unfreeze, True, recipe, "adapter.unfreeze")
    return model, integrity


def _saved_step(folder: str) -> int | None:
    path = os.path.join(folder, "trainer_state.json")
    if os.path.isfile(path):
        step = _read_json(path).get("global_step")
        return int(step) if isinstance(step, int) else None
    return None


def audit_checkpoint(folder: str, recipe: str | None = None, report: str | None = None) -> Monitor:
    """Run the ``load`` and ``checkpoint`` checks on ``folder``; returns the monitor (findings, report).

    Policy is ``log`` whatever the recipe says, so every finding of the folder is collected.
    """
    if not os.path.isdir(folder):
        raise RecipeError(folder, "", "no such checkpoint folder")
    model, integrity = build_audit_model(folder, recipe)
    integrity = integrity or IntegrityConfig()
    # the live model is rebuilt, not the one that was saved: comparing saved values with it means nothing
    saved_state = integrity.checks.saved_state.model_copy(update={"verify_values": False})
    update: dict[str, Any] = {"policy": "log",
                              "checks": integrity.checks.model_copy(update={"saved_state": saved_state})}
    if report is not None:
        update["report"] = report
    monitor = Monitor(config=integrity.model_copy(update=update))
    step = _saved_step(folder)
    try:
        for event in ("load", "checkpoint"):
            monitor.dispatch(event, model, step=step, checkpoint_dir=folder, trainer="audit")
    except IntegrityError:  # pragma: no cover - policy is log
        pass
    monitor.finish()
    return monitor
