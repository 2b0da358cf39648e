"""Adapter initialisation audit: mis-initialised, frozen and dead adapters.

Codes: ``ADAPTER_INIT_WRONG`` (init: a parameter breaks its method's init contract, is non-finite, on another
device than its base layer, or not floating point), ``ADAPTER_NOT_IDENTITY`` (init: a fresh adapter that promises
an unchanged output changes it, measured by a probe forward), ``ADAPTER_NOT_TRAINABLE`` (init: an active adapter's
parameters are frozen), ``ADAPTER_DEAD`` (step: an adapter with no non-zero gradient at the first step, or a
trainable adapter parameter still without one after ``dead_after_steps`` steps), ``ADAPTER_UNUSED`` (step,
warning: adapters that got no gradient in any of the first ``dead_after_steps`` steps, longer under LayerDrop,
while the model's other adapters train, e.g. a masked LM's pooler under ``all-linear``). ``CHECK_NOT_APPLICABLE``
(info) says what was not judged and why (PiSSA-style inits, ``init_lora_weights=False``, bert/houlsby bottlenecks...).

The contract of each unit is read from the adapter's own config (``LoraConfig.init_lora_weights``,
``IA3Config.init_ia3_weights``, ``BnConfig.init_weights``...), never guessed from the values. Functions hold the
logic; :class:`AdapterInitCheck` is the thin stateful class the engine runs.

Under DeepSpeed ZeRO-3 the adapter parameters are empty placeholders: each unit is gathered read-only on its own
(:func:`audit_partitioned`, a collective every rank runs at ``init``) and judged whole; the probe's forward gathers
through DeepSpeed's own hooks. DeepSpeed keeps gradients off ``param.grad`` (under HF / accelerate they are
cleared before the pre-optimizer hook), so ``ADAPTER_DEAD`` / ``ADAPTER_UNUSED`` say ``CHECK_NOT_APPLICABLE`` once.

Why one file of about 1,000 lines: this is one check family (one recipe key, one state), and its parts judge the
same adapter units in sequence: the init contracts of every method (PEFT LoRA variants, DoRA, IA3, prompt
learning, the adapters library's bottlenecks, hand-written adapters), the identity probe, and the gradient tests
of the first steps. Splitting it would split the family; discovery of the units is in
:mod:`callbacks.primitives.adapters`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from pydantic import Field, field_validator
from torch import nn

from callbacks.checks.base import Check, CheckConfig
from callbacks.events import EventContext
from callbacks.findings import Finding
from callbacks.primitives.adapters import (
    AdapterPart,
    AdapterUnit,
    adapters_switched,
    base_device,
    discover_adapters,
    find_adapters_config,
    normalise_custom_roles,
)
from callbacks.primitives.naming import buffer_key, unwrap_model
from callbacks.primitives.probe import ProbeUnavailable, build_probe_batch, output_tensor, preserved_state
from callbacks.primitives.zero import GRADIENTS_HIDDEN_WHY, any_partitioned, gathered, gradients_hidden


class AdapterInitConfig(CheckConfig):
    """Recipe section checks.adapter_init: the adapter initialisation audit.

    ``probe``: run the identity probe at init. ``tolerance``: the probe's allowed output change, relative to
    the output's own scale (``max |output|`` with adapters disabled: a fresh LeViT's logits are ~1e-9).
    ``dead_after_steps``: K, the steps within which every trainable adapter parameter must get a non-zero
    gradient. ``modules``: hand-written adapters, ``{module name pattern: role}`` with roles
    ``zero`` (up / B: all zero), ``random`` (down / A: finite, not all zero), ``norm`` (LayerNorm: weight 1, bias
    0), ``ones`` (scales: all one), ``any`` (only finite / trainable / alive). ``fresh``: whether the adapters
    are freshly initialised, so that their values must match the init contract and the probe applies; ``None``
    (auto) means fresh unless a ``load`` event (resume) came first, per adapter unless it holds trained values
    (its zero side non-zero, its random side still at its init distribution: a saved adapter loaded with
    ``PeftModel.from_pretrained(..., is_trainable=True)``; reported as ``CHECK_NOT_APPLICABLE``). ``false``:
    never fresh; ``true``: always. Non-fresh adapters still get non-finite values, dtype, device, trainability
    and dead adapters checked.
    """

    probe: bool = Field(True, description="run the identity probe at init (fresh adapters leave the output as is)")
    fresh: bool | None = Field(None, description="whether adapters are freshly initialised (their values must "
                               "match the init contract); null: fresh unless a resume or trained values say not")
    tolerance: float = Field(1.0e-6, ge=0, description="the probe's allowed output change, relative to the "
                             "output's own scale")
    dead_after_steps: int = Field(3, ge=1, description="steps within which every trainable adapter parameter "
                                  "must get a non-zero gradient")
    modules: dict[str, str] = Field(default_factory=dict, description="hand-written adapters: {module name "
                                    "pattern: role}, roles zero, random, norm, ones, any")

    @field_validator("modules")
    @classmethod
    def _roles_known(cls, value: dict[str, str]) -> dict[str, str]:
        normalise_custom_roles(value)  # raises ValueError naming the pattern and the allowed roles
        return value


# -- contracts -------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Rule:
    """What one role's values must be at init: ``zero``, ``ones``, ``const`` (``value``), ``nonzero``,
    ``spread`` (not all zero, std within 2x of ``value`` when the tensor has 64+ elements), ``dora_norm``
    (the DoRA magnitude equals the row norms of the base weight)."""

    role: str
    kind: str
    value: float = 0.0
    #: ``spread`` rules: the init distribution (``uniform``: kaiming-uniform, ``normal``), what tells an
    #: untouched factor from a re-drawn one
    distribution: str = "normal"


@dataclasses.dataclass
class Contract:
    """The init contract of one unit as its config states it.

    ``identity``: True when the config promises an unchanged output at init, False when it promises a change,
    None when the output is unchanged but only because the base weight was rewritten (PiSSA...) or the method
    is not known here. ``init``: the config value it was read from (``init_lora_weights=True``). ``product``:
    (B role, A role) whose product must be zero (LoRA ``orthogonal``).
    """

    rules: list[Rule]
    identity: bool | None
    init: str
    product: tuple[str, str] | None = None


def _kaiming_std(fan_in: int) -> float:
    # kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)): std 1/sqrt(3 fan_in)
    return 1.0 / math.sqrt(3.0 * max(fan_in, 1))


def _fan_in(tensor: torch.Tensor) -> int:
    return int(tensor.shape[1] * math.prod(tensor.shape[2:])) if tensor.dim() >= 2 else int(tensor.numel())


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    if isinstance(config, Mapping):
        return config.get(key, default)
    try:
        return config[key]  # adapters library configs are mappings with attribute access
    except (KeyError, TypeError, AttributeError):
        return getattr(config, key, default)


#: PEFT LoRA inits that rewrite the base weight (W - s·BA): output unchanged, but not an "identity" contract
LORA_BASE_REWRITING = ("pissa", "olora", "corda", "loftq", "eva", "lora_ga", "mica")


def _peft_lora_contract(unit: AdapterUnit) -> Contract:
    init = _cfg(unit.config, "init_lora_weights", None)
    label = f"init_lora_weights={init!r}"
    if unit.config is None:
        return Contract([], None, "no LoraConfig found")
    if init is False:
        return Contract([], False, label)
    if isinstance(init, str) and init.lower().startswith(LORA_BASE_REWRITING):
        return Contract([Rule("lora_A", "nonzero"), Rule("lora_B", "nonzero")], None, label)
    rules: list[Rule] = []
    if init == "orthogonal":
        rules = [Rule("lora_A", "nonzero"), Rule("lora_B", "nonzero")]
        contract = Contract(rules, True, label, product=("lora_B", "lora_A"))
    elif init is True or (isinstance(init, str) and init.lower() == "gaussian"):
        gaussian = init is not True
        if unit.kind == "embedding":
            rules = [Rule("lora_embedding_A", "zero"), Rule("lora_embedding_B", "spread", 1.0)]
        else:
            a = unit.part("lora_A")
            std = (1.0 / float(_cfg(unit.config, "r", 8) if a is None else a.param.shape[0]) if gaussian
                   else _kaiming_std(_fan_in(a.param)) if a is not None else 0.0)
            rules = [Rule("lora_A", "spread", std, "normal" if gaussian else "uniform"), Rule("lora_B", "zero"),
                     Rule("lora_B.bias", "zero")]
        contract = Contract(rules, True, label)
    else:
        return Contract([], None, label)
    if unit.dora and unit.kind == "linear":
        contract.rules.append(Rule("lora_magnitude_vector", "dora_norm"))
    return contract


def peft_contract(unit: AdapterUnit) -> Contract:
    """The init contract of a PEFT unit, from its config (``init_lora_weights``, ``init_ia3_weights``...)."""
    method, cfg = unit.method, unit.config
    if method == "lora":
        return _peft_lora_contract(unit)
    if cfg is None:
        return Contract([], None, f"no {method} config found")
    if getattr(cfg, "is_prompt_learning", False):
        return Contract([], False, f"{method} adds virtual tokens: never identity")
    if method == "adalora":
        init = _cfg(cfg, "init_lora_weights", True)
        if init is True:
            return Contract([Rule("lora_E", "zero"), Rule("lora_A", "spread", 0.02), Rule("lora_B", "spread", 0.02)],
                            True, "init_lora_weights=True")
        return Contract([], False, f"init_lora_weights={init!r}")
    if method == "ia3":
        init = _cfg(cfg, "init_ia3_weights", True)
        return Contract([Rule("ia3_l", "ones")], True, "init_ia3_weights=True") if init else \
            Contract([], False, "init_ia3_weights=False")
    init = _cfg(cfg, "init_weights", True)
    label = f"init_weights={init!r}"
    if init is not True:
        return Contract([], False if init is False else None, label)
    if method == "loha":
        return Contract([Rule("hada_w2_b", "zero"), Rule("hada_w1_a", "nonzero"), Rule("hada_w2_a", "nonzero")],
                        True, label)
    if method == "lokr":
        zero = "lokr_w1" if unit.part("lokr_w1") is not None else "lokr_w1_a"
        return Contract([Rule(zero, "zero")], True, label)
    if method == "vera":
        return Contract([Rule("vera_lambda_b", "zero"), Rule("vera_lambda_d", "const", float(_cfg(cfg, "d_initial",
                                                                                                   0.1)))],
                        True, label)
    if method == "oft":
        return Contract([Rule("oft_R", "zero"), Rule("oft_embedding_R", "zero")], True, label)
    if method == "boft":
        return Contract([Rule("boft_R", "zero"), Rule("boft_s", "ones")], True, label)
    return Contract([], None, f"{method}: no init contract known here")


def adapters_lib_contract(unit: AdapterUnit) -> Contract:
    """The init contract of an ``adapters`` library unit, from its ``BnConfig`` / ``LoRAConfig``."""
    cfg = unit.config
    if unit.method == "prefix":
        return Contract([], False, "prefix tuning adds prefixes: never identity")
    if cfg is None:
        return Contract([], None, f"no config found for adapter {unit.adapter!r}")
    init = _cfg(cfg, "init_weights", None)
    label = f"init_weights={init!r}"
    if unit.method == "bottleneck":
        rules = [Rule("norm_before.weight", "ones"), Rule("norm_before.bias", "zero"),
                 Rule("norm_after.weight", "ones"), Rule("norm_after.bias", "zero"), Rule("scaling", "ones")]
        down = unit.part("down.weight")
        if init in ("mam_adapter", "bert"):  # both initialise the gate with BERT's N(0, 0.02), bias 0
            rules += [Rule("gate.weight", "spread", 0.02), Rule("gate.bias", "zero")]
        if init == "mam_adapter":
            rules += [Rule("up.weight", "zero"), Rule("up.bias", "zero"), Rule("down.bias", "zero")]
            if down is not None and down.param.dim() == 2:
                rules.append(Rule("down.weight", "spread", _kaiming_std(_fan_in(down.param)), "uniform"))
            # an output LayerNorm after the residual changes the output even with a zero up-projection
            return Contract(rules, not bool(_cfg(cfg, "ln_after", False)), label)
        if init == "bert":
            rules += [Rule("up.weight", "spread", 0.02), Rule("down.weight", "spread", 0.02),
                      Rule("up.bias", "zero"), Rule("down.bias", "zero")]
        elif init == "houlsby":
            # trunc_normal(std 0.01, +-2 std) has std ~0.0088
            rules += [Rule("up.weight", "spread", 0.0088), Rule("down.weight", "spread", 0.0088),
                      Rule("up.bias", "zero"), Rule("down.bias", "zero")]
        return Contract(rules, False, label)
    if unit.method == "lora":
        if init == "lora":
            a = unit.part("lora_A")
            std = _kaiming_std(_fan_in(a.param)) if a is not None else 0.0
            return Contract([Rule("lora_A", "spread", std, "uniform"), Rule("lora_B", "zero")], True, label)
        if init == "bert":
            return Contract([Rule("lora_A", "spread", 0.02), Rule("lora_B", "spread", 0.02)], False, label)
        if init == "ia3":
            return Contract([Rule("lora_A", "ones"), Rule("lora_B", "ones")], None, label)
    return Contract([], None, label)


def custom_contract(unit: AdapterUnit) -> Contract:
    """A hand-written adapter's contract, from the roles declared for its modules."""
    roles: Mapping[str, str] = unit.config["roles"]
    rules = []
    for role, declared in roles.items():
        is_bias = role.endswith(".bias")
        if declared == "zero":
            rules.append(Rule(role, "zero"))
        elif declared == "random":
            rules.append(Rule(role, "zero" if is_bias else "nonzero"))
        elif declared == "norm":
            rules.append(Rule(role, "zero" if is_bias else "ones"))
        elif declared == "ones":
            rules.append(Rule(role, "ones"))
    return Contract(rules, None, "declared roles")


