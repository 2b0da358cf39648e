"""Under DeepSpeed the trainable check reads the optimizer's model-parameter groups through accelerate's wrapper,
and the saved-state check reads DeepSpeed checkpoint folders (``latest`` + ``global_stepN/*model_states.pt``):
names and full shapes through the restricted unpickler, no value read, no code run. Real ZeRO-2/ZeRO-3 saves
through the HF Trainer under torchrun (2 CPU ranks, gloo) are clean at the ``checkpoint`` event and in ``audit``;
an incomplete or hostile DeepSpeed folder is ``CHECKPOINT_UNREADABLE`` naming what is missing, never clean."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from test_deepspeed import DEEPSPEED_ENV
from test_replicas import HERE, free_port, launch

from callbacks.primitives.checkpoints import list_checkpoint
from callbacks.runner.cli import main

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

def launch_script(name: str, out):
    """torchrun ``tests/dist_scripts/<name>.py OUT`` on 2 CPU ranks under DeepSpeed's CPU settings."""
    launch(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), os.path.join(HERE, "dist_scripts", f"{name}.py")], out,
           timeout=600, env=DEEPSPEED_ENV)
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return launch_script("ds_checkpoints", tmp_path_factory.mktemp("ds_checkpoints"))


def results(out, job, rank):
    with open(out / f"{job}.rank{rank}.json") as fh:
        return json.load(fh)


@pytest.mark.parametrize("job", ["zero3", "zero3_gathered", "zero2", "zero3_merge", "zero3_verify", "zero3_resume"])
def test_healthy_deepspeed_saves_are_clean_at_the_checkpoint_event(saved, job):
    """zero3_resume: every rank restores rank 0's saved state; frozen baselines of rank 0's shards must not be
    compared with rank 1's shards (a false FROZEN_CHANGED at the resume's init on rank 1)."""
    for rank in (0, 1):
        found = [(f["code"], f["event"], f["message"]) for f in results(saved, job, rank)["findings"]
                 if f["severity"] != "info"]
        assert found == [], found


def test_a_zero3_folder_lists_every_parameter_with_its_full_shape(saved):
    folder = saved / "zero3" / "checkpoint-2"
    assert not (folder / "model.safetensors").exists()  # only DeepSpeed's shards were written
    listing = list_checkpoint(str(folder))
    assert listing.errors == [] and listing.formats == ["deepspeed"]
    assert sorted(listing.keys) == results(saved, "zero3", 0)["names"]  # the tied lm_head alias included
    assert listing.tensors["transformer.wte.weight"].shape == (64, 32)  # the full shape, not the placeholder's
    assert listing.files == [str(folder / "global_step2" / "zero_pp_rank_0_mp_rank_00_model_states.pt")]


@pytest.mark.parametrize("job", ["zero3", "zero3_gathered", "zero2"])
def test_audit_of_a_healthy_deepspeed_folder_is_clean(saved, job, capsys):
    assert main(["audit", str(saved / job / "checkpoint-2")]) == 0, capsys.readouterr().out


