"""Saved-state coverage: every trainable parameter reaches the checkpoint, proven from what was written.

- ``init``: what *will* be saved (PEFT: ``get_peft_model_state_dict`` per adapter; otherwise the model's own
  ``state_dict``) against every parameter with ``requires_grad=True`` -> ``UNSAVED_TRAINABLE`` before training.
- ``checkpoint`` with ``checkpoint_dir``: the keys of the files on disk (headers and metadata only, see
  :mod:`callbacks.primitives.checkpoints`) -> ``UNSAVED_TRAINABLE``; unreadable files -> ``CHECKPOINT_UNREADABLE``.
- ``checkpoint`` with ``state_dict`` (Lightning ``on_save_checkpoint``): the dict's keys; with
  ``state_dict_revised`` (the integration's second look after the LightningModule's own hook edited the dict),
  only the names the first look did not report.
- ``verify_values``: each saved tensor equals the live parameter (cast to the saved dtype), by hash ->
  ``SAVED_VALUE_MISMATCH``.

Key <-> name mapping lives in :mod:`callbacks.primitives.saved_names`. A trainable tensor counts as saved when
any of its names (tied aliases included) is saved, or when an expected tie partner is saved and the two live
tensors share storage or are bitwise equal (the tie that ``save_pretrained``/safetensors drops on purpose).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import nn

from callbacks.checks.base import Check, CheckConfig
from callbacks.events import EventContext
from callbacks.facts import DeclaredNames
from callbacks.findings import Finding
from callbacks.primitives.checkpoints import (
    ZERO_WEIGHTS_HINT,
    CheckpointListing,
    CheckpointReadError,
    list_checkpoint,
    read_tensors,
)
from callbacks.primitives.collectives import distributed_rank, distributed_world
from callbacks.primitives.naming import find_peft_model, named_parameters_all, storage_key
from callbacks.primitives.saved_names import (
    MODULES_TO_SAVE,
    SavedIndex,
    SavedKey,
    adapter_names,
    live_key,
    owner_module,
    saved_name,
)
from callbacks.primitives.tiemap import ExpectedTie
from callbacks.primitives.values import bitwise_equal
from callbacks.primitives.zero import any_partitioned, true_shape


class SavedStateConfig(CheckConfig):
    """Recipe section checks.saved_state: what the saved checkpoint must hold."""

    verify_values: bool = Field(False, description="also hash each saved tensor against the live one")


def judges_checkpoint_folder(ctx: EventContext, path: str) -> bool:
    """Whether this process's verdict on the checkpoint folder is the job's: it writes the folder.

    Trainers fire their save hook on every rank but only the writer writes: another rank would read a folder that
    may be half-written (or absent from its own disk). Where the trainer believes it runs alone while
    torch.distributed runs several ranks (DeepSpeed on CPU under HF: every rank then writes into the same folder),
    rank facts come from torch.distributed and only rank 0 judges.
    """
    rank, world = distributed_rank(), distributed_world()[1]
    if not ctx.checkpoint_writer:
        return False
    if ctx.trainer_world_size is not None and ctx.trainer_world_size <= 1 < world:
        return rank == 0
    return os.path.exists(path) or rank == 0


# -- live parameters ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class LiveParam:
    """A live parameter under one of its names: raw (as the model names it), user name, saved key, tensor."""

    raw: str
    name: str
    key: SavedKey
    tensor: torch.Tensor


def live_params(model: nn.Module, adapters: Sequence[str] = ()) -> list[LiveParam]:
    """Every parameter under every name (tied duplicates included) with its (adapter tag, saved name)."""
    return [LiveParam(raw=raw, name=name, key=live_key(raw, adapters), tensor=param)
            for raw, name, param in named_parameters_all(model)]


@dataclasses.dataclass
class TrainableTensor:
    """One trainable tensor: its user names (aliases included, first = the name reported) and saved keys."""

    names: tuple[str, ...]
    keys: tuple[SavedKey, ...]
    tensor: torch.Tensor

    @property
    def name(self) -> str:
        """The name findings report."""
        return self.names[0]


def trainable_tensors(params: Iterable[LiveParam]) -> list[TrainableTensor]:
    """Every tensor with ``requires_grad=True``, once per storage, with all the names it is registered under."""
    by_storage: dict[Any, tuple[list[str], list[SavedKey], torch.Tensor]] = {}
    for item in params:
        if not item.tensor.requires_grad:
            continue
        names, keys, _ = by_storage.setdefault(storage_key(item.tensor), ([], [], item.tensor))
        if item.name not in names:
            names.append(item.name)
        if item.key not in keys:
            keys.append(item.key)
    return [TrainableTensor(tuple(n), tuple(k), t) for n, k, t in by_storage.values()]


def expected_partners(ties: Iterable[ExpectedTie], adapters: Sequence[str] = ()) -> dict[str, set[str]]:
    """Saved name -> saved names it is expected to be tied to (config and declared ties of the registry)."""
    out: dict[str, set[str]] = {}
    for tie in ties:
        names = {saved_name(n, adapters) for n in tie.names}
        for name in names:
            out.setdefault(name, set()).update(names - {name})
    return out


@dataclasses.dataclass
class Unsaved:
    """A trainable tensor absent from the saved state; ``tie_partner`` set when a tie dropped it wrongly."""

    tensor: TrainableTensor
    tie_partner: str | None = None


def unsaved_trainables(trainables: Iterable[TrainableTensor], saved: SavedIndex,
                       live: Mapping[SavedKey, LiveParam], partners: Mapping[str, set[str]]) -> list[Unsaved]:
    """Trainable tensors none of whose saved keys is in the checkpoint.

    A tensor dropped as the tied duplicate of a saved partner counts as saved only if the live tensors share
    storage or are bitwise equal now (at save time); otherwise it is reported with that partner.
    """
    out = []
    for item in trainables:
        if any(saved.lookup(key) is not None for key in item.keys):
            continue
        partner_saved = sorted({(tag, p) for tag, name in item.keys for p in partners.get(name, ())
                                if saved.lookup((tag, p)) is not None})
        partner_ok = False
        for partner in partner_saved:
            other = live.get(partner)
            if other is not None and (storage_key(other.tensor) == storage_key(item.tensor)
                                      or bitwise_equal(other.tensor, item.tensor)):
                partner_ok = True
                break
        if not partner_ok:
            out.append(Unsaved(item, partner_saved[0][1] if partner_saved else None))
    return out


# -- what will be saved ---------------------------------------------------------------------------------------
def keys_to_be_saved(model: nn.Module) -> tuple[dict[str, list[str]], str]:
    """Keys the framework will save for ``model`` (group -> keys), and where they came from.

    PEFT: ``get_peft_model_state_dict`` for every adapter, grouped by adapter name (what ``save_pretrained``
    writes, without adapter names in the keys); otherwise the model's own ``state_dict()`` (hooks
    included; it returns references, no copies).
    """
    peft_model = find_peft_model(model)
    if peft_model is not None:
        from peft import get_peft_model_state_dict

        groups: dict[str, list[str]] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT warns about config lookups for save_embedding_layers
            for adapter in peft_model.peft_config:
                groups.setdefault(adapter, []).extend(get_peft_model_state_dict(peft_model, adapter_name=adapter))
        return groups, "PEFT's get_peft_model_state_dict (what save_pretrained writes)"
    return {"": list(model.state_dict().keys())}, "the model's state_dict()"


# -- fixes ----------------------------------------------------------------------------------------------------
def _input_embedding_weight(model: Any) -> torch.Tensor | None:
    for candidate in (find_peft_model(model), model):
        getter = getattr(candidate, "get_input_embeddings", None)
        if callable(getter):
            try:
                return getattr(getter(), "weight", None)
            except (NotImplementedError, AttributeError):
                return None
    return None


def adapter_names_in_path(adapters: Iterable[str], name: str) -> list[str]:
    """Adapter names other than ``name``'s own that are also module names on its path (``mlp`` for
    ``h.0.mlp.c_fc.lora_A.default.weight``): the tensor's own adapter is the last adapter name on the path."""
    segments = name.split(".")
    found = [i for i, segment in enumerate(segments) if segment in set(adapters)]
    return sorted({segments[i] for i in found[:-1]} - {segments[found[-1]]}) if len(found) > 1 else []