def init_contract(unit: AdapterUnit) -> Contract:
    """The init contract of any unit."""
    if unit.library == "peft":
        return peft_contract(unit)
    if unit.library == "adapters":
        return adapters_lib_contract(unit)
    return custom_contract(unit)


# -- evaluation ------------------------------------------------------------------------------------------------

class Broken(enum.Enum):
    """Which expectation a parameter breaks; :data:`FIXES` holds the fix for each."""

    NOT_ZERO = "not zero"
    NOT_CONSTANT = "not the constant its init sets"
    ALL_ZERO = "all zero"
    WRONG_SPREAD = "wrong spread"
    DORA_MAGNITUDE = "DoRA magnitude is not the base weight norm"
    PRODUCT_NOT_ZERO = "product B·A not zero"
    NOT_FLOATING = "not floating point"
    WRONG_DEVICE = "on another device than its base layer"
    NON_FINITE = "non-finite"


@dataclasses.dataclass
class Violation:
    """One parameter breaking one expectation. ``problem`` (the words the finding shows) groups violations into
    findings; ``broken`` says which expectation, for the fix."""

    unit: AdapterUnit
    part: AdapterPart
    broken: Broken
    expected: str
    found: str
    problem: str = ""

    def __post_init__(self) -> None:
        self.problem = self.problem or self.broken.value


