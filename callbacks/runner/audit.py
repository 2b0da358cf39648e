"""``python -m callbacks audit CHECKPOINT [--recipe R]``: the checks on a checkpoint folder, offline.

For a run that did not use the callbacks. The model is rebuilt from configs with nothing downloaded and no
weights loaded (the checks read the files themselves): from the folder's ``config.json``, from
``adapter_config.json`` (PEFT) over a base model found locally (its ``base_model_name_or_path`` folder, or the
recipe's ``model:``), or wholly from a recipe (whose ``model.freeze`` / ``adapter.unfreeze`` say what trained).
Then the ``load`` and ``checkpoint`` events run with ``checkpoint_dir`` = the folder: tie conflicts in the
files, trainable parameters the files do not hold, unreadable files.

The folder is untrusted: its JSON files are read with size and nesting bounds and must hold objects of the
expected shape (a problem is a :class:`~callbacks.errors.RecipeError` naming the file and key: exit 2), a folder
with no weight file this package reads is refused, and an audit in which a check itself failed is refused too
(:class:`AuditIncomplete`): an audit never passes a folder it could not read.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from callbacks.errors import IntegrityError, RecipeError
from callbacks.monitor import Monitor
from callbacks.primitives.checkpoints import CheckpointReadError, list_checkpoint, read_bounded
from callbacks.recipe import IntegrityConfig

#: file names the audit reads in a checkpoint folder: PEFT adapter config, model config, HF trainer state
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"
TRAINER_STATE = "trainer_state.json"
#: config.json, adapter_config.json and trainer_state.json are kilobytes; a long run's trainer_state a few MB
MAX_JSON_BYTES = 16_000_000


class AuditIncomplete(RecipeError):
    """A check failed while auditing (``CHECK_FAILED``): the folder was not fully judged, so it is not passed.

    ``monitor`` holds the findings (the report was written before this was raised).
    """

    def __init__(self, folder: str, failed: list[Any], monitor: Monitor):
        self.monitor = monitor
        names = ", ".join(sorted({f.check or "?" for f in failed}))
        super().__init__(folder, "", f"the audit is incomplete: check(s) {names} failed ({failed[0].message}); "
                                     "the folder is not passed")


def _read_json(path: str, folder: str | None = None) -> dict[str, Any]:
    """A JSON object from ``path``: a regular file of at most :data:`MAX_JSON_BYTES`, bounded nesting."""
    try:
        raw = read_bounded(path, MAX_JSON_BYTES, folder, "JSON file")
    except CheckpointReadError as err:
        raise RecipeError(path, "", err.reason) from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise RecipeError(path, "", "JSON nests deeper than the parser's limit") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise RecipeError(path, "", f"cannot read JSON: {str(err)[:200]}") from None
    if not isinstance(data, dict):
        raise RecipeError(path, "", f"expected a JSON object, got a JSON {type(data).__name__}")
    return data


def _model_from_folder(folder: str) -> torch.nn.Module:
    """The model ``folder``'s ``config.json`` describes (class from ``architectures``), freshly initialised.

    The weights are not loaded: the checks read the files themselves, and a model built from its config holds
    the ties the config promises (loading may silently drop one, which is what the checks look for).
    """
    import transformers

    path = os.path.join(folder, MODEL_CONFIG)
    config = _read_json(path, folder)
    names = config.get("architectures") or []
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise RecipeError(path, "architectures", f"expected a list of class names, got {str(names)[:100]}")
    cls = getattr(transformers, names[0], None) if names else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise RecipeError(path, "architectures",
                          f"names no transformers model class ({str(names)[:100]}); pass --recipe to build the model")
    try:
        return cls(transformers.AutoConfig.from_pretrained(folder, local_files_only=True))
    except (RecipeError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - any hostile config value: the file and the reason, not a traceback
        raise RecipeError(path, "", f"{names[0]} cannot be built from this config "
                                    f"({type(err).__name__}: {str(err)[:300]})") from None


def build_audit_model(folder: str, recipe: str | None) -> tuple[torch.nn.Module, IntegrityConfig | None]:
    """The model the checkpoint belongs to, built from its configs (weights are not loaded)."""
    from callbacks.runner.job import build_model, load_job, set_trainable

    job, integrity = load_job(recipe) if recipe else (None, None)
    adapter_config = os.path.join(folder, ADAPTER_CONFIG)
    # lexists, not isfile: a FIFO or device named like a config is read (and refused by name), never skipped
    if not os.path.lexists(adapter_config):
        if os.path.lexists(os.path.join(folder, MODEL_CONFIG)):
            model = _model_from_folder(folder)
        elif job is not None:
            model = build_model(job.model, recipe)
        else:
            raise RecipeError(folder, "", f"holds neither {MODEL_CONFIG} nor {ADAPTER_CONFIG}; pass --recipe")
        if job is not None:
            set_trainable(model, job.model.freeze, False, recipe, "model.freeze")
        return model, integrity
    from peft import PeftConfig, get_peft_model

    if job is not None:
        base = build_model(job.model, recipe)
    else:
        base_path = _read_json(adapter_config, folder).get("base_model_name_or_path") or ""
        if not isinstance(base_path, str):
            raise RecipeError(adapter_config, "base_model_name_or_path",
                              f"expected a folder path (str), got {type(base_path).__name__}")
        if not os.path.isfile(os.path.join(base_path, MODEL_CONFIG)):
            raise RecipeError(adapter_config, "base_model_name_or_path",
                              f"{base_path!r} is not a local model folder (nothing is downloaded); pass --recipe "
                              "with the base model's model: section")
        base = _model_from_folder(base_path)
    # the adapter's structure from its config, not its weights: the checks read the files themselves, and
    # PeftModel.from_pretrained fails on some folders PEFT itself wrote (peft 0.21.2: modules_to_save naming a
    # module with children raises KeyError on load)
    _read_json(adapter_config, folder)  # bounded and an object before PEFT parses it
    try:
        config = PeftConfig.from_pretrained(folder)
        config.inference_mode = False
        model = get_peft_model(base, config)
    except Exception as err:  # noqa: BLE001 - any hostile adapter config: the file and the reason
        raise RecipeError(adapter_config, "", f"PEFT cannot build the adapter this config describes "
                                              f"({type(err).__name__}: {str(err)[:300]})") from None
    if job is not None and job.adapter is not None:
        set_trainable(model, job.adapter.unfreeze, True, recipe, "adapter.unfreeze")
    return model, integrity


def _saved_step(folder: str) -> int | None:
    path = os.path.join(folder, TRAINER_STATE)
    if not os.path.lexists(path):
        return None
    step = _read_json(path, folder).get("global_step")
    if step is not None and not (type(step) is int and 0 <= step < 2**63):
        raise RecipeError(path, "global_step", f"expected a non-negative integer, got {str(step)[:100]}")
    return step


def audit_checkpoint(folder: str, recipe: str | None = None, report: str | None = None) -> Monitor:
    """Run the ``load`` and ``checkpoint`` checks on ``folder``; returns the monitor (findings, report).

    Policy is ``log`` whatever the recipe says, so every finding of the folder is collected.
    """
    if not os.path.isdir(folder):
        raise RecipeError(folder, "", "no such checkpoint folder")
    listing = list_checkpoint(folder)
    if not listing.groups and not listing.errors:
        raise RecipeError(folder, "", "holds no weight file this audit reads (model[-*].safetensors [+ index], "
                                      "pytorch_model.bin, adapter_model.*, accelerate model_i.*, DCP .metadata, "
                                      "Lightning .ckpt): nothing to audit")
    step = _saved_step(folder)
    model, integrity = build_audit_model(folder, recipe)
    integrity = integrity or IntegrityConfig()
    # the live model is rebuilt, not the one that was saved: comparing saved values with it means nothing
    saved_state = integrity.checks.saved_state.model_copy(update={"verify_values": False})
    update: dict[str, Any] = {"policy": "log",
                              "checks": integrity.checks.model_copy(update={"saved_state": saved_state})}
    if report is not None:
        update["report"] = report
    monitor = Monitor(config=integrity.model_copy(update=update))
    try:
        for event in ("load", "checkpoint"):
            monitor.dispatch(event, model, step=step, checkpoint_dir=folder, trainer="audit")
    except IntegrityError:  # pragma: no cover - policy is log
        pass
    monitor.finish()
    failed = [f for f in monitor.findings if f.code == "CHECK_FAILED"]
    if failed and not monitor.report.errors:
        raise AuditIncomplete(folder, failed, monitor)
    return monitor