def fix_hint(model: Any, missing: Unsaved, framework: str) -> str:
    """The concrete fix for one unsaved trainable tensor under ``framework``."""
    name = missing.tensor.name
    module, attr = owner_module(name)
    if missing.tie_partner is not None:
        return (f"{name!r} was left out as the tied duplicate of {missing.tie_partner!r}, but the live tensors are "
                "separate and differ, so reloading gives it the partner's value: re-tie them before saving "
                "(model.tie_weights()), or set tie_word_embeddings=False in the config so both are saved")
    if framework == "peft":
        peft_model = find_peft_model(model)
        listed = [entry for config in getattr(peft_model, "peft_config", {}).values()
                  for entry in (getattr(config, "modules_to_save", None) or [])]
        clashes = adapter_names_in_path(getattr(peft_model, "peft_config", {}), name)
        if clashes:
            other = clashes[0]
            return (f"another adapter of the model is named {other!r}, like a module on this tensor's path: PEFT's "
                    f"get_peft_model_state_dict drops every key containing '.{other}.' from the other adapters' "
                    f"files, as it filters adapters by name (PEFT issue 3584), so {name!r} never reaches the file: "
                    "rename that adapter (add_adapter / load_adapter with a name that is no module name, e.g. "
                    f"'{other}_adapter'), or delete it before saving")
        embedding = _input_embedding_weight(model)
        if embedding is not None and embedding is missing.tensor.tensor:
            return (f"PEFT saves only adapters and modules_to_save: for new token rows add "
                    f"trainable_token_indices={{'{module.rsplit('.', 1)[-1]}': [new ids]}} to "
                    f"the PEFT config (saves just those rows), or modules_to_save=['{module}'] for the whole "
                    "embedding, or save_pretrained(..., save_embedding_layers=True)")
        note = ""
        if attr in listed:
            note = (f" (your modules_to_save entry {attr!r} names a Parameter, not a module, so it matched "
                    "nothing)")
        where = f"add the module that holds it, {module!r}, to modules_to_save" if module else \
            "save it explicitly"
        return (f"PEFT saves only adapters and modules_to_save, which match modules, not Parameters{note}: "
                f"{where} in the PEFT config, or save the tensor explicitly next to the adapter "
                f"(e.g. safetensors.torch.save_file({{'{name}': t}}, ...)) and load it back; or freeze it if it "
                "should not train")
    if framework == "lightning":
        return (f"the LightningModule's state_dict() or on_save_checkpoint() override dropped {name!r}: keep every "
                "parameter with requires_grad=True (filter on requires_grad, not on names), or freeze it if it "
                "should not train")
    if framework == "accelerate":
        return (f"accelerator.save_state() saves unwrap_model(model).state_dict(), which lacks {name!r}: remove "
                "the state_dict hook/override that drops it, or save it with accelerator.register_for_"
                "checkpointing(...)")
    return (f"the model's state_dict() does not return {name!r} (a state_dict hook or override, "
            "_keys_to_ignore_on_save, or a tensor that is not a registered parameter of the saved module): remove "
            "what drops it, or freeze it if it should not train")