def _describe(t: torch.Tensor) -> str:
    t = t.detach().double()
    if t.numel() == 0:
        return "empty"
    std = t.std().item() if t.numel() > 1 else 0.0
    return f"std {std:.4g}, mean {t.mean().item():.4g}, max |x| {t.abs().max().item():.4g}"


def _dora_expected_norm(unit: AdapterUnit) -> torch.Tensor | None:
    base = unit.base
    weight = getattr(base, "weight", None)
    a, b = unit.part("lora_A"), unit.part("lora_B")
    if weight is None or a is None or b is None or weight.dim() != 2 or weight.device.type == "meta":
        return None
    w = weight.detach().float()
    if getattr(unit.module, "fan_in_fan_out", False):
        w = w.T
    scaling = getattr(unit.module, "scaling", {}).get(unit.adapter, 1.0)
    delta = (b.param.detach().float() @ a.param.detach().float()) * scaling
    if delta.shape != w.shape:
        return None
    return torch.linalg.norm(w.to(delta.device) + delta, dim=1)


def rule_violation(unit: AdapterUnit, part: AdapterPart, rule: Rule) -> Violation | None:
    """Check one part against one rule (values only; non-finite and meta tensors are handled before)."""
    t = part.param.detach()
    if rule.kind == "zero":
        if torch.count_nonzero(t).item() == 0:
            return None
        return Violation(unit, part, Broken.NOT_ZERO, "0 (all zero)", _describe(t))
    if rule.kind in ("ones", "const"):
        target = 1.0 if rule.kind == "ones" else rule.value
        if bool(torch.all(t == target)):
            return None
        return Violation(unit, part, Broken.NOT_CONSTANT, f"{target:g} everywhere", _describe(t),
                         problem=f"not {target:g}")
    if rule.kind == "nonzero":
        if torch.count_nonzero(t).item() > 0:
            return None
        return Violation(unit, part, Broken.ALL_ZERO, "non-zero values", "all zero")
    if rule.kind == "spread":
        if torch.count_nonzero(t).item() == 0:
            return Violation(unit, part, Broken.ALL_ZERO, f"random values with std ~{rule.value:.4g}", "all zero")
        if t.numel() >= 64 and rule.value > 0:
            std = t.double().std().item()
            if not 0.5 * rule.value <= std <= 2.0 * rule.value:
                return Violation(unit, part, Broken.WRONG_SPREAD, f"std ~{rule.value:.4g}", _describe(t))
        return None
    if rule.kind == "dora_norm":
        expected = _dora_expected_norm(unit)
        if expected is None:
            return None
        found = t.float().reshape(-1).to(expected.device)
        if found.shape == expected.shape and torch.allclose(found, expected, rtol=1e-4, atol=1e-6):
            return None
        diff = (found - expected).abs().max().item() if found.shape == expected.shape else float("nan")
        return Violation(unit, part, Broken.DORA_MAGNITUDE,
                         "the row norms of the base weight (W + s·BA)", f"max difference {diff:.4g}")
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def product_violation(unit: AdapterUnit, roles: tuple[str, str]) -> Violation | None:
    """B·A must be zero (LoRA ``orthogonal``: both factors non-zero, their product zero)."""
    b, a = unit.part(roles[0]), unit.part(roles[1])
    if a is None or b is None or a.param.dim() != 2 or b.param.dim() != 2:
        return None
    prod = b.param.detach().double() @ a.param.detach().double()
    scale = b.param.detach().double().abs().max().item() * a.param.detach().double().abs().max().item()
    worst = prod.abs().max().item()
    if worst <= 1e-5 * max(scale, 1e-12) * a.param.shape[0]:
        return None
    return Violation(unit, b, Broken.PRODUCT_NOT_ZERO, "B·A = 0 (orthogonal init)", f"max |B·A| {worst:.4g}")


def shared_parts(units: Sequence[AdapterUnit]) -> set[int]:
    """``id`` of the parts of embedding units that share memory with a part of another unit.

    PEFT's ``ensure_weight_tying=True`` makes a tied head's ``lora_A``/``lora_B`` transposed views of the
    embedding adapter's B/A, and the head's Linear init writes into them last: those parts hold the Linear
    contract's values (judged on the head's unit), not the embedding's.
    """
    unit_of = {id(part): index for index, unit in enumerate(units) for part in unit.parts}
    embedding = {id(part) for unit in units if unit.kind == "embedding" for part in unit.parts}
    shared: set[int] = set()
    for group in buffer_groups([part for unit in units for part in unit.parts]):
        if len({unit_of[id(part)] for part in group}) > 1:
            shared |= {id(part) for part in group if id(part) in embedding}
    return shared


