"""DeepSpeed ZeRO through the HF Trainer (``TrainingArguments(deepspeed={...})``), 2 CPU processes under torchrun
(gloo, ``DS_ACCELERATOR=cpu``): healthy runs are clean, and what a check cannot see under DeepSpeed it says once
(``CHECK_NOT_APPLICABLE``) instead of judging placeholders or absent gradients. One launch per ZeRO stage runs
its jobs in sequence (tests/dist_scripts/ds_zero.py).

The first launch on a machine JIT-builds DeepSpeed's shared-memory comm op into ``TORCH_EXTENSIONS_DIR`` (30-70 s
on 2 busy cores; DeepSpeed builds it whenever it initialises on Linux, there is no switch); the tests point it at a
cache outside the repository (kept when set already) so later runs, and CI that keeps ``~/.cache``, load the built
op in about a second. The jobs let DeepSpeed wrap the Trainer's torch AdamW (no ``optimizer`` section), which
spares the build of DeepSpeed's own fused_adam op (about a minute more).
"""

from __future__ import annotations

import json
import os

import pytest
from test_replicas import free_port, launch

pytest.importorskip("deepspeed")

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "dist_scripts", "ds_zero.py")
#: where DeepSpeed's JIT-built ops are cached between runs (outside the repository)
EXTENSIONS = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
    os.path.expanduser("~"), ".cache", "integrity-callbacks", "torch_extensions")
#: what a DeepSpeed launch on a CPU machine needs (DeepSpeed then uses gloo)
DEEPSPEED_ENV = {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": EXTENSIONS}
BAD_LAYER = "transformer.h.0.attn.c_attn"
TARGET = "transformer.h.1.mlp.c_fc.weight"

pytestmark = pytest.mark.slow


def launch_stage(stage: int, out_dir, timeout: int = 600) -> None:
    """torchrun ``ds_zero.py STAGE OUT_DIR`` (2 CPU ranks); the bound leaves room for the one-time JIT build of
    DeepSpeed's comm op."""
    launch(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
            str(free_port()), SCRIPT, str(stage)], out_dir, timeout=timeout, env=DEEPSPEED_ENV)


@pytest.fixture(scope="module")
def zero1(tmp_path_factory):
    """Output folder of the ZeRO-1 launch (jobs lora, full)."""
    out = tmp_path_factory.mktemp("zero1")
    launch_stage(1, out)
    return out


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    """Output folder of the ZeRO-2 launch (jobs lora, full, full_nan, full_param)."""
    out = tmp_path_factory.mktemp("zero2")
    launch_stage(2, out)
    return out


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    """Output folder of the ZeRO-3 launch (jobs lora, lora_bad_b, lora_frozen, untied)."""
    out = tmp_path_factory.mktemp("zero3")
    launch_stage(3, out)
    return out


def load(out_dir, job: str, rank: int) -> dict:
    """What rank ``rank`` wrote for ``job``: its findings, the report's sections, DeepSpeed's skipped steps."""
    with open(os.path.join(out_dir, f"{job}.rank{rank}.json")) as fh:
        return json.load(fh)


def problems(data: dict) -> list[tuple]:
    """Errors and warnings (code, event, step, params), and every CHECK_FAILED."""
    return [(f["code"], f["event"], f["step"], tuple(f["params"])) for f in data["findings"]
            if f["severity"] != "info" or f["code"] == "CHECK_FAILED"]


def not_applicable(data: dict) -> list[str]:
    """The CHECK_NOT_APPLICABLE messages."""
    return [f["message"] for f in data["findings"] if f["code"] == "CHECK_NOT_APPLICABLE"]


def assert_gradients_said_unseen(data: dict, adapters: bool) -> None:
    """Gradient hashes (and, with adapters, the dead-adapter check) say once that DeepSpeed's gradients are
    not visible at the pre-optimizer hook, and the report never claims gradients were compared."""
    said = not_applicable(data)
    assert sum(m.startswith("gradient hashes (replicas, ledger)") for m in said) == 1, said
    assert sum(m.startswith("dead adapters (ADAPTER_DEAD, ADAPTER_UNUSED) not checked") for m in said) == (
        1 if adapters else 0), said


def test_zero3_lora_healthy_is_clean(zero3):
    """ZeRO-3 + LoRA, healthy: ``param.data`` is an empty placeholder, yet no ADAPTER_INIT_WRONG ("lora_A all
    zero"), no ADAPTER_DEAD, no FROZEN_CHANGED; the tie map counts the full tensors; replicas and gradients say
    why they are not compared."""
    for rank in (0, 1):
        data = load(zero3, "lora", rank)
        assert problems(data) == []
        assert_gradients_said_unseen(data, adapters=True)
        assert any("DeepSpeed ZeRO-3 partitions every parameter" in m for m in not_applicable(data))
        tie_map = data["sections"]["ties"]["tie_map"]
        assert tie_map["groups"][0]["names"] == ["lm_head.weight", "transformer.wte.weight"]
        assert tie_map["groups"][0]["shape"] == [64, 32]
        assert tie_map["parameters_unique"] > 30000  # not "0 parameters"
        hashes = data["sections"]["hashes"]
        assert hashes["replicas"].startswith("not compared: DeepSpeed ZeRO-3 partitions every parameter")
        assert hashes["frozen_tracked"] > 0 and hashes["frozen_verified_step"] == 3
        assert data["sections"]["adapter_init"]["probe_max_change"] == 0.0  # the probe's forward gathers