def framework_of(model: Any, trainer: str) -> str:
    """``peft`` for PEFT models (whatever the trainer), else the integration's name."""
    return "peft" if find_peft_model(model) is not None and trainer != "lightning" else trainer


# -- values ---------------------------------------------------------------------------------------------------
def _digests(tensors: list[torch.Tensor]) -> list[int]:
    """Per-tensor 64-bit hashes (:func:`callbacks.hashing.hash_tensors`; equal bytes hash equal on any device)."""
    from callbacks.hashing import hash_tensors

    return list(hash_tensors([t.detach() for t in tensors], backend="auto"))


def value_mismatches(pairs: Sequence[tuple[str, torch.Tensor, torch.Tensor]]) -> list[tuple[str, str]]:
    """``(name, why)`` for each ``(name, saved, live)`` whose saved tensor differs from the live one.

    The live tensor is cast to the saved dtype first (a bf16 save of fp32 weights is not a mismatch).
    """
    out, saved_list, live_list, names = [], [], [], []
    for name, saved, live in pairs:
        if tuple(saved.shape) != tuple(live.shape):
            out.append((name, f"saved shape {tuple(saved.shape)} != live shape {tuple(live.shape)}"))
            continue
        if live.device.type == "meta":
            continue
        names.append(name)
        saved_list.append(saved)
        live_list.append(live.detach().to(saved.dtype))
    if names:
        for name, a, b in zip(names, _digests(saved_list), _digests(live_list), strict=True):
            if a != b:
                out.append((name, "saved bytes differ from the live parameter's (after the cast to the saved "
                                  "dtype)"))
    return out