def buffer_groups(parts: Sequence[AdapterPart]) -> list[list[AdapterPart]]:
    """Parts grouped by the buffer they live in (views of one memory), groups of two or more only; meta and
    empty parameters belong to no group."""
    by_buffer: dict[tuple[Any, ...], list[AdapterPart]] = {}
    for part in parts:
        if part.param.device.type != "meta" and part.param.numel():
            by_buffer.setdefault(buffer_key(part.param), []).append(part)
    return [group for group in by_buffer.values() if len(group) > 1]


def audit_units(units: Sequence[AdapterUnit], fresh: bool | Iterable[AdapterUnit] = True) -> list[Violation]:
    """Every init-contract violation of ``units``: non-floating dtype, device, non-finite, then (for ``fresh``
    adapters: all, none, or the units given) the values their method's contract promises."""
    out: list[Violation] = []
    fresh_ids = {id(u) for u in units} if fresh is True else set() if fresh is False else {id(u) for u in fresh}
    shared = shared_parts(units)
    for unit in units:
        device = base_device(unit)
        bad_parts: set[int] = set()
        for part in unit.parts:
            t = part.param
            if not t.is_floating_point():
                out.append(Violation(unit, part, Broken.NOT_FLOATING, "a floating-point dtype", str(t.dtype)))
                bad_parts.add(id(part))
                continue
            if device is not None and t.device != device:
                out.append(Violation(unit, part, Broken.WRONG_DEVICE, str(device),
                                     str(t.device)))
                bad_parts.add(id(part))
                continue
            if t.device.type == "meta":
                bad_parts.add(id(part))
                continue
            finite = torch.isfinite(t.detach())
            if not bool(finite.all()):
                bad = int(finite.numel() - finite.sum().item())
                out.append(Violation(unit, part, Broken.NON_FINITE, "finite values",
                                     f"{bad} of {t.numel()} values are NaN/Inf"))
                bad_parts.add(id(part))
        if id(unit) not in fresh_ids:
            continue
        contract = init_contract(unit)
        for rule in contract.rules:
            part = unit.part(rule.role)
            if part is None or id(part) in bad_parts or id(part) in shared:
                continue
            violation = rule_violation(unit, part, rule)
            if violation is not None:
                out.append(violation)
        if contract.product is not None and not any(id(p) in bad_parts for p in unit.parts):
            violation = product_violation(unit, contract.product)
            if violation is not None:
                out.append(violation)
    return out


def _excess_kurtosis(t: torch.Tensor) -> float:
    x = t.detach().double().reshape(-1)
    x = x - x.mean()
    var = (x * x).mean().item()
    return (x ** 4).mean().item() / var ** 2 - 3.0 if var > 0 else 0.0


#: fewer values than this: the kurtosis estimate is too noisy (its standard error is ~sqrt(24 / n))
KURTOSIS_MIN_VALUES = 256


def at_init_distribution(t: torch.Tensor, rule: Rule) -> bool:
    """Whether ``t`` still looks drawn from the ``spread`` rule's init distribution.

    A trained LoRA A stays close to its init (its updates are small next to kaiming's spread); a re-init over
    the whole model (``post_init()``, ``apply(_init_weights)``) redraws it from the model's normal
    ``initializer_range``. Kaiming-uniform: std within 0.5-2x and, with 256+ values, platykurtic (uniform:
    excess kurtosis -1.2, normal: 0; the cut sits half-way), else no value beyond 1.25x the bound (a normal
    draw of that std goes past it). Normal: std within 0.7-1.4x.
    """
    if rule.kind != "spread" or rule.value <= 0 or t.numel() < 2 or t.device.type == "meta":
        return False
    std = t.detach().double().std().item()
    if rule.distribution == "uniform":
        if not 0.5 * rule.value <= std <= 2.0 * rule.value:
            return False
        if t.numel() >= KURTOSIS_MIN_VALUES:
            return _excess_kurtosis(t) < -0.6
        return t.detach().double().abs().max().item() <= 1.25 * math.sqrt(3.0) * rule.value
    return 0.7 * rule.value <= std <= 1.4 * rule.value


def holds_trained_values(unit: AdapterUnit) -> bool | None:
    """Whether a unit whose contract has a zero side and a random side holds trained values: the zero side is
    non-zero, not one constant, while the random side still looks drawn from its init (what training from a
    fresh init leaves, and what a re-init does not). ``None``: the zero side is zero (fresh, or never trained)
    or the contract has no such pair."""
    contract = init_contract(unit)
    zero = [r for r in contract.rules if r.kind == "zero" and not r.role.endswith(".bias")]
    spread = [r for r in contract.rules if r.kind == "spread"]
    if contract.identity is not True or not zero or not spread:
        return None
    zero_parts = [p for p in (unit.part(r.role) for r in zero) if p is not None and p.param.device.type != "meta"]
    written = [p for p in zero_parts if torch.count_nonzero(p.param.detach()).item()]
    if not written:
        return None
    if any(p.param.numel() > 1 and bool((p.param.detach() == p.param.detach().reshape(-1)[0]).all())
           for p in written):
        return False  # one value everywhere (fill_, constant_): an init routine wrote it, training does not
    pairs = [(unit.part(r.role), r) for r in spread]
    return all(p is not None and at_init_distribution(p.param, r) for p, r in pairs)


def trained_adapters(units: Sequence[AdapterUnit]) -> dict[str, tuple[int, int]]:
    """Adapters judged to hold trained values (loaded with ``PeftModel.from_pretrained``, ``load_adapter``, a
    resume): ``{adapter: (units that look trained, units with a non-zero zero side)}`` where most units with a
    non-zero zero side look trained (:func:`holds_trained_values`). A re-initialised fresh adapter has its
    random side redrawn too, so it is not judged trained."""
    seen: dict[str, list[bool]] = {}
    for unit in units:
        verdict = holds_trained_values(unit)
        if verdict is not None:
            seen.setdefault(unit.adapter, []).append(verdict)
    return _mostly_trained(seen)


def _mostly_trained(seen: Mapping[str, Sequence[bool]]) -> dict[str, tuple[int, int]]:
    return {a: (sum(v), len(v)) for a, v in seen.items() if 2 * sum(v) > len(v)}


def _gather_list(unit: AdapterUnit) -> list[nn.Parameter]:
    """What one unit's audit reads: its parts, and for DoRA the base layer's own parameters (the magnitude is
    judged against the base weight's row norms)."""
    params = [p.param for p in unit.parts]
    if unit.dora and unit.base is not None:
        own = {id(p) for p in params}
        params += [p for p in unit.base.parameters(recurse=False) if id(p) not in own]
    return params