def test_a_missing_rank_partition_is_unreadable_naming_the_rank(saved, tmp_path, capsys):
    broken = tmp_path / "checkpoint-2"
    shutil.copytree(saved / "zero3" / "checkpoint-2", broken)
    os.remove(broken / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert main(["audit", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "incomplete DeepSpeed checkpoint: no partition of data-parallel rank(s) [1] (of 2)" in out
    assert "save to storage every node shares" in out


@pytest.mark.parametrize("tag", ["../../..", "/etc", "no_such_tag", ""])
def test_a_latest_file_naming_a_tag_outside_or_nowhere_is_unreadable(saved, tmp_path, tag):
    broken = tmp_path / "checkpoint-2"
    shutil.copytree(saved / "zero3" / "checkpoint-2", broken)
    (broken / "latest").write_text(tag)
    listing = list_checkpoint(str(broken))
    assert listing.keys == [] and len(listing.errors) == 1
    assert listing.errors[0].path == str(broken / "latest")


@pytest.mark.parametrize("job", ["zero3", "zero2"])
def test_optimizer_coverage_is_judged_through_deepspeeds_groups(saved, job):
    """The optimizer HF hands the callbacks is accelerate's wrapper over DeepSpeed's ZeRO optimizer, whose
    param_groups are flat fp32 partitions: coverage is read from its model-parameter groups, not given up."""
    messages = [f["message"] for f in results(saved, job, 0)["findings"]]
    assert not any("optimizer coverage not checked" in m for m in messages), messages


def test_unfreezing_after_deepspeed_built_its_groups_is_not_optimized(saved):
    for rank in (0, 1):
        found = [(f["code"], f["event"], f["step"], tuple(f["params"])) for f in
                 results(saved, "zero2_unfreeze", rank)["findings"] if f["severity"] != "info"]
        # and the adapter save leaves it out (PEFT saves adapters; the unfrozen embedding is in no module to save),
        # which the writer of the folder (rank 0) reports
        expected = [("TRAINABLE_SET_CHANGED", "step", 2, ("transformer.wpe.weight",)),
                    ("TRAINABLE_NOT_OPTIMIZED", "step", 2, ("transformer.wpe.weight",))]
        if rank == 0:
            expected.append(("UNSAVED_TRAINABLE", "checkpoint", 2, ("transformer.wpe.weight",)))
        assert found == expected, found


def test_a_merge_of_zero3_placeholders_is_not_judged_and_says_so(saved):
    """After a ZeRO-3 run the model holds empty placeholders: the checked merge says it cannot judge them (and
    runs no probe, whose forward would gather collectively) instead of calling the merge clean."""
    merge = [f for f in results(saved, "zero3_merge", 0)["findings"] if f["event"] == "merge"]
    assert [(f["code"], f["severity"]) for f in merge] == [("CHECK_NOT_APPLICABLE", "info")], merge
    assert "ZeRO-3" in merge[0]["message"] and "stage3_gather_16bit_weights_on_model_save" in merge[0]["hint"]


@pytest.fixture(scope="module")
def accelerate_runs(tmp_path_factory):
    return launch_script("ds_accelerate", tmp_path_factory.mktemp("ds_accelerate"))


@pytest.mark.parametrize("job", ["zero2_lora", "zero2_full", "zero3_lora", "zero3_full"])
def test_an_accelerate_loop_under_deepspeed_is_clean(accelerate_runs, job):
    for rank in (0, 1):
        found = [(f["code"], f["event"], f["message"][:120]) for f in results(accelerate_runs, job, rank)["findings"]
                 if f["severity"] != "info"]
        assert found == [], found


def test_an_accelerate_loop_under_zero3_catches_a_reinitialised_lora_b(accelerate_runs):
    for rank in (0, 1):
        wrong = [f for f in results(accelerate_runs, "zero3_lora_bad_b", rank)["findings"]
                 if f["code"] == "ADAPTER_INIT_WRONG"]
        assert [f["params"] for f in wrong] == [["transformer.h.0.attn.c_attn.lora_A.default.weight"],
                                                ["transformer.h.0.attn.c_attn.lora_B.default.weight"]], wrong


def test_verify_values_under_zero3_says_once_it_cannot_compare(saved):
    """Live ZeRO-3 parameters are placeholders: verify_values says so once instead of comparing nothing and
    reporting a clean verification."""
    found = [f for f in results(saved, "zero3_verify", 0)["findings"] if f["check"] == "saved_state"]
    assert [(f["code"], f["severity"]) for f in found] == [("CHECK_NOT_APPLICABLE", "info")], found
    assert "ZeRO-3 placeholders" in found[0]["message"]
    # rank 1 does not judge the folder rank 0 writes (see below)
    assert [f for f in results(saved, "zero3_verify", 1)["findings"] if f["check"] == "saved_state"] == []


def test_a_shards_only_save_notes_the_setting_that_writes_whole_weights(saved):
    def folder_looks(job):
        return [e for e in results(saved, job, 0)["sections"]["saved_state"]["coverage"]
                if e["source"].endswith("checkpoint-2")]

    (entry,) = folder_looks("zero3")
    assert entry["unsaved"] == [] and "stage3_gather_16bit_weights_on_model_save" in entry["note"]
    (gathered,) = folder_looks("zero3_gathered")
    assert gathered["unsaved"] == [] and "note" not in gathered


def test_a_deepspeed_folder_named_like_a_lightning_checkpoint_is_read(saved, tmp_path):
    """Lightning's DeepSpeed strategy writes ``epoch=E-step=S.ckpt`` as a DeepSpeed checkpoint folder (``latest``
    and the tag folder inside): a folder of such checkpoints lists them, not "a .ckpt that is no regular file"."""
    checkpoints = tmp_path / "checkpoints"
    ckpt = checkpoints / "epoch=0-step=2.ckpt"
    ckpt.mkdir(parents=True)
    for name in ("latest", "global_step2"):
        source = saved / "zero3" / "checkpoint-2" / name
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, ckpt / name)
    for path in (checkpoints, ckpt):
        listing = list_checkpoint(str(path))
        assert listing.errors == [] and listing.formats == ["deepspeed"]
        assert listing.tensors["transformer.wte.weight"].shape == (64, 32)


def test_only_rank_0_judges_the_folder_when_hf_believes_it_is_alone(saved):
    """DeepSpeed on CPU leaves HF believing each rank is the only one (``should_save`` on both, both write the
    folder at once): rank facts come from torch.distributed, so rank 1 never reads a folder rank 0 is writing."""
    def folder_looks(rank):
        return [e for e in results(saved, "zero3", rank)["sections"]["saved_state"]["coverage"]
                if e["source"].endswith("checkpoint-2")]

    assert len(folder_looks(0)) == 1 and folder_looks(1) == []