# -- matching a checkpoint to the model ----------------------------------------------------------------------
@dataclasses.dataclass
class SavedMatch:
    """A checkpoint's keys (``saved``) next to the live model's parameters (``params``, ``live`` by saved key)."""

    adapters: tuple[str, ...]
    params: list[LiveParam]
    live: dict[SavedKey, LiveParam]
    saved: SavedIndex


def match_checkpoint(model: nn.Module, groups: Mapping[str, Iterable[str]]) -> SavedMatch:
    """Match a checkpoint's keys (group -> keys) to ``model``'s parameters."""
    adapters = adapter_names(model)
    params = live_params(model, adapters)
    live: dict[SavedKey, LiveParam] = {}
    for item in params:
        live.setdefault(item.key, item)
    saved = SavedIndex(groups, {name for _, name in live}, adapters)
    return SavedMatch(adapters=adapters, params=params, live=live, saved=saved)


def _read_group_tensors(listing: CheckpointListing) -> dict[tuple[str, str], torch.Tensor]:
    """(group, key) -> tensor for every tensor of the listing (file by file; DCP folders are not read)."""
    out: dict[tuple[str, str], torch.Tensor] = {}
    for group, entries in listing.groups.items():
        by_file: dict[str, list[str]] = {}
        for key, entry in entries.items():
            by_file.setdefault(entry.file, []).append(key)
        for file, keys in by_file.items():
            if os.path.basename(file) == ".metadata":
                continue
            for key, value in read_tensors(file, keys).items():
                out[(group, key)] = value
    return out


