"""The hash check: bitwise fingerprints of gradients and parameters prove frozen weights stayed frozen,
data-parallel replicas agree, tied copies agree, and locate run-to-run divergence.

Codes: ``FROZEN_CHANGED``, ``GRAD_NONFINITE``, ``GRAD_REPLICA_MISMATCH``, ``PARAM_REPLICA_MISMATCH``,
``TIE_DIVERGED``; and the hash ledger (``ledger: PATH``) that ``python -m callbacks diff`` compares.

What runs when (the defaults keep a single-process CPU step cheap):

* every step, before the optimizer: ``GRAD_NONFINITE`` from one ``torch._foreach_norm`` over the gradients
  of the optimizer's parameters and a single ``isfinite`` sync; tensors are counted and named only when that
  flags something. Under the fused Triton backend the counts come from the hashing pass itself. The optimizer's
  parameters are also scanned for newly frozen ones (an id-set comparison; no walk of the module tree).
* gradients (before the optimizer) and trainable parameters (after it) are hashed every ``every_n_steps`` only
  when something consumes the hashes: replicas under torch.distributed with world size > 1, or a ledger.
* frozen parameters (``requires_grad=False``) are hashed when first seen frozen (at init, or before the step
  where they became frozen) and re-hashed every ``frozen_every_n_steps`` and at ``end``.
* ``tied_copies`` groups are hashed at init, every ``every_n_steps`` after the optimizer, and at ``end``.

Gradients are hashed at the ``before_optimizer`` phase, i.e. after DDP's all-reduce or FSDP2's reduce-scatter
(never in a parameter hook, which fires before it). Under FSDP2 (DTensor parameters, ``fully_shard``) each rank
hashes its local shards and compares them only with the ranks that hold the same shard: the ranks along the mesh
dimensions where the tensor is ``Replicate`` (the replicate dimension of HSDP), through one bounded gloo subgroup
per group built at init. Pure FSDP shards differ by design and are never compared (one ``CHECK_NOT_APPLICABLE``
info at init says so). FSDP1 flat parameters are not compared. Which ranks are compared and the bounded
exchange itself belong to :class:`~callbacks.primitives.collectives.ReplicaComparator`; this check decides when
and what to hash and which findings to make.

DeepSpeed ZeRO (see :mod:`callbacks.primitives.zero`): gradients never sit on ``param.grad`` and, under HF /
accelerate, are consumed and cleared by ``engine.step()`` inside ``accelerator.backward``, before the
``before_optimizer`` event. Gradient hashes then say ``CHECK_NOT_APPLICABLE`` once (the report says gradients were
not compared), and ``GRAD_NONFINITE`` comes from DeepSpeed's own overflow verdict on the step, read after it.
ZeRO-1/2 parameters are replicated after the step and compared; ZeRO-3 partitions every parameter, so replicas
are not compared (``CHECK_NOT_APPLICABLE``) and frozen weights are hashed by each rank's own shard.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from callbacks.checks.base import Check, CheckConfig, ReportedOnce
from callbacks.events import EventContext
from callbacks.facts import UnknownName, closest_names, name_not_found, resolve_name
from callbacks.findings import Finding
from callbacks.hashing import hash_tensors, hash_with_stats, resolve_backend
from callbacks.hashing.ledger import LedgerWriter, hex64
from callbacks.primitives.collectives import (
    Comparison,
    ExchangeTag,
    ReplicaComparator,
    disagreeing_ranks,
    distributed_rank,
    distributed_world,
)
from callbacks.primitives.naming import local_tensor, named_parameters_all, unwrap_model, user_name
from callbacks.primitives.optimizers import held_parameters
from callbacks.primitives.zero import (
    GRADIENTS_HIDDEN_WHY,
    any_partitioned,
    dynamic_loss_scale,
    gradients_hidden,
    is_partitioned,
    local_values,
    overflow_checked,
    step_overflowed,
)


class HashConfig(CheckConfig):
    """Recipe section checks.hashes: gradient and weight hashes (replicas, frozen weights, ledger).

    ``every_n_steps``: cadence of gradient/parameter hashing for replicas, the ledger and tied copies.
    ``frozen_every_n_steps``: cadence of the frozen re-hash (also done at ``end``). ``replicas``: compare hashes
    across data-parallel ranks (only under torch.distributed with world size > 1). ``frozen``: FROZEN_CHANGED.
    ``nonfinite``: GRAD_NONFINITE every step. ``tied_copies``: groups of parameter names kept in separate storage
    that must hold equal values (TIE_DIVERGED). ``ledger``: JSON-lines path of the hash ledger. ``backend``:
    hash backend. ``timeout_s``: bound on every replica exchange.
    """

    every_n_steps: int = Field(1, ge=1, description="steps between gradient/parameter hashes (replicas, ledger, "
                               "tied copies)")
    frozen_every_n_steps: int = Field(50, ge=1, description="steps between re-hashes of frozen weights (also "
                                      "done at the end)")
    replicas: bool = Field(True, description="compare hashes across data-parallel ranks (world size > 1)")
    frozen: bool = Field(True, description="report frozen weights that changed (FROZEN_CHANGED)")
    nonfinite: bool = Field(True, description="report NaN/Inf gradients every step (GRAD_NONFINITE)")
    tied_copies: list[list[str]] = Field(default_factory=list, description="groups of names kept in separate "
                                         "storage that must hold equal values (TIE_DIVERGED)")
    ledger: str | None = Field(None, description="JSON-lines path of the hash ledger (compare runs with diff)")
    backend: Literal["auto", "torch", "triton"] = Field("auto", description="hash backend: triton is the fused "
                                                        "GPU kernel, auto picks it on CUDA")
    timeout_s: float = Field(60.0, gt=0, description="bound in seconds on every replica exchange")

    @field_validator("tied_copies")
    @classmethod
    def _groups_have_two_names(cls, value: list[list[str]]) -> list[list[str]]:
        for group in value:
            if len(set(group)) < 2:
                raise ValueError(f"each tied_copies group needs at least two different names, got {group}")
        return value


HINT_FROZEN = (
    "something writes to a parameter meant to be frozen: an optimizer that still holds it (a param frozen after "
    "training started keeps a stale zero grad under zero_grad(set_to_none=False), so Adam momentum and weight "
    "decay keep moving it), an in-place hook or manual update, or a load into the module. Build the optimizer "
    "over trainable parameters only (or remove the param from its groups when freezing) and set grads to None")
HINT_NONFINITE = (
    "find the first NaN/Inf: lower the learning rate, enable gradient clipping, check the loss for log(0) or "
    "division by zero, use bf16 instead of fp16 or a GradScaler, and look for bad samples in this batch")
HINT_GRAD_REPLICA = (
    "a rank changed its gradients after the all-reduce (rank-dependent code in a hook or callback, per-rank "
    "clipping) or a gradient was not synchronised (no_sync on one rank, unused parameters, a parameter left outside "
    "every DDP/fully_shard wrap): make every post-reduction gradient operation identical on every rank and shard "
    "or wrap every trainable parameter")
HINT_PARAM_REPLICA = (
    "parameters were changed on one rank outside the synchronised update (rank-dependent code, a per-rank load "
    "or resume, different optimizer state) or replicas started from different weights: broadcast from rank 0 "
    "and remove rank-dependent writes to parameters")
HINT_TIE_DIVERGED = (
    "the copies of a tie kept in separate storage are no longer synchronised: copy the updated value to the other "
    "copies after every optimizer step (or sum their gradients before it), or tie them by sharing one tensor")


def hashable(tensor: torch.Tensor | None) -> bool:
    """Whether a tensor has bytes to hash (not None, not on the meta device)."""
    return tensor is not None and tensor.device.type != "meta"


def named_unique_parameters(model: Any) -> list[tuple[str, nn.Parameter]]:
    """(user name, parameter) for each parameter object once, in model order (a tie is hashed once)."""
    inner = unwrap_model(model)
    return [(user_name(raw), p) for raw, p in inner.named_parameters()]


def is_dtensor(tensor: Any) -> bool:
    """Whether a tensor (or a parameter's data) is a DTensor (FSDP2 ``fully_shard``, tensor parallel)."""
    return type(tensor).__name__ == "DTensor" or type(getattr(tensor, "data", None)).__name__ == "DTensor"


def is_sharded(model: Any, params: Sequence[tuple[str, nn.Parameter]]) -> bool:
    """Whether parameters are sharded across ranks (FSDP2 DTensors, FSDP1 flat parameters)."""
    if any(is_dtensor(p) for _, p in params):
        return True
    modules = model.modules() if isinstance(model, nn.Module) else ()
    return any(type(m).__name__ == "FullyShardedDataParallel" for m in modules)


def holds_rank_local_shards(tensors: Iterable[Any]) -> bool:
    """Whether hashes of ``tensors`` describe this rank's own shards (ZeRO-3 partitions, DTensors) in a
    multi-process job, so that no other rank's hashes of the same names are comparable with them."""
    return distributed_world()[1] > 1 and any(is_partitioned(t) or is_dtensor(t) for t in tensors)


def is_partial(tensor: Any) -> bool:
    """Whether a DTensor holds unreduced partial sums on some mesh dimension (never comparable across ranks)."""
    return any(p.is_partial() for p in getattr(tensor, "placements", ()) or ())


def hash_or_none(tensors: Sequence[torch.Tensor | None], backend: str) -> list[int | None]:
    """Hashes of tensors, ``None`` for missing or meta ones; one backend call for all present ones.

    A DeepSpeed ZeRO-3 parameter is hashed by this rank's shard (``ds_tensor``): its ``data`` is an empty
    placeholder between forward passes and full while gathered, so only the shard is the same thing at every
    event (enough for FROZEN_CHANGED and the ledger; shards are never compared across ranks)."""
    present = [i for i, t in enumerate(tensors) if hashable(t)]
    values = hash_tensors([local_tensor(local_values(tensors[i])) for i in present],
                          backend=backend) if present else []
    out: list[int | None] = [None] * len(tensors)
    for i, value in zip(present, values, strict=True):
        out[i] = value
    return out


def nonfinite_counts(grads: Sequence[torch.Tensor]) -> dict[int, int]:
    """index -> number of NaN/Inf elements, for the gradients that hold any (empty when all are finite).

    Cheap path: one ``torch._foreach_norm`` over the list and one ``isfinite`` of the stacked norms (a single
    host sync). A 2-norm is non-finite when an element is (NaN and Inf propagate); a finite tensor whose norm
    overflows is flagged too, so flagged tensors are counted exactly and only those with a real NaN/Inf are kept.
    """
    if not grads:
        return {}
    norms = torch._foreach_norm(list(grads))
    try:
        flags = torch.isfinite(torch.stack(norms)).tolist()
    except RuntimeError:  # norms on several devices: one sync per device
        flags = [bool(torch.isfinite(n)) for n in norms]
    out: dict[int, int] = {}
    for i, finite in enumerate(flags):
        if not finite:
            count = int((~torch.isfinite(grads[i].detach())).sum().item())
            if count:
                out[i] = count
    return out


def optimizer_parameters(optimizer: Any) -> list[torch.Tensor] | None:
    """The parameters an optimizer updates (:func:`~callbacks.primitives.optimizers.held_parameters`, which
    reads a DeepSpeed optimizer's model-parameter groups, not its flat fp32 partitions), or None when there is no
    optimizer to read."""
    held = held_parameters([optimizer]) if optimizer is not None else None
    return held.params if held is not None and held.params else None


def loss_scaled(ctx: EventContext) -> bool:
    """Whether a dynamic loss scaler (which skips steps with non-finite gradients) is in use."""
    if ctx.grad_scaler is not None:
        return True
    if dynamic_loss_scale(ctx.optimizer):
        return True
    scaler = getattr(ctx.optimizer, "scaler", None)
    return scaler is not None and bool(getattr(scaler, "is_enabled", lambda: True)())


class HashCheck(Check):
    """Bitwise fingerprints of gradients and parameters: FROZEN_CHANGED, GRAD_NONFINITE, replica mismatches,
    TIE_DIVERGED, and the hash ledger."""

    name = "hashes"
    Config = HashConfig

    def __init__(self, config: HashConfig | None = None, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.config: HashConfig
        #: frozen parameter (user name) -> [hash, step at which it was recorded]
        self.frozen_baseline: dict[str, list[Any]] = {}
        self.frozen_verified_step = 0
        #: names reported per code: FROZEN_CHANGED once for the run, the others again only after they recover
        self.reported = ReportedOnce()
        #: which ranks hold equal copies and the bounded exchange among them; set up at init
        self.comparator = ReplicaComparator(self.config.timeout_s)
        self.ledger: LedgerWriter | None = None
        self.resumed = False
        #: ids of the frozen parameters seen at the last step (new ones get a baseline)
        self._frozen_seen: set[int] = set()
        #: why gradients cannot be read here (DeepSpeed holds and clears them), once seen; said once
        self.gradients_unseen: str | None = None
        #: whether frozen baselines hash this rank's own shards (ZeRO-3, FSDP), so only this rank can use them
        self.frozen_local = False

    # -- helpers ----------------------------------------------------------------------------------------------
    def _hash_due(self, step: int | None) -> bool:
        """Whether gradients/parameters are hashed at ``step`` (someone consumes the hashes and the cadence hits)."""
        consumers = self.comparator.active or self.ledger is not None
        return consumers and step is not None and step % self.config.every_n_steps == 0

    def _exchange(self, names: Sequence[str], tensors: Sequence[torch.Tensor | None], compute,
                  not_comparable: Iterable[int] = (), tag: ExchangeTag | None = None
                  ) -> tuple[list[int | None] | None, list[Comparison]]:
        """Hash locally with ``compute`` and, when replicas are compared, compare the hashes within each group of
        ranks that hold equal copies of ``tensors`` (see :meth:`ReplicaComparator.compare`).

        Returns (local hashes, comparisons). A local failure still takes part in the exchanges (so no rank waits
        for it) and is re-raised afterwards. ``not_comparable`` indices (unreduced partial gradients) never
        mismatch. ``tag`` names the exchange (step, what), so ranks out of step are never compared.
        """
        error: BaseException | None = None
        hashes: list[int | None] | None = None
        try:
            hashes = compute()
        except Exception as err:  # re-raised below, after the collectives every rank expects
            error = err
        comparisons: list[Comparison] = []
        if self.comparator.active:
            comparisons = self.comparator.compare(
                names, hashes, [tuple(local_tensor(t).shape) if t is not None else () for t in tensors],
                [self.comparator.partition(t) for t in tensors], skip=not_comparable, tag=tag)
        if error is not None:
            raise error
        return hashes, comparisons

    def _replica_findings(self, code: str, ctx: EventContext, comparisons: Sequence[Comparison],
                          what: str) -> list[Finding]:
        """``code`` (GRAD_/PARAM_REPLICA_MISMATCH) for tensors whose hashes differ within a group of ranks, and
        CHECK_NOT_APPLICABLE for a group whose ranks turned out not to be replicas (compared no more)."""
        findings: list[Finding] = []
        mismatched: dict[str, dict[int, int]] = {}
        group_of: dict[str, list[int]] = {}
        for comparison in comparisons:
            if comparison.status == "failed":
                continue  # the failing rank reports CHECK_FAILED itself
            if comparison.status == "sequence":
                tags = comparison.exchange.tags
                findings.append(self.finding(
                    "CHECK_FAILED", ctx, params=(),
                    message=f"replica exchange out of step: ranks {comparison.ranks} were at different exchanges ("
                            + ", ".join(f"rank {r}: {t}" for r, t in zip(comparison.ranks, tags, strict=True))
                            + "), so their hashes were not compared; replica comparison is off from here",
                    hint="a rank skipped an exchange (its hashes check failed or its hook did not run at this "
                         "step): look for an earlier CHECK_FAILED on that rank; the training itself is not judged",
                    ranks=comparison.ranks, tags=[str(t) for t in tags]))
                continue
            if comparison.status == "layout":
                counts = comparison.exchange.counts
                findings.append(self.finding(
                    "CHECK_NOT_APPLICABLE", ctx, params=(),
                    message=f"ranks {comparison.ranks} hold different {what} layouts (tensor counts per rank: "
                            f"{counts}), so they are not data-parallel replicas; replica comparison among "
                            "them is off from here",
                    hint="for pipeline stages or other model-parallel layouts set hashes.replicas: false (and declare "
                         "copies of a tie kept on different stages in hashes.tied_copies); under plain DDP every "
                         "rank must build the same model",
                    counts=counts, ranks=comparison.ranks))
                continue
            for name, by_rank in comparison.mismatches.items():
                mismatched[name] = by_rank
                group_of[name] = comparison.ranks
        new = self.reported.new(code, mismatched)
        if not new:
            return findings
        parts, details = [], {}
        for name in new:
            by_rank = mismatched[name]
            ranks = list(by_rank)
            _, differing = disagreeing_ranks(list(by_rank.values()))
            if len(by_rank) == 2:
                parts.append(f"{name} (ranks {ranks[0]} and {ranks[1]} disagree)")
            else:
                parts.append(f"{name} (ranks {[ranks[i] for i in differing]} differ from the others)")
            details[name] = {str(r): hex64(v) for r, v in by_rank.items()}
        shown = "; ".join(parts[:6]) + (f"; +{len(parts) - 6} more" if len(parts) > 6 else "")
        if self.comparator.sharded:
            groups = sorted({tuple(group_of[n]) for n in new})
            where = (f"between ranks that hold the same shard or copy (replicate group{'s' if len(groups) > 1 else ''} "
                     f"{', '.join(str(list(g)) for g in groups)})")
        else:
            where = f"across {len(next(iter(mismatched.values())))} data-parallel ranks"
        findings.append(self.finding(
            code, ctx, params=new,
            message=f"{what} hashes differ {where} for {len(new)} tensor(s): {shown}",
            hint=HINT_GRAD_REPLICA if code == "GRAD_REPLICA_MISMATCH" else HINT_PARAM_REPLICA,
            hashes_by_rank=details, ranks=sorted({int(r) for d in details.values() for r in d}),
            replicate_groups={n: group_of[n] for n in new}))
        return findings

    # -- events -----------------------------------------------------------------------------------------------
    def on_load(self, ctx: EventContext) -> Iterable[Finding]:
        """Remember the run was resumed: its ledger is appended to."""
        self.resumed = True
        return ()

    def on_init(self, ctx: EventContext) -> Iterable[Finding]:
        """Set up the replica comparison, baseline the frozen parameters, compare the initial parameters across
        replicas and the tied copies, and open the ledger."""
        params = named_unique_parameters(ctx.model)
        findings: list[Finding] = []
        if not self.comparator.connected:  # once: creating its groups is a collective every rank runs here
            findings += self._set_up_replicas(ctx, params)
        if self.config.ledger and self.ledger is None:
            self.ledger = LedgerWriter(self.config.ledger, rank=self.comparator.rank, append=self.resumed)
        names = [n for n, _ in params]
        tensors = [p for _, p in params]
        need_all = self.comparator.active or self.ledger is not None
        frozen_idx = [i for i, (_, p) in enumerate(params) if not p.requires_grad] if self.config.frozen else []
        to_hash = list(range(len(params))) if need_all else frozen_idx
        hashes, comparisons = self._exchange(
            names, tensors, lambda: self._hash_indices(tensors, to_hash, len(params)),
            tag=ExchangeTag(ctx.step, f"parameters at {ctx.event}"))
        findings += self._replica_findings("PARAM_REPLICA_MISMATCH", ctx, comparisons, "initial parameter")
        if self.ledger is not None:
            self.ledger.write(ctx.step or 0, "param", names, hashes)
        if self.config.frozen:
            self.frozen_local = self.frozen_local or holds_rank_local_shards(tensors[i] for i in frozen_idx)
            findings += self._compare_frozen(ctx, {names[i]: hashes[i] for i in frozen_idx}, record_new=True)
        findings += self._tied_copies(ctx, params, validate=True)
        return findings

    def _set_up_replicas(self, ctx: EventContext, params: Sequence[tuple[str, nn.Parameter]]) -> list[Finding]:
        """A comparator for this model and configuration; under torch.distributed it creates its bounded groups
        (a collective: every rank decides alike, from the configuration and the model's layout, at init).

        With nothing to compare (pure FSDP), one info says so.
        """
        sharded = distributed_world()[1] > 1 and is_sharded(ctx.model, params)
        comparator = self.comparator = ReplicaComparator(self.config.timeout_s, sharded=sharded)
        if not comparator.distributed:
            return []
        if not self.config.replicas:
            comparator.disable("not compared (replicas: false)")
        elif sharded and not any(is_dtensor(p) for _, p in params):
            comparator.disable("parameters are sharded as FSDP1 flat parameters: not compared (use FSDP2 "
                               "fully_shard, whose DTensor shards are compared within replicate groups)")
        zero3 = comparator.note is None and any_partitioned(p for _, p in params)
        if zero3:
            comparator.disable("not compared: DeepSpeed ZeRO-3 partitions every parameter, each rank holds "
                               "different shards by design")
        if comparator.note is None or self.config.tied_copies:
            comparator.connect()  # tied copies on other ranks are gathered through the group of all ranks
        if zero3:
            return [self.finding(
                "CHECK_NOT_APPLICABLE", ctx, params=(),
                message="replica hashes are not compared: DeepSpeed ZeRO-3 partitions every parameter (and its "
                        "gradient), so no two ranks hold the same shard; comparing full tensors would mean "
                        "gathering the whole model at every step",
                hint="nothing to fix; frozen parameters are still verified on each rank's own shards, and "
                     "ZeRO-1/2 (replicated parameters) are compared")]
        if comparator.note is not None:
            return []
        union = comparator.plan(comparator.partition(p) for _, p in params)
        if comparator.active:
            return []
        comparator.disable("not compared: parameters are sharded with no replicate dimension (pure FSDP), each "
                           "rank holds different shards by design")
        return [self.finding(
            "CHECK_NOT_APPLICABLE", ctx, params=(),
            message="replica hashes are not compared: every parameter is sharded with no replicate mesh dimension "
                    "(pure FSDP), so no two ranks hold the same shard; shards differ by design",
            hint="nothing to fix; to compare replicas under FSDP2 use HSDP (a 2-D mesh with a replicate dimension)",
            partitions=[[list(g) for g in p] for p in union])]

    def _hash_indices(self, tensors: Sequence[torch.Tensor | None], indices: Sequence[int],
                      total: int) -> list[int | None]:
        picked = hash_or_none([tensors[i] for i in indices], self.config.backend)
        out: list[int | None] = [None] * total
        for i, value in zip(indices, picked, strict=True):
            out[i] = value
        return out

    def on_step(self, ctx: EventContext) -> Iterable[Finding]:
        """Gradients and newly frozen parameters before the optimizer; parameters and tied copies after it."""
        if ctx.phase == "before_optimizer":
            return self._before_optimizer(ctx)
        return self._after_optimizer(ctx)

    def _before_optimizer(self, ctx: EventContext) -> list[Finding]:
        findings: list[Finding] = []
        hash_due = self._hash_due(ctx.step)
        opt_params = optimizer_parameters(ctx.optimizer)
        # walking the module tree costs more than the rest of a tiny step: only where names are needed
        params = named_unique_parameters(ctx.model) if hash_due or opt_params is None else None
        candidates = opt_params if opt_params is not None else [p for _, p in params]
        if self.config.frozen:
            self._baseline_newly_frozen(ctx, candidates)
        if gradients_hidden(p for p in candidates if p.requires_grad):
            # every rank of a DeepSpeed job decides alike: none of them takes part in the gradient exchange
            return findings + self._gradients_hidden(ctx)
        stats_nonfinite: dict[str, int] | None = None
        if hash_due:
            names = [n for n, _ in params]
            grads = [p.grad for _, p in params]
            present = [i for i, g in enumerate(grads) if hashable(g)]
            local = [local_tensor(grads[i]) for i in present]

            def compute() -> list[int | None]:
                nonlocal stats_nonfinite
                out: list[int | None] = [None] * len(grads)
                if not local:
                    return out
                if resolve_backend(self.config.backend, local) == "triton":
                    stats = hash_with_stats(local, backend="triton")  # NaN/Inf counts from the same pass
                    stats_nonfinite = {names[i]: c for i, c in zip(present, stats.nonfinite, strict=True) if c}
                    values = stats.hashes
                else:
                    values = hash_tensors(local, backend=self.config.backend)
                for i, value in zip(present, values, strict=True):
                    out[i] = value
                return out

            # the layout key is built from the parameters: a gradient missing on one rank is a mismatch, not a layout
            partial = [i for i in present if is_partial(grads[i])]
            hashes, comparisons = self._exchange(names, [p for _, p in params], compute, not_comparable=partial,
                                                 tag=ExchangeTag(ctx.step, "gradients before the optimizer step"))
            findings += self._replica_findings("GRAD_REPLICA_MISMATCH", ctx, comparisons, "gradient")
            if self.ledger is not None:
                self.ledger.write(ctx.step, "grad", names, hashes, clipped=ctx.grads_clipped)
        if self.config.nonfinite:
            if stats_nonfinite is None:
                with_grad = [p for p in candidates if p.grad is not None]
                grads = [p.grad for p in with_grad]
                if self.comparator.sharded:
                    grads = [local_tensor(g) for g in grads]
                flagged = nonfinite_counts([g for g in grads if g.device.type != "meta"])
                stats_nonfinite = {}
                if flagged:
                    name_of = self._names_by_id(ctx.model)
                    stats_nonfinite = {name_of.get(id(with_grad[i]), f"<unnamed #{i}>"): c
                                       for i, c in flagged.items()}
            findings += self._nonfinite_findings(ctx, stats_nonfinite)
        return findings

    def _gradients_hidden(self, ctx: EventContext) -> list[Finding]:
        """Under DeepSpeed the gradients are not on ``.grad`` (and under HF / accelerate already consumed): one
        CHECK_NOT_APPLICABLE naming what is not checked and why. NaN/Inf gradients are then judged after the
        optimizer step, from DeepSpeed's own verdict (:meth:`_deepspeed_overflow`)."""
        if self.gradients_unseen is not None:
            return []
        self.gradients_unseen = GRADIENTS_HIDDEN_WHY
        checked = overflow_checked(ctx.optimizer)
        unseen = ["gradient hashes (replicas, ledger)"]
        if self.config.nonfinite:
            unseen.append("per-tensor NaN/Inf counts" if checked else "NaN/Inf gradients (GRAD_NONFINITE)")
        tail = ""
        if self.config.nonfinite:
            tail = ("; NaN/Inf gradients are still reported from DeepSpeed's overflow check of each step" if checked
                    else "; DeepSpeed itself does not check this configuration's gradients for NaN/Inf (ZeRO-1/2 "
                         "bf16 without bf16.check_grad_overflow, or an optimizer this check does not know)")
        return [self.finding(
            "CHECK_NOT_APPLICABLE", ctx, params=(),
            message=f"{' and '.join(unseen)} not checked: {GRADIENTS_HIDDEN_WHY}{tail}",
            hint="nothing to fix; under ZeRO-1/2 parameters are still compared across ranks after the optimizer "
                 "step, and frozen weights are verified under every stage", unseen=unseen)]

    def _deepspeed_overflow(self, ctx: EventContext) -> list[Finding]:
        """GRAD_NONFINITE from DeepSpeed's overflow flag, read after the optimizer step: DeepSpeed sets it in
        ``engine.step`` for the step that just ran (under HF before on_pre_optimizer_step, under a loop that
        steps the engine between the two phases in between), so after the step it always belongs to this step.
        Reported again only after a step without overflow."""
        if self.gradients_unseen is None or not self.config.nonfinite or not overflow_checked(ctx.optimizer):
            return []
        overflow = step_overflowed(ctx.optimizer)
        key = "<gradients held by DeepSpeed>"
        new = self.reported.new("GRAD_NONFINITE/deepspeed", [key] if overflow else [])
        if not new:
            return []
        findings: list[Finding] = []
        scaled = loss_scaled(ctx)
        message = (f"DeepSpeed found non-finite gradients (NaN/Inf, or a non-finite gradient norm) in step {ctx.step} "
                   "and skipped the step: its overflow check, run in engine.step; which tensors is not visible here "
                   "(the gradients were cleared with the step)")
        if scaled:
            message += "; a dynamic loss scale is in use and lowers the scale (repeated skips mean a real problem)"
        findings.append(self.finding("GRAD_NONFINITE", ctx, params=(), message=message, hint=HINT_NONFINITE,
                                     severity="warning" if scaled else None, source="deepspeed overflow",
                                     grads_clipped=ctx.grads_clipped))
        return findings

    @staticmethod
    def _names_by_id(model: Any) -> dict[int, str]:
        return {id(p): n for n, p in named_unique_parameters(model)}

    def _baseline_newly_frozen(self, ctx: EventContext, candidates: Sequence[torch.Tensor]) -> None:
        """Frozen parameters not seen frozen before get their baseline now, before this step can move them.

        ``candidates`` are the optimizer's parameters when known (a frozen one there is exactly what a step can
        still move); the set comparison is cheap, names are looked up only when something new is frozen.
        """
        frozen_now = {id(p) for p in candidates if not p.requires_grad}
        if not frozen_now or frozen_now <= self._frozen_seen:
            self._frozen_seen = frozen_now
            return
        self._frozen_seen = frozen_now
        new = [(n, p) for n, p in named_unique_parameters(ctx.model)
               if id(p) in frozen_now and n not in self.frozen_baseline]
        if new:
            self.frozen_local = self.frozen_local or holds_rank_local_shards(p for _, p in new)
            values = hash_or_none([p for _, p in new], self.config.backend)
            for (n, _), value in zip(new, values, strict=True):
                self.frozen_baseline[n] = [value, (ctx.step or 1) - 1]  # as of after the previous step

    def _nonfinite_findings(self, ctx: EventContext, counts: dict[str, int]) -> list[Finding]:
        new = self.reported.new("GRAD_NONFINITE", counts)
        if not new:
            return []
        scaled = loss_scaled(ctx)
        shown = ", ".join(f"{n} ({counts[n]} NaN/Inf)" for n in new[:6]) + (
            f", +{len(new) - 6} more" if len(new) > 6 else "")
        message = f"non-finite gradients in {len(new)} tensor(s) before the optimizer step: {shown}"
        if scaled:
            message += "; a dynamic loss scaler is in use and skips this step (repeated skips mean a real problem)"
        # under a loss scaler an overflow step is skipped by design: a warning, not an error
        return [self.finding("GRAD_NONFINITE", ctx, params=new, message=message, hint=HINT_NONFINITE,
                             severity="warning" if scaled else None, counts={n: counts[n] for n in new},
                             grads_clipped=ctx.grads_clipped)]

    def _after_optimizer(self, ctx: EventContext) -> list[Finding]:
        findings: list[Finding] = self._deepspeed_overflow(ctx)
        step = ctx.step
        frozen_due = self.config.frozen and step is not None and step % self.config.frozen_every_n_steps == 0
        hash_due = self._hash_due(step)
        if not (frozen_due or hash_due or (self.config.tied_copies and step is not None
                                          and step % self.config.every_n_steps == 0)):
            return findings
        params = named_unique_parameters(ctx.model)
        names = [n for n, _ in params]
        tensors = [p for _, p in params]
        trainable = [i for i, (_, p) in enumerate(params) if p.requires_grad]
        frozen = [i for i, (_, p) in enumerate(params) if not p.requires_grad]
        if hash_due or frozen_due:
            indices = (trainable if hash_due else []) + (frozen if frozen_due else [])
            # every rank decides from the step alone, so all of them exchange the same layout at the same step
            ex_names = [names[i] for i in indices]
            ex_tensors = [tensors[i] for i in indices]
            hashes, comparisons = self._exchange(
                ex_names, ex_tensors, lambda: hash_or_none(ex_tensors, self.config.backend),
                tag=ExchangeTag(step, "parameters after the optimizer step"))
            by_name = dict(zip(ex_names, hashes, strict=True))
            findings += self._replica_findings("PARAM_REPLICA_MISMATCH", ctx, comparisons, "parameter")
            if self.ledger is not None and hash_due:
                self.ledger.write(step, "param", [names[i] for i in trainable], [by_name[names[i]] for i in trainable])
            if frozen_due:
                frozen_hashes = {names[i]: by_name[names[i]] for i in frozen}
                if self.ledger is not None:
                    self.ledger.write(step, "frozen", list(frozen_hashes), list(frozen_hashes.values()))
                findings += self._compare_frozen(ctx, frozen_hashes, record_new=True)
        if self.config.tied_copies and step is not None and step % self.config.every_n_steps == 0:
            findings += self._tied_copies(ctx, params)
        return findings

    def on_end(self, ctx: EventContext) -> Iterable[Finding]:
        """Re-verify the frozen parameters and the tied copies one last time, and close the ledger."""
        findings: list[Finding] = []
        params = named_unique_parameters(ctx.model)
        if self.config.frozen and self.frozen_baseline and (ctx.step or 0) > self.frozen_verified_step:
            frozen = [(n, p) for n, p in params if not p.requires_grad and n in self.frozen_baseline]
            values = hash_or_none([p for _, p in frozen], self.config.backend)
            findings += self._compare_frozen(ctx, dict(zip([n for n, _ in frozen], values, strict=True)),
                                             record_new=False)
        findings += self._tied_copies(ctx, params)
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None
        return findings

    # -- frozen -----------------------------------------------------------------------------------------------
    def _compare_frozen(self, ctx: EventContext, current: dict[str, int | None], record_new: bool) -> list[Finding]:
        """FROZEN_CHANGED for frozen parameters whose hash moved since their baseline; new ones get a baseline.

        A baseline ``[hash, k]`` holds the value as of after step ``k``; a change is named with the steps it
        happened in (``k+1 .. now``, narrowed by the last verification). Each parameter is reported once.
        """
        if record_new:  # ``current`` lists every frozen parameter: the others were unfrozen on purpose or are gone
            for name in [n for n in self.frozen_baseline if n not in current]:
                del self.frozen_baseline[name]
        changed, since = [], {}
        last = self.frozen_verified_step
        now = ctx.step or 0
        for name, value in current.items():
            if name not in self.frozen_baseline:
                if record_new:
                    self.frozen_baseline[name] = [value, now]
                continue
            base, base_step = self.frozen_baseline[name]
            if value != base:
                since[name] = max(base_step, min(last, now))
                self.frozen_baseline[name] = [value, now]  # later changes are measured from here
                changed.append(name)
        self.frozen_verified_step = now
        new = self.reported.first("FROZEN_CHANGED", changed)
        if not new:
            return []
        first = min(since[n] for n in new) + 1
        if ctx.event in ("init", "load"):  # a baseline restored with the monitor's state on resume
            window = "before training" if now == 0 else f"between the checkpoint and the resume at step {now}"
        else:
            window = f"in step {now}" if first >= now else f"in steps {first}..{now}"
        return [self.finding(
            "FROZEN_CHANGED", ctx, params=new,
            message=f"{len(new)} parameter(s) with requires_grad=False changed {window}: "
                    f"{', '.join(new[:6])}" + (f" (+{len(new) - 6} more)" if len(new) > 6 else ""),
            hint=HINT_FROZEN, changed_in_steps=[first, now], unchanged_through_step={n: since[n] for n in new})]

    # -- tied copies ------------------------------------------------------------------------------------------
    def _tied_copies(self, ctx: EventContext, params: Sequence[tuple[str, nn.Parameter]],
                     validate: bool = False) -> list[Finding]:
        """TIE_DIVERGED for ``tied_copies`` groups whose members' hashes differ (across ranks too)."""
        groups = [[user_name(n) for n in g] for g in self.config.tied_copies]
        if not groups:
            return []
        known = [user_name(n) for n, _ in params]  # a recipe may name the inner model's parameters
        groups = [[resolve_name(n, known)[0] or n for n in g] for g in groups]
        wanted = {n for g in groups for n in g}
        local = {name: p for _, name, p in named_parameters_all(ctx.model) if name in wanted}
        values = hash_or_none(list(local.values()), self.config.backend)
        mine = {n: (v, tuple(local[n].shape), str(local[n].dtype)) for n, v in zip(local, values, strict=True)}
        merged: dict[str, tuple[int | None, tuple[int, ...], str]] = {}
        gathered = self.comparator.all_gather_object(mine)
        if gathered is not None:  # copies on other ranks (pipeline stages) join in; the lowest rank's value wins
            for rank_values in gathered:
                for n, v in rank_values.items():
                    merged.setdefault(n, v)
        else:
            merged = mine
        found: list[Finding] = []
        if validate:
            known = [n for n, _ in params]
            found = [name_not_found(UnknownName(n, "checks.hashes.tied_copies", "is not a parameter of the model "
                                                "on any rank", closest_names(n, known)),
                                    event=ctx.event, step=ctx.step, check=self.name)
                     for n in sorted(wanted - set(merged))]
        diverged: list[tuple[str, ...]] = []
        details = {}
        for group in groups:
            present = [n for n in group if n in merged]
            if len({merged[n][0] for n in present}) > 1:
                key = tuple(present)
                diverged.append(key)
                details[",".join(key)] = {n: {"hash": hex64(merged[n][0]), "shape": list(merged[n][1]),
                                              "dtype": merged[n][2]} for n in present}
        new = set(self.reported.new("TIE_DIVERGED", [",".join(k) for k in diverged]))
        return found + [self.finding(
            "TIE_DIVERGED", ctx, params=key,
            message=f"tied copies {' and '.join(key)} hold different values (hashes "
                    f"{', '.join(str(details[','.join(key)][n]['hash']) for n in key)})",
            hint=HINT_TIE_DIVERGED, copies=details[",".join(key)])
            for key in diverged if ",".join(key) in new]

    # -- report and state -------------------------------------------------------------------------------------
    def report_section(self) -> dict[str, Any] | None:
        """Frozen parameters tracked, the last step they were verified at, the replica comparison, the ledger."""
        replicas = self.comparator.describe()
        if self.gradients_unseen is not None and self.comparator.active:
            replicas = replicas.replace("compared", "parameters compared", 1) + (
                "; gradients not compared: " + self.gradients_unseen)
        return {"frozen_tracked": len(self.frozen_baseline), "frozen_verified_step": self.frozen_verified_step,
                "replicas": replicas,
                "ledger": self.config.ledger}

    def state_dict(self) -> dict[str, Any]:
        """The frozen baselines and what was reported (restored on resume)."""
        # hashes as hex strings: HF writes this state into trainer_state.json, and JSON readers other than
        # Python's lose precision on integers beyond 2**53
        return {"frozen_baseline": {n: [hex64(h), s] for n, (h, s) in self.frozen_baseline.items()},
                "frozen_verified_step": self.frozen_verified_step,
                "frozen_local": self.frozen_local, "frozen_rank": distributed_rank(),
                "reported": self.reported.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Baselines of another rank's own shards (trainers save rank 0's state and
        every rank restores it) describe other bytes: they are dropped, and this rank records its own at the
        next look (rank 0 keeps verifying across the resume)."""
        self.frozen_local = bool(state.get("frozen_local", False))
        foreign = self.frozen_local and int(state.get("frozen_rank", 0)) != distributed_rank()
        self.frozen_baseline = {} if foreign else {n: [None if h is None else int(h, 16), int(s)]
                                                   for n, (h, s) in state.get("frozen_baseline", {}).items()}
        self.frozen_verified_step = int(state.get("frozen_verified_step", 0))
        self.reported.load_state_dict(state.get("reported", {}))