def audit_partitioned(units: Sequence[AdapterUnit], fresh: bool, judge_trained: bool
                      ) -> tuple[dict[str, tuple[int, int]], list[Violation]]:
    """:func:`trained_adapters` and :func:`audit_units` for units whose parameters are DeepSpeed ZeRO-3
    partitioned (``param.data`` is an empty placeholder; the values are spread over the ranks' shards).

    Each unit's parameters are gathered read-only, one unit at a time (the extra memory is one layer's adapter),
    and judged while whole. A collective: every rank calls it at the same event with the same units (it runs
    in ``init``, on every rank). ``fresh``: adapters are judged fresh unless they look trained (when
    ``judge_trained``). Returns (trained adapters, violations).
    """
    seen: dict[str, list[bool]] = {}
    as_fresh: list[list[Violation]] = []
    as_loaded: list[list[Violation]] = []
    for unit in units:
        with gathered(_gather_list(unit)):
            verdict = holds_trained_values(unit) if judge_trained else None
            # both verdicts now: which applies is known only once every unit said whether it looks trained
            as_fresh.append(audit_units([unit], fresh=True) if fresh else [])
            as_loaded.append(audit_units([unit], fresh=False))
        if verdict is not None:
            seen.setdefault(unit.adapter, []).append(verdict)
    trained = _mostly_trained(seen)
    violations: list[Violation] = []
    for unit, if_fresh, if_loaded in zip(units, as_fresh, as_loaded, strict=True):
        violations += if_fresh if fresh and unit.adapter not in trained else if_loaded
    return trained, violations


REINITIALISED = ("something re-initialised the adapter after it was added: a model.post_init() / init_weights() / "
                 "apply(model._init_weights) call or an init loop over every nn.Linear. Initialise the base model "
                 "before adding adapters, skip adapter modules in custom init code, or reset the adapter "
                 "(PEFT: layer.reset_lora_parameters(name, True); adapters: add it again)")

#: the fix for each broken expectation; values a re-initialisation produces share :data:`REINITIALISED`
FIXES: dict[Broken, str] = {
    Broken.NON_FINITE: ("the adapter holds NaN/Inf: if it was loaded from a file, that file is corrupt (re-save or "
                        "re-train the adapter); otherwise find the init or load step that produced it before "
                        "training on it"),
    Broken.WRONG_DEVICE: ("move the model after adding adapters (model.to(device)); "
                          "get_peft_model(low_cpu_mem_usage=True) leaves adapters on the meta device until their "
                          "weights are loaded"),
    Broken.NOT_FLOATING: "adapter parameters must be floating point: do not cast or quantise the adapter weights",
    Broken.DORA_MAGNITUDE: ("the DoRA magnitude must start as the base weight's row norm: add the adapter after "
                            "the base weights are final (loaded), or re-create it"),
}
#: the adapters library's LayerNorm given another init (e.g. ``mam_adapter`` with ``ln_before=True``)
ADAPTERS_NORM_FIX = ("an init routine touched the adapter's LayerNorm (e.g. treating adapter_down[0] as the down "
                     "projection when ln_before=True): initialise only the nn.Linear layers of adapter_down and "
                     "reset the norm to weight 1, bias 0")
CUSTOM_FIX = "re-run the hand-written adapter's init after the model's own init, or fix the declared role"


def fix_for(broken: Broken, unit: AdapterUnit) -> str:
    """The concrete fix for a kind of violation of ``unit``'s contract."""
    if broken in FIXES:
        return FIXES[broken]
    if unit.library == "adapters" and broken is Broken.NOT_CONSTANT:
        return ADAPTERS_NORM_FIX
    if unit.library == "custom":
        return CUSTOM_FIX
    return REINITIALISED


# -- identity probe ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ProbeResult:
    """Outcome of the identity probe: the largest output change, or why the probe was not run."""

    max_change: float | None = None
    reference_max: float | None = None
    skipped: str | None = None


def probe_target(model: nn.Module) -> nn.Module | None:
    """The module the probe runs: the model itself when it carries an HF config, else the first submodule that
    does (the HF / PEFT model inside a LightningModule or another wrapper)."""
    inner = unwrap_model(model)
    if getattr(inner, "config", None) is not None and hasattr(inner, "main_input_name"):
        return model
    for module in model.modules():
        if getattr(module, "config", None) is not None and hasattr(module, "main_input_name"):
            return module
    return None