# -- the check ------------------------------------------------------------------------------------------------
class SavedStateCheck(Check):
    """UNSAVED_TRAINABLE, SAVED_VALUE_MISMATCH and CHECKPOINT_UNREADABLE."""

    name = "saved_state"
    Config = SavedStateConfig

    def __init__(self, config: SavedStateConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        #: names reported UNSAVED_TRAINABLE at the last look at a state dict (a revised look reports the rest)
        self._reported_at_save: set[str] = set()
        #: per checkpoint: {"step", "source", "files", "trainable", "saved", "unsaved"} (for the report)
        self.history: list[dict[str, Any]] = []

    # -- events -----------------------------------------------------------------------------------------------
    def on_init(self, ctx: EventContext) -> Iterable[Finding]:
        model = ctx.model
        groups, source = keys_to_be_saved(model)
        return self._coverage(ctx, groups, source=source, files=[], framework=framework_of(model, ctx.trainer),
                              when="will be saved")

    def on_checkpoint(self, ctx: EventContext) -> Iterable[Finding]:
        framework = framework_of(ctx.model, ctx.trainer)
        findings: list[Finding] = []
        if ctx.state_dict is not None and ctx.state_dict_revised:
            keys = [k for k, v in ctx.state_dict.items() if isinstance(v, torch.Tensor)]
            unsaved = self._coverage(ctx, {"": keys}, source="the checkpoint's state_dict after "
                                     "on_save_checkpoint", files=[], framework=framework, when="was saved")
            findings.extend(f for f in unsaved if not set(f.params) <= self._reported_at_save)
        elif ctx.state_dict is not None:
            source = "the checkpoint's state_dict"
            state = ctx.state_dict
            keys = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
            unsaved = self._coverage(ctx, {"": keys}, source=source, files=[], framework=framework,
                                     when="is saved")
            findings.extend(unsaved)
            if self.config.verify_values:
                unverifiable = self._values_unverifiable(ctx, [])
                findings.extend(unverifiable if unverifiable is not None else self._verify(
                    ctx, {"": keys}, lambda group, key: state.get(key), source=source, files=[]))
            self._reported_at_save = {n for f in unsaved for n in f.params}
        if ctx.checkpoint_dir:
            findings.extend(self._check_files(ctx, ctx.checkpoint_dir, framework))
        return findings

    # -- logic ------------------------------------------------------------------------------------------------
    def _check_files(self, ctx: EventContext, path: str, framework: str) -> list[Finding]:
        if not judges_checkpoint_folder(ctx, path):
            return []
        listing = list_checkpoint(path)
        if listing.errors:
            return [self._unreadable(ctx, err, listing) for err in listing.errors]
        if not listing.groups:
            return [self.finding(
                "CHECKPOINT_UNREADABLE", ctx, severity="warning",
                message=f"{path} holds no weight files this check can read (model[.safetensors|-*.safetensors + "
                        "index], pytorch_model.bin, adapter_model.*, accelerate model_i.*, DCP .metadata, .ckpt, "
                        "DeepSpeed 'latest' + <tag>/*model_states.pt)",
                hint="point checkpoint_dir at the folder or file the trainer wrote; formats this check does not "
                     "read (GGUF, ...) cannot be proven complete",
                file=path, reason="no weight files")]
        groups = {group: list(entries) for group, entries in listing.groups.items()}
        findings = self._coverage(ctx, groups, source=path, files=listing.files, framework=framework,
                                  when="was written")
        if "deepspeed" in listing.formats:  # complete for DeepSpeed, but no consolidated weights to load
            self.history[-1]["note"] = ZERO_WEIGHTS_HINT
        if self.config.verify_values:
            unverifiable = self._values_unverifiable(ctx, listing.formats)
            if unverifiable is not None:
                return [*findings, *unverifiable]
            try:
                values = _read_group_tensors(listing)
            except CheckpointReadError as err:
                return [*findings, self._unreadable(ctx, err, listing)]
            findings.extend(self._verify(ctx, groups, lambda group, key: values.get((group, key)), source=path,
                                         files=listing.files))
        return findings

    def _unreadable(self, ctx: EventContext, err: CheckpointReadError, listing: CheckpointListing) -> Finding:
        return self.finding(
            "CHECKPOINT_UNREADABLE", ctx,
            message=f"cannot read checkpoint file {err.path}: {err.reason}; whether every trainable parameter "
                    "was saved cannot be proven",
            hint=err.hint or ("the file is truncated or corrupt (a disk filled up, a copy or upload was cut, two "
                              "writers raced): write the checkpoint again and check free disk space before "
                              "relying on it"),
            file=err.path, reason=err.reason, files=listing.files, checkpoint=listing.path)

    def _coverage(self, ctx: EventContext, groups: Mapping[str, Sequence[str]], *, source: str, files: list[str],
                  framework: str, when: str) -> list[Finding]:
        model = ctx.model
        match = match_checkpoint(model, groups)
        partners = expected_partners(self.facts_of(ctx).declared_ties(), match.adapters)
        trainables = trainable_tensors(match.params)
        unsaved = unsaved_trainables(trainables, match.saved, match.live, partners)
        self.history.append({"event": ctx.event, "step": ctx.step, "source": source, "files": list(files),
                             "trainable": len(trainables), "keys": sum(len(k) for k in groups.values()),
                             "prefixes": match.saved.prefixes, "unsaved": [u.tensor.name for u in unsaved]})
        findings = []
        for item in unsaved:
            t = item.tensor
            what = (f"{source} ({', '.join(os.path.basename(f) for f in files)})" if files else source)
            why = (f", left out as the tied duplicate of {item.tie_partner!r} although the live tensors differ"
                   if item.tie_partner else "")
            findings.append(self.finding(
                "UNSAVED_TRAINABLE", ctx, params=(t.name,),
                message=f"{t.name} (shape {true_shape(t.tensor)}, requires_grad=True) is trained but not in what "
                        f"{when}: {what}{why}; {len(trainables)} trainable tensors, {len(trainables) - len(unsaved)}"
                        " saved",
                hint=fix_hint(model, item, framework),
                files=list(files), source=source, aliases=list(t.names), tie_partner=item.tie_partner,
                framework=framework))
        return findings

    def _values_unverifiable(self, ctx: EventContext, formats: Sequence[str]) -> list[Finding] | None:
        """``verify_values`` cannot compare anything when the live parameters are ZeRO-3 placeholders or the
        values are in DeepSpeed's partitioned shards: one CHECK_NOT_APPLICABLE for the run (then ``[]``), or
        None when values can be compared."""
        if any_partitioned(ctx.model.parameters()):
            why = "the live parameters are DeepSpeed ZeRO-3 placeholders (each rank holds a shard)"
        elif "deepspeed" in formats:
            why = "the saved values are in DeepSpeed's partitioned shards, which are listed, not read"
        else:
            return None
        return self.not_applicable_once(ctx, "values", f"saved values not verified (verify_values): {why}",
                                        "nothing to fix; which tensors were saved is still checked. "
                                        + ZERO_WEIGHTS_HINT)

    def _verify(self, ctx: EventContext, groups: Mapping[str, Sequence[str]],
                value_of: Callable[[str, str], Any], *, source: str, files: Sequence[str]) -> list[Finding]:
        match = match_checkpoint(ctx.model, groups)
        pairs = []
        for key, item in match.live.items():
            found = match.saved.lookup(key)
            saved = value_of(*found) if found is not None else None
            if isinstance(saved, torch.Tensor):
                pairs.append((item.name, saved, item.tensor))
        return [self.finding(
            "SAVED_VALUE_MISMATCH", ctx, params=(name,),
            message=f"{name}: {why} in {source}",
            hint="something changed the tensor between the save and now, or the save wrote a stale copy (a state "
                 "dict built before the last step, an EMA or offloaded copy): save from the live model after the "
                 "optimizer step",
            files=list(files), source=source)
            for name, why in value_mismatches(pairs)]

    def report_section(self) -> dict[str, Any] | None:
        return {"coverage": self.history} if self.history else None

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state.get("history", [])]


def check_checkpoint(model: nn.Module, path: str, *, step: int | None = None, verify_values: bool = False,
                     trainer: str = "custom", declare_ties: Sequence[Sequence[str]] = ()) -> list[Finding]:
    """Findings for one checkpoint on disk (any format of :mod:`callbacks.primitives.checkpoints`) against
    ``model``, without a Monitor: for ``.ckpt`` files, ``accelerate`` ``save_state`` folders and DCP folders
    written outside a supported trainer. ``trainer`` picks the fix wording (``lightning``, ``accelerate``,
    ``hf``, ``custom``)."""
    from callbacks.facts import establish_facts

    facts = establish_facts(model, [DeclaredNames("declare_ties", tuple(g)) for g in declare_ties])
    check = SavedStateCheck(SavedStateConfig(verify_values=verify_values))
    return check.run(EventContext(event="checkpoint", model=model, step=step, checkpoint_dir=path, trainer=trainer,
                                  facts=facts))


__all__ = ["SavedStateCheck", "SavedStateConfig", "check_checkpoint", "keys_to_be_saved", "trainable_tensors",
           "unsaved_trainables", "value_mismatches", "MODULES_TO_SAVE"]
