"""Adapter discovery: every adapter in a model, as units of (adapter name, layer, parameters by role, config).

Three sources, none imported unless the model already uses it:

* PEFT tuner layers (``BaseTunerLayer``: LoRA and DoRA, AdaLoRA, IA3, LoHa, LoKr, VeRA, OFT, BOFT, ...). The
  adapter's config is the ``peft_config`` dict that PEFT keeps on the ``PeftModel``, the tuner model, or the
  transformers model (``add_adapter``).
* The ``adapters`` library (successor of adapter-transformers): bottleneck ``Adapter`` modules, its ``LoRA`` and
  ``IA3`` modules and prefix tuning. The config is the model's ``adapters_config``.
* Hand-written adapters: modules matched by name patterns (``fnmatch`` on user names) with a declared role.

A unit is one adapter (one adapter name) at one layer. Discovery reads module structure and parameter
identities only; it never touches values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from callbacks.primitives.naming import user_name

#: roles a hand-written adapter module can be declared with, and the aliases accepted for them
CUSTOM_ROLES: dict[str, str] = {
    "zero": "zero", "up": "zero", "lora_b": "zero", "b": "zero",
    "random": "random", "down": "random", "lora_a": "random", "a": "random",
    "norm": "norm", "layernorm": "norm", "ln": "norm",
    "ones": "ones", "scale": "ones", "ia3": "ones",
    "any": "any",
}

#: PEFT classes that live in tuner packages but are not adapters whose init we judge
PEFT_SKIPPED_METHODS = frozenset({"trainable_tokens"})


@dataclasses.dataclass
class AdapterPart:
    """One parameter of an adapter unit.

    Attributes:
        role: what the parameter is for its method (``lora_A``, ``lora_B.bias``, ``up.weight``, ``ia3_l``...).
        name: the parameter's user name.
        raw_name: the name under the model passed to discovery (for fetching it again).
        param: the parameter itself.
    """

    role: str
    name: str
    raw_name: str
    param: nn.Parameter


@dataclasses.dataclass
class AdapterUnit:
    """One adapter (one adapter name) at one layer.

    Attributes:
        library: ``peft``, ``adapters`` or ``custom``.
        method: ``lora``, ``adalora``, ``ia3``, ``loha``, ``lokr``, ``vera``, ``oft``, ``boft``, ...
            (PEFT), ``bottleneck``, ``lora``, ``ia3``, ``vera``, ``prefix`` (adapters), ``custom``.
        adapter: the adapter's name (``default`` for PEFT's first adapter).
        layer: user name of the module holding the adapter.
        module: that module.
        parts: the adapter's parameters by role.
        config: the adapter's own config object (``LoraConfig``, ``BnConfig``...) or, for hand-written
            adapters, ``{"roles": {...}}``; ``None`` when the config cannot be found.
        active: whether the adapter takes part in the forward pass now.
        base: the module the adapter modifies (PEFT's ``base_layer``, the ``adapters`` host module), if known.
        kind: ``linear``, ``embedding``, ``conv`` or ``other`` (what the base layer is).
        dora: PEFT LoRA with ``use_dora`` for this adapter.
    """

    library: str
    method: str
    adapter: str
    layer: str
    module: nn.Module
    parts: list[AdapterPart]
    config: Any
    active: bool
    base: nn.Module | None = None
    kind: str = "other"
    dora: bool = False

    def part(self, role: str) -> AdapterPart | None:
        """The part with ``role``, if present."""
        return next((p for p in self.parts if p.role == role), None)


def _is_peft_tuner_layer(module: nn.Module) -> bool:
    peft = sys.modules.get("peft")
    if peft is None:
        return False
    tuners_utils = sys.modules.get("peft.tuners.tuners_utils")
    base = getattr(tuners_utils, "BaseTunerLayer", None)
    return base is not None and isinstance(module, base)


def find_peft_configs(model: nn.Module) -> dict[str, Any]:
    """PEFT's ``{adapter name: config}`` from the first module that carries a ``peft_config`` dict."""
    for module in _self_and_modules(model):
        configs = getattr(module, "peft_config", None)
        if isinstance(configs, Mapping) and configs:
            return dict(configs)
    return {}


def _self_and_modules(model: Any) -> Iterator[Any]:
    yield model
    if isinstance(model, nn.Module):
        yield from model.modules()


def find_adapters_config(model: nn.Module) -> Any:
    """The ``adapters`` library's ``ModelAdaptersConfig`` of the model (``None`` if it has none)."""
    for module in _self_and_modules(model):
        config = getattr(module, "adapters_config", None)
        if config is not None and hasattr(config, "get") and hasattr(config, "adapters"):
            return config
    return None


def _peft_method(module: nn.Module, config: Any) -> str:
    peft_type = getattr(config, "peft_type", None)
    if peft_type is not None:
        return str(getattr(peft_type, "value", peft_type)).lower()
    # no config: the tuner package the layer class comes from (peft.tuners.<method>.layer)
    parts = type(module).__module__.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "tuners" else type(module).__name__.lower()


def _base_kind(base: nn.Module | None) -> str:
    if isinstance(base, nn.Embedding):
        return "embedding"
    if isinstance(base, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(base, nn.Linear) or type(base).__name__ == "Conv1D":  # GPT-2's Conv1D is a linear layer
        return "linear"
    return "other"


def _join(*names: str) -> str:
    return ".".join(n for n in names if n)


def _peft_prompt_units(modules: Mapping[str, nn.Module], configs: Mapping[str, Any]) -> list[AdapterUnit]:
    """PEFT prompt learning (prompt / prefix / p-tuning): the ``prompt_encoder`` of a ``PeftModel``."""
    units = []
    for raw_owner, owner in modules.items():
        encoders = owner.__dict__.get("_modules", {}).get("prompt_encoder")
        if not isinstance(encoders, nn.ModuleDict) or not isinstance(getattr(owner, "peft_config", None), Mapping):
            continue
        active = getattr(owner, "active_adapter", None)
        for adapter, encoder in encoders.items():
            raw_layer = _join(raw_owner, "prompt_encoder", adapter)
            parts = [AdapterPart(pname, user_name(_join(raw_layer, pname)), _join(raw_layer, pname), p)
                     for pname, p in encoder.named_parameters()]
            config = configs.get(adapter)
            units.append(AdapterUnit(
                library="peft", method=_peft_method(encoder, config), adapter=adapter, layer=user_name(raw_layer),
                module=encoder, parts=parts, config=config, active=adapter == active, base=None))
    return units


def _peft_units(model: nn.Module, modules: Mapping[str, nn.Module]) -> list[AdapterUnit]:
    if "peft" not in sys.modules:
        return []
    configs = find_peft_configs(model)
    units = _peft_prompt_units(modules, configs) if configs else []
    tuner_layers = [(raw, m) for raw, m in modules.items() if _is_peft_tuner_layer(m)]
    for raw_layer, module in tuner_layers:
        active_names = set(getattr(module, "active_adapters", []) or [])
        disabled = bool(getattr(module, "disable_adapters", False))
        by_adapter: dict[str, list[AdapterPart]] = {}
        for attr in getattr(module, "adapter_layer_names", ()):
            container = getattr(module, attr, None)
            if container is None or not hasattr(container, "keys"):
                continue
            for adapter in list(container.keys()):
                value = container[adapter]
                if isinstance(value, nn.Parameter):
                    raw = _join(raw_layer, attr, adapter)
                    by_adapter.setdefault(adapter, []).append(AdapterPart(attr, user_name(raw), raw, value))
                elif isinstance(value, nn.Module):
                    for sub, param in value.named_parameters():
                        raw = _join(raw_layer, attr, adapter, sub)
                        role = attr if sub == "weight" else f"{attr}.{sub}"
                        by_adapter.setdefault(adapter, []).append(AdapterPart(role, user_name(raw), raw, param))
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else None
        for adapter, parts in by_adapter.items():
            config = configs.get(adapter)
            method = _peft_method(module, config)
            if method in PEFT_SKIPPED_METHODS:
                continue
            use_dora = getattr(module, "use_dora", {})
            units.append(AdapterUnit(
                library="peft", method=method, adapter=adapter, layer=user_name(raw_layer), module=module,
                parts=parts, config=config, active=adapter in active_names and not disabled, base=base,
                kind=_base_kind(base), dora=bool(use_dora.get(adapter, False)) if isinstance(use_dora, dict)
                else False))
    return units


def _adapters_lib_kind(module: nn.Module) -> str | None:
    """Which ``adapters`` library module class this is (``bottleneck``, ``lora``, ``ia3``, ``vera``, ``prefix``)."""
    cls = type(module)
    if not cls.__module__.startswith("adapters.methods"):
        return None
    names = {c.__name__ for c in cls.__mro__}
    if "Adapter" in names and hasattr(module, "adapter_up"):
        return "bottleneck"
    for class_name, kind in (("LoRA", "lora"), ("IA3", "ia3"), ("Vera", "vera"), ("PrefixTuning", "prefix"),
                             ("FlatPrefixTuning", "prefix")):
        if class_name in names:
            return kind
    return None


def _adapters_lib_config(root_config: Any, adapter: str, kind: str, module: nn.Module) -> Any:
    """The config of this adapter for this kind of module (a ConfigUnion is searched for the matching part)."""
    if root_config is None:
        return None
    config = root_config.get(adapter)
    if config is None:
        return None
    children = list(getattr(config, "configs", None) or [config])
    wanted = {"bottleneck": "BnConfig", "lora": "LoRAConfig", "ia3": "LoRAConfig", "vera": "LoRAConfig",
              "prefix": "PrefixTuningConfig"}[kind]
    matches = [c for c in children if wanted in {k.__name__ for k in type(c).__mro__}]
    if kind == "bottleneck" and len(matches) > 1:
        flags = (bool(getattr(module, "add_layer_norm_before", False)), bool(getattr(module, "add_layer_norm_after",
                                                                                     False)))
        matches = [c for c in matches if (bool(c["ln_before"]), bool(c["ln_after"])) == flags] or matches
    return matches[0] if matches else None


def _active_adapters_lib(root_config: Any) -> set[str]:
    setup = getattr(root_config, "active_setup", None)
    if setup is None:
        return set()
    flatten = getattr(setup, "flatten", None)
    return set(flatten()) if callable(flatten) else {str(setup)}


def _bottleneck_roles(module: nn.Module) -> dict[int, str]:
    """param id -> role for a bottleneck ``Adapter`` (the LayerNorm inside ``adapter_down`` is ``norm_before``)."""
    roles: dict[int, str] = {}

    def add(prefix: str, sub: nn.Module | None) -> None:
        if sub is None:
            return
        for pname, param in sub.named_parameters():
            roles.setdefault(id(param), f"{prefix}.{pname}")

    add("norm_before", getattr(module, "adapter_norm_before", None))
    down = getattr(module, "adapter_down", None)
    if down is not None:
        for layer in down:
            if not isinstance(layer, nn.LayerNorm) and any(True for _ in layer.parameters()):
                add("down", layer)
    add("up", getattr(module, "adapter_up", None))
    add("norm_after", getattr(module, "adapter_norm_after", None))
    add("gate", getattr(module, "gate", None))
    scaling = getattr(module, "scaling", None)
    if isinstance(scaling, nn.Parameter):
        roles.setdefault(id(scaling), "scaling")
    return roles


def _parent_name(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _adapters_lib_units(model: nn.Module, modules: Mapping[str, nn.Module]) -> list[AdapterUnit]:
    if "adapters" not in sys.modules:
        return []
    found = [(raw, m, kind) for raw, m in modules.items() if (kind := _adapters_lib_kind(m)) is not None]
    if not found:
        return []
    root_config = find_adapters_config(model)
    active = _active_adapters_lib(root_config)
    adapter_params = {id(p) for _, m, _ in found for p in m.parameters()}
    units = []
    for raw_layer, module, kind in found:
        if kind == "prefix":  # PrefixTuning.name is its location (self_prefix); the adapter keys its group
            adapter = _parent_name(raw_layer).rsplit(".", 1)[-1]
        else:
            adapter = str(getattr(module, "name", raw_layer.rsplit(".", 1)[-1]))
        roles = _bottleneck_roles(module) if kind == "bottleneck" else {}
        parts = [AdapterPart(roles.get(id(p), pname), user_name(_join(raw_layer, pname)), _join(raw_layer, pname), p)
                 for pname, p in module.named_parameters()]
        units.append(AdapterUnit(
            library="adapters", method=kind, adapter=adapter, layer=user_name(raw_layer), module=module, parts=parts,
            config=_adapters_lib_config(root_config, adapter, kind, module), active=adapter in active,
            base=_host_module(modules, raw_layer, adapter_params), kind="other"))
    return units


def _host_module(modules: Mapping[str, nn.Module], raw_layer: str, adapter_params: set[int]) -> nn.Module | None:
    """The nearest ancestor holding a parameter of its own that no adapter owns (the layer being adapted)."""
    name = raw_layer
    while name:
        name = _parent_name(name)
        module = modules.get(name)
        if module is not None and any(id(p) not in adapter_params for p in module.parameters()):
            return module
    return None


def normalise_custom_roles(modules: Mapping[str, str]) -> dict[str, str]:
    """Declared ``{module name pattern: role}`` with roles mapped to their canonical names; bad roles raise."""
    out = {}
    for pattern, role in modules.items():
        canonical = CUSTOM_ROLES.get(str(role).lower())
        if canonical is None:
            raise ValueError(f"adapter module pattern {pattern!r}: unknown role {role!r}; roles are "
                             f"{sorted(set(CUSTOM_ROLES))}")
        out[pattern] = canonical
    return out


def _custom_units(named: Mapping[str, nn.Module], modules: Mapping[str, str], taken: set[int]) -> list[AdapterUnit]:
    """Hand-written adapters: each matched module is a part with its role; units group parts by parent module."""
    if not modules:
        return []
    roles = normalise_custom_roles(modules)
    grouped: dict[str, list[AdapterPart]] = {}
    role_of: dict[str, dict[str, str]] = {}
    for raw, module in named.items():
        name = user_name(raw)
        role = next((r for pattern, r in roles.items() if fnmatch.fnmatchcase(name, pattern)), None)
        if role is None:
            continue
        parent = _parent_name(raw)
        short = raw[len(parent) + 1:] if parent else raw
        for pname, param in module.named_parameters():
            if id(param) in taken:
                continue
            full = _join(raw, pname)
            grouped.setdefault(parent, []).append(AdapterPart(f"{short}.{pname}", user_name(full), full, param))
            role_of.setdefault(parent, {})[f"{short}.{pname}"] = role
    units = []
    for parent, parts in grouped.items():
        units.append(AdapterUnit(
            library="custom", method="custom", adapter="custom", layer=user_name(parent),
            module=named[parent], parts=parts, config={"roles": role_of[parent]}, active=True, base=None))
    return units


def discover_adapters(model: nn.Module, custom_modules: Mapping[str, str] | None = None) -> list[AdapterUnit]:
    """Every adapter unit of ``model`` (PEFT, ``adapters`` library, hand-written by ``custom_modules``)."""
    modules = dict(model.named_modules())
    units = _peft_units(model, modules) + _adapters_lib_units(model, modules)
    taken = {id(p.param) for u in units for p in u.parts}
    units += _custom_units(modules, custom_modules or {}, taken)
    return units


def base_device(unit: AdapterUnit) -> torch.device | None:
    """The device of the layer an adapter modifies (its first parameter not owned by an adapter)."""
    if unit.base is None:
        return None
    own = {id(p.param) for p in unit.parts}
    if unit.library == "adapters":
        own |= {id(p) for m in unit.base.modules() if _adapters_lib_kind(m) for p in m.parameters()}
    return next((p.device for p in unit.base.parameters() if id(p) not in own), None)


# -- merging: which library, which methods, which layers a merge writes --------------------------------------------

#: merge methods per library, and whether each merges or unmerges
MERGE_METHODS: dict[str, dict[str, str]] = {
    "peft": {"merge_and_unload": "merge", "merge_adapter": "merge", "unmerge_adapter": "unmerge"},
    "adapters": {"merge_adapter": "merge", "reset_adapter": "unmerge"},
}


def detect_library(model: Any) -> str | None:
    """``peft`` for a PeftModel or PEFT tuner model, ``adapters`` for an ``adapters``-library model, else None."""
    peft = sys.modules.get("peft")
    if peft is not None:
        from peft.tuners.tuners_utils import BaseTuner

        if isinstance(model, (peft.PeftModel, BaseTuner)):
            return "peft"
    if hasattr(model, "adapters_config") and callable(getattr(type(model), "merge_adapter", None)):
        return "adapters"
    return None


def mergeable_models(model: Any) -> list[Any]:
    """``model`` if it has merge methods, else its outermost submodules that have (a LightningModule's PEFT model)."""
    if detect_library(model) is not None:
        return [model]
    if not isinstance(model, nn.Module):
        return []
    found: list[Any] = []
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if module is not model and detect_library(module) is not None:
            found.append(module)
            skip.append(f"{name}.")
    return found


def peft_tuner_layers(model: nn.Module, named_modules: Iterable[tuple[str, nn.Module]] | None = None
                      ) -> Iterator[tuple[str, Any]]:
    """``(raw name, layer)`` of every PEFT tuner layer (``BaseTunerLayer``) of ``model`` (or of ``named_modules``)."""
    for raw, module in model.named_modules() if named_modules is None else named_modules:
        if _is_peft_tuner_layer(module):
            yield raw, module


def _peft_layer_adapters(layer: Any) -> set[str]:
    names: set[str] = set()
    for attr in getattr(layer, "adapter_layer_names", ()):
        container = getattr(layer, attr, None)
        if hasattr(container, "keys"):
            names |= set(container.keys())
    return names


def _base_params(raw: str, layer: nn.Module, attr: str | None) -> tuple[str, ...]:
    """User names of the parameters of ``layer``'s base (``attr``: PEFT's ``base_layer``; None: the layer)."""
    path, base = raw, layer
    while attr is not None and isinstance(getattr(base, attr, None), nn.Module):
        path, base = f"{path}.{attr}", getattr(base, attr)
    params = base.named_parameters(recurse=attr is not None)
    return tuple(sorted({user_name(f"{path}.{pname}".lstrip(".")) for pname, _ in params}))


def unloaded_parameters(library: str, model: nn.Module, layers: Sequence[tuple[str, Any]] | None = None) -> set[int]:
    """ids of the adapter weights an unload removes (every tuner-layer parameter that is not a base weight).

    ``layers``: the model's PEFT tuner layers when already listed (``(name, layer)`` pairs).
    """
    if library != "peft":
        return set()
    out: set[int] = set()
    for _raw, layer in layers if layers is not None else peft_tuner_layers(model):
        base = {id(p) for p in layer.get_base_layer().parameters()}
        out |= {id(p) for p in layer.parameters()} - base
    return out


@dataclasses.dataclass(frozen=True)
class MergeTarget:
    """A layer whose adapters are merged (or unmerged): its user name, the adapters, its base parameters."""

    layer: str
    adapters: tuple[str, ...]
    params: tuple[str, ...]


def _as_list(names: Any) -> list[str] | None:
    if names is None:
        return None
    return [names] if isinstance(names, str) else list(names)


def discover_targets(library: str, model: nn.Module, kind: str, arguments: Mapping[str, Any],
                     layers: Sequence[tuple[str, Any]] | None = None) -> tuple[tuple[str, ...], list[MergeTarget]]:
    """The adapters a merge call acts on and the layers (with their base parameters) it will write.

    ``kind``: ``merge`` or ``unmerge``; ``arguments``: the call's bound arguments (``adapter_names``, ``name``);
    ``layers``: the model's PEFT tuner layers when already listed (``(name, layer)`` pairs).
    """
    targets = []
    if library == "peft":
        layers = list(peft_tuner_layers(model)) if layers is None else layers
        if kind == "unmerge":
            for raw, layer in layers:
                merged = tuple(getattr(layer, "merged_adapters", ()))
                if merged:
                    targets.append(MergeTarget(user_name(raw), merged, _base_params(raw, layer, "base_layer")))
            adapters = tuple(sorted({a for t in targets for a in t.adapters}))
            return adapters, targets
        adapters = _as_list(arguments.get("adapter_names"))
        if adapters is None:
            active = getattr(model, "active_adapters", None)
            adapters = _as_list(active() if callable(active) else active) or []
        for raw, layer in layers:
            here = _peft_layer_adapters(layer)
            merging = tuple(a for a in adapters if a in here and a not in getattr(layer, "merged_adapters", ()))
            if merging:
                targets.append(MergeTarget(user_name(raw), merging, _base_params(raw, layer, "base_layer")))
        return tuple(adapters), targets
    # the adapters library: LoRA layers hold `loras` and the name of the merged one in `merged`
    name = arguments.get("name")
    for raw, module in model.named_modules():
        loras = getattr(module, "loras", None)
        if not isinstance(loras, nn.ModuleDict) or not hasattr(module, "merged"):
            continue
        if kind == "unmerge" and module.merged:
            targets.append(MergeTarget(user_name(raw), (module.merged,), _base_params(raw, module, None)))
        elif kind == "merge" and name in loras and not module.merged:
            targets.append(MergeTarget(user_name(raw), (name,), _base_params(raw, module, None)))
    if kind == "unmerge":
        return tuple(sorted({a for t in targets for a in t.adapters})), targets
    return ((name,) if name else ()), targets


# -- switching adapters on and off for a probe ---------------------------------------------------------------------

_MISSING = object()


@contextlib.contextmanager
def adapters_switched(model: nn.Module, active: Sequence[str] | None, *,
                      peft_layers: Iterable[nn.Module] | None = None, adapters_config: Any = _MISSING
                      ) -> Iterator[None]:
    """Run the model with exactly the adapters ``active`` (``None``: every adapter off), restoring every flag after.

    The libraries' own switches have side effects a check must not have: PEFT's ``set_adapter`` marks the active
    adapters trainable and ``enable_adapters(False)`` changes ``requires_grad``; the ``adapters`` library's
    ``set_active_adapters`` unmerges LoRA first. So the flags the forward reads are set directly:

    * PEFT: off sets each tuner layer's ``_disable_adapters``; a named set sets its ``_active_adapter`` list
      (nothing to do where the model's active adapters already are that set). ``peft_layers``: the layers to
      switch (default: every tuner layer of a PEFT ``model``).
    * ``adapters``: the config's ``active_setup`` (a ``Stack`` of ``active``, or ``None`` for off); the library's
      "none are activated" warning is expected while off, so it is muted for the duration. ``adapters_config``:
      the ``ModelAdaptersConfig`` to switch (default: that of an ``adapters``-library ``model``; ``None``: none).

    A model of neither library, given neither, runs as it is.
    """
    saved: list[tuple[Any, str, Any]] = []
    library_logger = logging.getLogger("adapters.model_mixin")
    muted = False
    try:
        library = detect_library(model)
        layers: list[nn.Module] = list(peft_layers) if peft_layers is not None else []
        if peft_layers is None and library == "peft":
            model_active = getattr(model, "active_adapters", None)
            already = (active is not None and isinstance(model_active, (list, tuple, str))
                       and _as_list(model_active) == list(active))
            layers = [] if already else [m for _, m in peft_tuner_layers(model)]
        for layer in layers:
            if active is None:
                saved.append((layer, "_disable_adapters", layer.__dict__.get("_disable_adapters", _MISSING)))
                layer._disable_adapters = True
            elif list(layer.active_adapters) != list(active):
                saved.append((layer, "_active_adapter", layer.__dict__.get("_active_adapter", _MISSING)))
                layer._active_adapter = list(active)
        if adapters_config is _MISSING:
            adapters_config = model.adapters_config if library == "adapters" else None
        if adapters_config is not None:
            from adapters.composition import Stack

            saved.append((adapters_config, "active_setup", adapters_config.active_setup))
            adapters_config.active_setup = Stack(*active) if active else None
            if not active:
                library_logger.addFilter(_mute_none_activated)
                muted = True
        yield
    finally:
        if muted:
            library_logger.removeFilter(_mute_none_activated)
        for owner, attr, value in reversed(saved):
            if value is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, value)


def _mute_none_activated(record: logging.LogRecord) -> bool:
    return "none are activated" not in record.getMessage()