def probe_inputs(model: nn.Module, given: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """``given`` (the event's ``probe_batch``) when set, else a one-row batch built from the model's config by
    the shared probe primitive (private generator: the global RNG is not consumed); None when none can be built."""
    if isinstance(given, Mapping):
        return dict(given)
    try:
        return build_probe_batch(model, batch_size=1, seq_len=8)
    except ProbeUnavailable:
        return None


def _peft_unit_layers(units: Iterable[AdapterUnit]) -> list[nn.Module]:
    """The PEFT tuner layers holding ``units`` (each once): the layers the identity probe switches off."""
    return list({id(u.module): u.module for u in units if u.library == "peft"}.values())


def probe_identity(model: nn.Module, units: Sequence[AdapterUnit], batch: Mapping[str, Any]) -> ProbeResult:
    """Output with adapters active vs disabled on ``batch``: the largest change (eval mode, no grad).

    Leaves RNG state, every module's train/eval mode, gradients and adapter flags as they were.
    """
    if any(getattr(u.module, "merged", False) for u in units if u.library == "peft"):
        return ProbeResult(skipped="adapters are merged into the base weights")
    try:
        with preserved_state(model), torch.no_grad():
            adapted = output_tensor(model(**batch))
            with adapters_switched(model, None, peft_layers=_peft_unit_layers(units), adapters_config=(
                    find_adapters_config(model) if any(u.library == "adapters" for u in units) else None)):
                base = output_tensor(model(**batch))
    except ProbeUnavailable:
        return ProbeResult(skipped="the model's output has no comparable tensor")
    except Exception as exc:  # noqa: BLE001 - a synthetic batch the model rejects: nothing judged, said so
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        return ProbeResult(skipped=f"the model rejected the probe batch ({type(exc).__name__}: {first})")
    if adapted.shape != base.shape:
        return ProbeResult(skipped="the model's output has no comparable tensor")
    diff = (adapted.double() - base.double()).abs()
    change = float("nan") if not bool(torch.isfinite(adapted).all()) else diff.max().item()
    return ProbeResult(max_change=change, reference_max=base.double().abs().max().item())


# -- gradients -------------------------------------------------------------------------------------------------

def grad_state(parts: Sequence[AdapterPart]) -> list[str]:
    """Per part: ``none`` (no gradient), ``zero`` (all-zero gradient) or ``nonzero``. One host sync."""
    flags = []
    tensors = []
    for part in parts:
        grad = part.param.grad
        if grad is None:
            flags.append("none")
        else:
            flags.append("?")
            tensors.append(grad.detach().ne(0).any().to("cpu"))
    values = torch.stack(tensors).tolist() if tensors else []
    it = iter(values)
    return [("nonzero" if next(it) else "zero") if f == "?" else f for f in flags]


def shared_grad_state(parts: Sequence[AdapterPart], states: Sequence[str]) -> dict[str, str]:
    """``{part name: state}`` where a part sharing its buffer with a part that got a non-zero gradient counts as
    ``nonzero``: the optimizer's update of one writes the other (PEFT's ``ensure_weight_tying`` makes the embedding
    adapter's factors views of the tied head's, and only the head's parameters receive the gradient)."""
    out = dict(zip((p.name for p in parts), states, strict=True))
    for group in buffer_groups(parts):
        if any(out[part.name] == "nonzero" for part in group):
            out.update(dict.fromkeys((part.name for part in group), "nonzero"))
    return out


class DeadReason(enum.StrEnum):
    """Why a unit got no non-zero gradient (the value is the sentence findings show)."""

    INACTIVE = "the adapter is not active (never named by set_adapter / set_active_adapters / train_adapter)"
    OUTSIDE_FORWARD = "no gradient reached it: the adapter is outside the forward path"
    ALL_FACTORS_ZERO = "every parameter is zero (e.g. LoRA A and B both zero): each factor's gradient is zero"
    ZERO_GRADIENTS = "its gradients are all zero"


def dead_reason(unit: AdapterUnit, states: Sequence[str]) -> DeadReason:
    """Why a unit got no non-zero gradient, from what is visible."""
    if not unit.active:
        return DeadReason.INACTIVE
    if all(s == "none" for s in states):
        return DeadReason.OUTSIDE_FORWARD
    params = [p.param for p in unit.parts if p.param.requires_grad and p.param.device.type != "meta"]
    if params and all(torch.count_nonzero(p.detach()).item() == 0 for p in params):
        return DeadReason.ALL_FACTORS_ZERO
    return DeadReason.ZERO_GRADIENTS


def steps_past_layer_drop(model: nn.Module, miss: float = 1e-6) -> int:
    """Steps after which a layer that LayerDrop skips at random (HF configs: ``layerdrop``, ``encoder_layerdrop``,
    ``decoder_layerdrop``; the whole batch skips it) has been idle in every step with probability below ``miss``;
    0 without LayerDrop. A drop probability of 1 or more never ends."""
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return 0
    try:
        values = to_dict()
    except Exception:  # noqa: BLE001 - a config that cannot describe itself declares no LayerDrop
        return 0
    rates = []
    for entry in [values, *(v for v in values.values() if isinstance(v, dict))]:
        rates += [float(v) for k, v in entry.items() if "layerdrop" in str(k).lower()
                  and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0]
    if not rates:
        return 0
    rate = max(rates)
    return 10**9 if rate >= 1 else math.ceil(math.log(miss) / math.log(rate))


#: reasons that say a layer is idle (the forward pass does not use it, or reaches it with zero gradients)
#: rather than broken (inactive, or every factor zero)
IDLE_REASONS = frozenset({DeadReason.OUTSIDE_FORWARD, DeadReason.ZERO_GRADIENTS})

DEAD_HINTS: dict[DeadReason, str] = {
    DeadReason.INACTIVE: "activate the adapter (PEFT: model.set_adapter(name); adapters: model.train_adapter(name))",
    DeadReason.OUTSIDE_FORWARD: ("the adapter's layer is not used by the forward pass: check target_modules / the "
                                 "adapter's location, and that the model you train is the one the adapter was "
                                 "added to"),
    DeadReason.ALL_FACTORS_ZERO: ("initialise one factor randomly (PEFT: init_lora_weights=True or 'gaussian'); "
                                  "zeroing both A and B (or up and down) leaves the adapter at a saddle where no "
                                  "gradient flows"),
    DeadReason.ZERO_GRADIENTS: ("check the loss reaches this adapter's output, and that nothing zeroes or detaches "
                                "it (torch.no_grad, .detach(), a frozen branch)"),
}


# -- the check ---------------------------------------------------------------------------------------------------

def _names(parts: Iterable[AdapterPart]) -> list[str]:
    return list(dict.fromkeys(p.name for p in parts))


class AdapterInitCheck(Check):
    """Adapters whose init breaks their method's contract, frozen adapters, adapters that get no gradient."""

    name = "adapter_init"
    Config = AdapterInitConfig

    def __init__(self, config: AdapterInitConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.custom = dict(self.config.modules)
        self._units: list[AdapterUnit] | None = None
        self._model_id: int | None = None
        self.first_step: int | None = None
        self.nonzero: set[str] = set()
        self.flagged: set[str] = set()
        self.idle: list[list[str]] = []  # [adapter, layer, reason] of units idle at the first step
        self.unused_after = self.config.dead_after_steps
        self.dead_reported = False
        self.done = False
        self.loaded = False
        self.trained: dict[str, tuple[int, int]] = {}
        self.summary: dict[str, Any] = {}

    @property
    def fresh(self) -> bool:
        """Whether adapters are judged as freshly initialised (config ``fresh``, else: no load event seen)."""
        return self.config.fresh if self.config.fresh is not None else not self.loaded

    def on_load(self, ctx: EventContext) -> Iterable[Finding]:
        """A resume: the adapters hold trained values, so init contracts no longer apply."""
        self.loaded = True
        return []

    def units(self, model: nn.Module) -> list[AdapterUnit]:
        """Discovered adapter units of ``model`` (cached per model object)."""
        if self._units is None or self._model_id != id(model):
            self._units = discover_adapters(model, self.custom)
            self._model_id = id(model)
        return self._units

    # -- init ----------------------------------------------------------------------------------------------------
    def on_init(self, ctx: EventContext) -> Iterable[Finding]:
        """ADAPTER_INIT_WRONG, ADAPTER_NOT_TRAINABLE, ADAPTER_NOT_IDENTITY (probe), CHECK_NOT_APPLICABLE."""
        self._units = None
        units = self.units(ctx.model)
        self.summary = {"units": len(units), "methods": sorted({f"{u.library}:{u.method}" for u in units})}
        if not units:
            return []
        judge_trained = self.config.fresh is None and self.fresh
        violations: list[Violation] | None = None
        if any_partitioned(p.param for u in units for p in u.parts):
            # ZeRO-3 placeholders hold no values: judge each unit gathered (the probe's forward gathers itself)
            self.trained, violations = audit_partitioned(units, self.fresh, judge_trained)
        else:
            self.trained = trained_adapters(units) if judge_trained else {}
        findings = self._trained_findings(ctx)
        findings += self._init_findings(ctx, units, violations)
        findings += self._trainable_findings(ctx, units)
        findings += self._identity_findings(ctx, units)
        return findings

    def _fresh_units(self, units: Sequence[AdapterUnit]) -> list[AdapterUnit]:
        return [u for u in units if u.adapter not in self.trained] if self.fresh else []

    def _trained_findings(self, ctx: EventContext) -> list[Finding]:
        if not self.trained:
            return []
        listed = ", ".join(f"{a!r} ({k} of {n} layers)" for a, (k, n) in sorted(self.trained.items()))
        return [self.finding(
            "CHECK_NOT_APPLICABLE", ctx,
            message=f"adapter(s) {listed} hold trained values (the zero-initialised side is non-zero while the "
                    "random side still has its init distribution): judged as loaded (PeftModel.from_pretrained, "
                    "load_adapter, a resume), so the fresh-init contract and the identity probe do not apply; "
                    "non-finite values, dtype, device, trainability and dead adapters are still checked",
            hint="nothing to fix for a loaded adapter; if these adapters were just created, something wrote "
                 "their zero side (set checks.adapter_init.fresh: true to judge them as fresh)",
            adapters=sorted(self.trained))]

    def _init_findings(self, ctx: EventContext, units: Sequence[AdapterUnit],
                       violations: Sequence[Violation] | None = None) -> list[Finding]:
        groups: dict[tuple[str, str, str], list[Violation]] = {}
        if violations is None:
            violations = audit_units(units, fresh=self._fresh_units(units))
        for v in violations:
            groups.setdefault((v.unit.adapter, v.part.role, v.problem), []).append(v)
        findings = []
        for (adapter, role, problem), vs in groups.items():
            first = vs[0]
            contract = init_contract(first.unit)
            layers = list(dict.fromkeys(v.unit.layer for v in vs))
            where = first.unit.layer + (f" and {len(layers) - 1} more layer(s)" if len(layers) > 1 else "")
            message = (f"{first.unit.library} {first.unit.method} adapter {adapter!r}: {role} {problem} at {where} "
                       f"({contract.init}): found {first.found}, expected {first.expected}")
            findings.append(self.finding(
                "ADAPTER_INIT_WRONG", ctx, params=_names(v.part for v in vs), message=message,
                hint=fix_for(first.broken, first.unit), adapter=adapter, role=role, problem=problem,
                expected=first.expected, found={v.part.name: v.found for v in vs[:20]}, layers=layers[:20],
                init=contract.init))
        return findings

    def _trainable_findings(self, ctx: EventContext, units: Sequence[AdapterUnit]) -> list[Finding]:
        frozen: dict[str, list[AdapterPart]] = {}
        total: dict[str, int] = {}
        for unit in units:
            if not unit.active:
                continue
            total[unit.adapter] = total.get(unit.adapter, 0) + len(unit.parts)
            frozen.setdefault(unit.adapter, []).extend(p for p in unit.parts if not p.param.requires_grad)
        findings = []
        for adapter, parts in frozen.items():
            if not parts:
                continue
            library = next(u.library for u in units if u.adapter == adapter)
            hint = ("call model.train_adapter(name) (it unfreezes the adapter and freezes the base)"
                    if library == "adapters" else
                    "freeze the base before adding adapters, not after (model.requires_grad_(False) after "
                    "get_peft_model also freezes them); re-enable with model.set_adapter(name) or "
                    "p.requires_grad_(True) on the adapter parameters; PeftModel.from_pretrained needs "
                    "is_trainable=True to train")
            findings.append(self.finding(
                "ADAPTER_NOT_TRAINABLE", ctx, params=_names(parts),
                message=f"{len(parts)} of {total[adapter]} parameters of active adapter {adapter!r} have "
                        f"requires_grad=False (e.g. {parts[0].name}) while training runs",
                hint=hint, adapter=adapter))
        return findings

    def _identity_findings(self, ctx: EventContext, units: Sequence[AdapterUnit]) -> list[Finding]:
        if not self.config.probe or not self.fresh:
            return []
        probed = [u for u in units if u.active and u.library in ("peft", "adapters")]
        if not probed or any(u.adapter in self.trained for u in probed):
            return []  # a trained adapter changes the output by design (said in _trained_findings)
        unjudged: dict[str, str] = {}
        for unit in probed:
            contract = init_contract(unit)
            if contract.identity is not True:
                why = "promises a changed output" if contract.identity is False else \
                    "does not promise an unchanged model (base rewritten or contract unknown)"
                unjudged.setdefault(f"{unit.adapter} ({unit.library} {unit.method}, {contract.init})", why)
        if unjudged:
            listed = "; ".join(f"{k}: {v}" for k, v in unjudged.items())
            return [self.finding(
                "CHECK_NOT_APPLICABLE", ctx, message=f"identity probe not run: {listed}",
                hint="nothing to fix: this init is not meant to leave the output unchanged; the parameter checks "
                     "still ran", adapters=sorted(unjudged))]
        target = ctx.model if ctx.probe_batch is not None else probe_target(ctx.model)
        batch = probe_inputs(target, ctx.probe_batch) if target is not None else None
        if target is None or batch is None:
            return [self.finding(
                "CHECK_NOT_APPLICABLE", ctx, message="identity probe not run: no probe batch can be built from "
                "the model's config", hint="pass probe_batch={...} to dispatch('init', ...) to probe")]
        result = probe_identity(target, probed, batch)
        if result.skipped:
            hint = ("unmerge adapters before training to probe them" if "merged" in result.skipped else
                    "pass probe_batch={...} (a batch the model accepts) to dispatch('init', ...) to "
                    "probe; the parameter checks still ran")
            return [self.finding("CHECK_NOT_APPLICABLE", ctx, message=f"identity probe not run: {result.skipped}",
                                 hint=hint)]
        self.summary["probe_max_change"] = result.max_change
        limit = self.config.tolerance * max(result.reference_max or 0.0, torch.finfo(torch.float32).tiny)
        change = result.max_change
        if change is not None and not (change > limit or math.isnan(change)):
            return []
        adapters = sorted({u.adapter for u in probed})
        found = "NaN/Inf in the output" if change is None or math.isnan(change) else f"max |change| {change:.4g}"
        return [self.finding(
            "ADAPTER_NOT_IDENTITY", ctx, params=_names(p for u in probed for p in u.parts)[:50],
            message=f"fresh adapter(s) {', '.join(map(repr, adapters))} promise an unchanged output, but the "
                    f"model's output with adapters active vs disabled differs: {found} (tolerance {limit:.3g})",
            hint="look at the ADAPTER_INIT_WRONG findings for the parameter that broke the contract; if none, the "
                 "adapter's forward breaks it (e.g. DoRA on a base weight with an all-zero row divides 0/0): fix "
                 "the base weights or use plain LoRA", max_change=change, tolerance=limit, adapters=adapters)]

    # -- step ----------------------------------------------------------------------------------------------------
    def on_step(self, ctx: EventContext) -> Iterable[Finding]:
        """ADAPTER_DEAD at the first step (per unit) and after ``dead_after_steps`` steps (per parameter);
        ADAPTER_UNUSED instead for idle units while others train."""
        if ctx.phase != "before_optimizer" or self.done:
            return []
        units = [u for u in self.units(ctx.model) if any(p.param.requires_grad for p in u.parts)]
        if not units:
            self.done = True
            return []
        step = ctx.step or 0
        findings: list[Finding] = []
        trainable = [p for u in units for p in u.parts if p.param.requires_grad]
        if gradients_hidden(p.param for p in trainable):
            self.done = True  # the same at every later step: said once
            return [self.finding(
                "CHECK_NOT_APPLICABLE", ctx, params=(),
                message=f"dead adapters (ADAPTER_DEAD, ADAPTER_UNUSED) not checked: {GRADIENTS_HIDDEN_WHY}",
                hint="nothing to fix; the init contracts (a LoRA with A and B both zero is ADAPTER_INIT_WRONG), "
                     "the identity probe and trainability were checked at init")]
        states = shared_grad_state(trainable, grad_state(trainable))
        self.nonzero |= {n for n, s in states.items() if s == "nonzero"}
        if self.first_step is None:
            self.first_step = step
            self.unused_after = max(self.config.dead_after_steps, steps_past_layer_drop(ctx.model))
            dead: dict[tuple[str, str], list[AdapterUnit]] = {}
            for unit in units:
                unit_states = [states[p.name] for p in unit.parts if p.param.requires_grad]
                if "nonzero" not in unit_states:
                    dead.setdefault((unit.adapter, dead_reason(unit, unit_states)), []).append(unit)
            others_train = any(s == "nonzero" for s in states.values())
            for (adapter, reason), dead_units in dead.items():
                if others_train and reason in IDLE_REASONS:
                    # judged later: LayerDrop and data-dependent routing leave a used layer idle for a step
                    self.idle += [[adapter, u.layer, reason] for u in dead_units]
                    continue
                parts = [p for u in dead_units for p in u.parts if p.param.requires_grad]
                self.flagged |= {p.name for p in parts}
                layers = [u.layer for u in dead_units]
                findings.append(self.finding(
                    "ADAPTER_DEAD", ctx, params=_names(parts),
                    message=f"adapter {adapter!r}: no parameter received a non-zero gradient at step {step} in "
                            f"{len(layers)} layer(s) (e.g. {layers[0]}): {reason}",
                    hint=DEAD_HINTS[reason], adapter=adapter, layers=layers[:20], reason=reason))
        steps = step - self.first_step + 1
        idle_layers = {(adapter, layer) for adapter, layer, _ in self.idle}
        if steps >= self.config.dead_after_steps and not self.dead_reported:
            self.dead_reported = True
            never = [p for u in units if (u.adapter, u.layer) not in idle_layers for p in u.parts
                     if p.param.requires_grad and p.name not in self.nonzero and p.name not in self.flagged]
            by_adapter: dict[str, list[AdapterPart]] = {}
            unit_of = {p.name: u for u in units for p in u.parts}
            for part in never:
                by_adapter.setdefault(unit_of[part.name].adapter, []).append(part)
            for adapter, parts in by_adapter.items():
                findings.append(self.finding(
                    "ADAPTER_DEAD", ctx, params=_names(parts),
                    message=f"adapter {adapter!r}: {len(parts)} trainable parameter(s) (e.g. {parts[0].name}) "
                            f"received no non-zero gradient in {steps} steps",
                    hint=DEAD_HINTS[DeadReason.ZERO_GRADIENTS], adapter=adapter))
        if steps >= self.unused_after or (self.dead_reported and not self.idle):
            self.done = True
            by_key = {(u.adapter, u.layer): u for u in units}
            still: dict[tuple[str, str], list[AdapterUnit]] = {}
            for adapter, layer, reason in self.idle:
                unit = by_key.get((adapter, layer))
                if unit is not None and not any(p.name in self.nonzero for p in unit.parts):
                    still.setdefault((adapter, reason), []).append(unit)
            for (adapter, reason), idle_units in still.items():
                parts = [p for u in idle_units for p in u.parts if p.param.requires_grad]
                findings.append(self._unused_finding(ctx, adapter, idle_units, parts, reason, steps))
        return findings

    def _unused_finding(self, ctx: EventContext, adapter: str, units: Sequence[AdapterUnit],
                        parts: Sequence[AdapterPart], reason: str, steps: int) -> Finding:
        layers = [u.layer for u in units]
        modules = sorted({layer.rsplit(".", 1)[-1] for layer in layers})
        shown = ", ".join(layers[:5]) + (f" and {len(layers) - 5} more" if len(layers) > 5 else "")
        return self.finding(
            "ADAPTER_UNUSED", ctx, params=_names(parts),
            message=f"adapter {adapter!r}: {len(layers)} layer(s) got no gradient in {steps} step(s) while the "
                    f"model's other adapters train ({shown}): {reason}; they cost memory and are saved, but "
                    "never learn",
            hint=f"leave those modules out of target_modules (e.g. exclude_modules={modules!r}), or make the "
                 "task's forward use them if they should train", adapter=adapter, layers=layers[:20],
            reason=reason, modules=modules)

    # -- report and state ----------------------------------------------------------------------------------------
    def report_section(self) -> dict[str, Any] | None:
        """Units found, methods, and the probe's measured output change."""
        return dict(self.summary) if self.summary else None

    def state_dict(self) -> dict[str, Any]:
        """Step bookkeeping of the dead-adapter check (plain data)."""
        return {"first_step": self.first_step, "nonzero": sorted(self.nonzero), "flagged": sorted(self.flagged),
                "idle": [list(entry) for entry in self.idle], "unused_after": self.unused_after,
                "dead_reported": self.dead_reported, "done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a resume: from here on the adapters are not judged as fresh)."""
        self.first_step = state.get("first_step")
        self.nonzero = set(state.get("nonzero", ()))
        self.flagged = set(state.get("flagged", ()))
        self.idle = [list(entry) for entry in state.get("idle", ())]
        self.unused_after = int(state.get("unused_after", self.config.dead_after_steps))
        self.dead_reported = bool(state.get("dead_reported", self.done))
        self.done = bool(state.get("done", False))
        self.loaded = True  # state is restored only on resume: the adapters hold trained values