def test_zero3_reinitialised_lora_b_is_caught(zero3):
    """ZeRO-3: an adapter re-initialised by the user's init loop (lora_B not zero) is ADAPTER_INIT_WRONG naming
    that lora_B, read from the gathered values (each unit gathered on its own, on both ranks alike)."""
    for rank in (0, 1):
        found = problems(load(zero3, "lora_bad_b", rank))
        assert ("ADAPTER_INIT_WRONG", "init", 0, (f"{BAD_LAYER}.lora_B.default.weight",)) in found
        assert ("ADAPTER_INIT_WRONG", "init", 0, (f"{BAD_LAYER}.lora_A.default.weight",)) in found  # std 0.02
        assert [f[0] for f in found] == ["ADAPTER_INIT_WRONG", "ADAPTER_INIT_WRONG", "ADAPTER_NOT_IDENTITY"]


def test_zero3_frozen_write_is_caught_from_shards(zero3):
    """ZeRO-3: a frozen weight written through DeepSpeed's own API (GatheredParameters(modifier_rank=0)) is
    FROZEN_CHANGED on every rank: frozen weights are hashed by their shards, which a write scatters into."""
    for rank in (0, 1):
        assert problems(load(zero3, "lora_frozen", rank)) == [
            ("FROZEN_CHANGED", "end", 3, ("transformer.wpe.weight",))]


def test_zero1_healthy_runs_are_clean(zero1):
    """ZeRO-1 (optimizer state partitioned, parameters and gradients whole until the step), LoRA and full
    fine-tune: clean; parameters are compared across ranks, gradients (cleared with the step) say so once."""
    for job, adapters in (("lora", True), ("full", False)):
        for rank in (0, 1):
            data = load(zero1, job, rank)
            assert problems(data) == [], job
            assert_gradients_said_unseen(data, adapters=adapters)
            assert data["sections"]["hashes"]["replicas"].startswith("parameters compared across 2 ranks; ")


def test_zero3_broken_tie_compares_gathered_values(zero3):
    """ZeRO-3: a declared tie the model does not keep is TIE_BROKEN, and its two tensors are compared gathered
    ("different values"), not as two empty placeholders (which read as "equal values")."""
    for rank in (0, 1):
        data = load(zero3, "untied", rank)
        assert problems(data) == [("TIE_BROKEN", "init", 0, ("lm_head.weight", "transformer.wte.weight"))]
        message = next(f["message"] for f in data["findings"] if f["code"] == "TIE_BROKEN")
        assert message.endswith("2 separate tensors (different values)")


def test_zero2_lora_healthy_is_clean(zero2):
    """ZeRO-2 + LoRA, healthy: no parameter has ``.grad`` at on_pre_optimizer_step (DeepSpeed stepped and
    cleared its gradient partitions), so no ADAPTER_DEAD; parameters are compared across ranks, gradients not."""
    for rank in (0, 1):
        data = load(zero2, "lora", rank)
        assert problems(data) == []
        assert_gradients_said_unseen(data, adapters=True)
        replicas = data["sections"]["hashes"]["replicas"]
        assert replicas.startswith("parameters compared across 2 ranks; gradients not compared: DeepSpeed")


def test_zero2_full_finetune_healthy_is_clean(zero2):
    """ZeRO-2 full fine-tune, healthy: clean, and the report says gradients were not compared."""
    for rank in (0, 1):
        data = load(zero2, "full", rank)
        assert problems(data) == []
        assert_gradients_said_unseen(data, adapters=False)
        assert data["skipped_steps"] == 0
        assert "gradients not compared" in data["sections"]["hashes"]["replicas"]


def test_zero2_nan_gradient_is_grad_nonfinite(zero2):
    """ZeRO-2, fp32: a NaN written into one gradient on rank 1 makes DeepSpeed skip step 2 (its overflow
    check); GRAD_NONFINITE reports it on both ranks from DeepSpeed's overflow flag, once."""
    for rank in (0, 1):
        data = load(zero2, "full_nan", rank)
        assert data["skipped_steps"] == 1  # the fault happened: DeepSpeed skipped one step
        assert problems(data) == [("GRAD_NONFINITE", "step", 2, ())]
        message = next(f["message"] for f in data["findings"] if f["code"] == "GRAD_NONFINITE")
        assert "DeepSpeed found non-finite gradients" in message and "skipped the step" in message


def test_zero2_parameter_replicas_are_really_compared(zero2):
    """ZeRO-2: parameters are replicated after the step, and the comparison the report claims is real: a
    parameter nudged on rank 1 after step 2 is PARAM_REPLICA_MISMATCH on both ranks."""
    for rank in (0, 1):
        assert problems(load(zero2, "full_param", rank)) == [
            ("PARAM_REPLICA_MISMATCH", "step", 2, (TARGET,))]
