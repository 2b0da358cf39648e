"""Saved-state coverage driven through Monitor.dispatch on real files: ties, shards, corrupt files, formats, values."""

from __future__ import annotations

import hashlib
import os
import random
import warnings

import pytest
import torch
from models import tiny_gpt2
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

from callbacks import Monitor
from callbacks.checks.saved_state import check_checkpoint
from callbacks.primitives.checkpoints import list_checkpoint

ONLY_SAVED_STATE = {name: {"enabled": False} for name in ("ties", "adapter_init", "hashes", "merge")}


def monitor(verify_values: bool = False, **kwargs) -> Monitor:
    return Monitor(policy="log", checks={**ONLY_SAVED_STATE, "saved_state": {"verify_values": verify_values}},
                   **kwargs)


def brief(findings):
    return [(f.code, f.event, f.step, f.params) for f in findings]


class HeadDroppingNet(nn.Module):
    """A body and a trainable head whose ``state_dict`` hook drops the head (a custom saver's bug)."""

    def __init__(self, drop_head: bool):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        if drop_head:
            self._register_state_dict_hook(self._drop_head)

    @staticmethod
    def _drop_head(module, state, prefix, local_metadata):
        for key in [k for k in state if k.startswith(prefix + "head.")]:
            del state[key]


# -- ties dropped on purpose ----------------------------------------------------------------------------------
def untied_gpt2(equal: bool):
    """GPT2 whose config promises a tie, with the head made a separate tensor (equal values or not)."""
    model = tiny_gpt2(tie=True)
    head = model.transformer.wte.weight.detach().clone()
    model.lm_head.weight = nn.Parameter(head if equal else head + 0.5)
    return model


def save_without_head(model, folder):
    """A saver that drops lm_head.weight as 'the tied duplicate' without checking the tie still holds."""
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, os.path.join(folder, "model.safetensors"))


def test_dropped_tied_key_with_diverged_live_tensors_is_unsaved(tmp_path):
    model = untied_gpt2(equal=False)
    save_without_head(model, tmp_path)
    findings = monitor().dispatch("checkpoint", model, step=5, checkpoint_dir=str(tmp_path))
    assert brief(findings) == [("UNSAVED_TRAINABLE", "checkpoint", 5, ("lm_head.weight",))]
    assert findings[0].details["tie_partner"] == "transformer.wte.weight"
    assert "re-tie" in findings[0].hint and "tie_word_embeddings=False" in findings[0].hint


def test_dropped_tied_key_with_bitwise_equal_live_tensors_counts_as_saved(tmp_path):
    model = untied_gpt2(equal=True)
    save_without_head(model, tmp_path)
    assert monitor().dispatch("checkpoint", model, step=5, checkpoint_dir=str(tmp_path)) == []


def test_declared_tie_on_hand_written_model(tmp_path):
    from models import LinguaLM

    model = LinguaLM(tie=False)
    state = {k: v for k, v in model.state_dict().items() if k != "output.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    declared = [("tok_embeddings.weight", "output.weight")]
    found = monitor(declare_ties=declared).dispatch("checkpoint", model, step=1, checkpoint_dir=str(tmp_path))
    assert brief(found) == [("UNSAVED_TRAINABLE", "checkpoint", 1, ("output.weight",))]
    with torch.no_grad():
        model.output.weight.copy_(model.tok_embeddings.weight)
    assert monitor(declare_ties=declared).dispatch("checkpoint", model, step=1, checkpoint_dir=str(tmp_path)) == []


# -- full fine-tuning: state_dict hooks, shards ---------------------------------------------------------------
def test_state_dict_hook_dropping_a_trainable_found_at_init_and_checkpoint(tmp_path):
    model = HeadDroppingNet(drop_head=True)
    mon = monitor()
    init = mon.dispatch("init", model, step=0)
    assert brief(init) == [("UNSAVED_TRAINABLE", "init", 0, ("head.weight",)),
                           ("UNSAVED_TRAINABLE", "init", 0, ("head.bias",))]
    assert "state_dict" in init[0].hint
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    found = mon.dispatch("checkpoint", model, step=3, checkpoint_dir=str(tmp_path))
    assert {f.params for f in found} == {("head.weight",), ("head.bias",)}
    assert found[0].details["files"] == [str(tmp_path / "model.safetensors")]


def test_healthy_twin_without_hook_is_clean(tmp_path):
    model = HeadDroppingNet(drop_head=False)
    mon = monitor(verify_values=True)
    assert mon.dispatch("init", model, step=0) == []
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    assert mon.dispatch("checkpoint", model, step=3, checkpoint_dir=str(tmp_path)) == []


def test_frozen_parameters_need_not_be_saved(tmp_path):
    model = HeadDroppingNet(drop_head=True)
    model.head.requires_grad_(False)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    assert monitor().dispatch("checkpoint", model, step=1, checkpoint_dir=str(tmp_path)) == []


def drop_lm_head(module, state, prefix, local_metadata):
    state.pop(prefix + "lm_head.weight", None)


@pytest.mark.parametrize("drop_head", [False, True], ids=["complete", "head_dropped"])
def test_sharded_checkpoint(tmp_path, drop_head):
    model = tiny_gpt2(tie=False)
    if drop_head:
        model._register_state_dict_hook(drop_lm_head)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    listing = list_checkpoint(str(tmp_path))
    assert len(listing.files) > 2  # index + shards
    found = monitor(verify_values=True).dispatch("checkpoint", model, step=4, checkpoint_dir=str(tmp_path))
    if drop_head:
        assert brief(found) == [("UNSAVED_TRAINABLE", "checkpoint", 4, ("lm_head.weight",))]
        assert found[0].details["files"] == listing.files
    else:
        assert found == []


# -- corrupt files --------------------------------------------------------------------------------------------
def cut_header_length(folder):
    path = os.path.join(folder, "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[:8] = (len(data) * 4).to_bytes(8, "little")
    open(path, "wb").write(bytes(data))
    return path, "beyond the file"


def garble_header(folder):
    path = os.path.join(folder, "model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[8:10] = b"]]"
    open(path, "wb").write(bytes(data))
    return path, "not valid JSON"


def truncate_data(folder):
    path = os.path.join(folder, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 100)
    return path, "tensor data truncated"


def break_index(folder):
    path = os.path.join(folder, "model.safetensors.index.json")
    with open(path, "a") as fh:
        fh.write("}{")
    return path, "broken index JSON"


def corrupt_pickle(folder):
    path = os.path.join(folder, "pytorch_model.bin")
    os.truncate(path, os.path.getsize(path) // 2)
    return path, "unreadable torch file"


@pytest.mark.parametrize("corrupt", [cut_header_length, garble_header, truncate_data, break_index, corrupt_pickle])
def test_corrupt_checkpoint_file_is_a_finding_not_a_crash(tmp_path, corrupt):
    model = tiny_gpt2(tie=False)
    if corrupt is break_index:
        model.save_pretrained(tmp_path, max_shard_size="40KB")
    elif corrupt is corrupt_pickle:
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        model.save_pretrained(tmp_path)
    path, reason = corrupt(str(tmp_path))
    mon = Monitor(policy="warn", checks={**ONLY_SAVED_STATE, "saved_state": {"verify_values": True}})
    with pytest.warns(UserWarning, match="CHECKPOINT_UNREADABLE"):
        found = mon.dispatch("checkpoint", model, step=2, checkpoint_dir=str(tmp_path))
    assert brief(found) == [("CHECKPOINT_UNREADABLE", "checkpoint", 2, ())]
    assert found[0].details["file"] == path and reason in found[0].details["reason"]
    assert path in found[0].message


def test_folder_without_weight_files_is_a_warning(tmp_path):
    (tmp_path / "trainer_state.json").write_text("{}")
    found = monitor().dispatch("checkpoint", tiny_gpt2(), step=1, checkpoint_dir=str(tmp_path))
    assert [(f.code, f.severity) for f in found] == [("CHECKPOINT_UNREADABLE", "warning")]


# -- values ---------------------------------------------------------------------------------------------------
def test_verify_values_finds_a_stale_save(tmp_path):
    model = HeadDroppingNet(drop_head=False)
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        model.head.bias.add_(1.0)  # the live tensor moved on after the save (a stale copy was written)
    found = monitor(verify_values=True).dispatch("checkpoint", model, step=7, checkpoint_dir=str(tmp_path))
    assert brief(found) == [("SAVED_VALUE_MISMATCH", "checkpoint", 7, ("head.bias",))]
    assert monitor(verify_values=False).dispatch("checkpoint", model, step=7, checkpoint_dir=str(tmp_path)) == []


def test_verify_values_compares_after_the_saved_dtype_cast(tmp_path):
    model = HeadDroppingNet(drop_head=False)
    save_file({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    assert monitor(verify_values=True).dispatch("checkpoint", model, step=1, checkpoint_dir=str(tmp_path)) == []


# -- other formats --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("drop_head", [False, True], ids=["complete", "head_dropped"])
def test_dcp_folder(tmp_path, drop_head):
    import torch.distributed.checkpoint as dcp

    model = HeadDroppingNet(drop_head=drop_head)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process: DCP warns that no process group is set up
        dcp.save({"model": model.state_dict(), "step": 3}, checkpoint_id=str(tmp_path))
    found = check_checkpoint(model, str(tmp_path), step=3)
    assert {f.params for f in found} == ({("head.weight",), ("head.bias",)} if drop_head else set())


@pytest.mark.parametrize("drop_head", [False, True], ids=["complete", "head_dropped"])
def test_accelerate_save_state_folder(tmp_path, drop_head):
    from accelerate import Accelerator

    from callbacks.accelerate import AcceleratorHooks

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(HeadDroppingNet(drop_head=drop_head))
    hooks = AcceleratorHooks(accelerator, policy="log", checks={**ONLY_SAVED_STATE,
                                                                "saved_state": {"verify_values": True}})
    accelerator.save_state(str(tmp_path))
    hooks.saved(model, str(tmp_path))
    found = hooks.findings
    if drop_head:
        assert {f.params for f in found} == {("head.weight",), ("head.bias",)}
        assert "accelerator.save_state" in found[0].hint
    else:
        assert found == []


def test_lightning_ckpt_file(tmp_path):
    model = HeadDroppingNet(drop_head=False)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    torch.save({"state_dict": state, "epoch": 0, "global_step": 4}, tmp_path / "last.ckpt")
    found = check_checkpoint(model, str(tmp_path / "last.ckpt"), step=4, trainer="lightning")
    assert {f.params for f in found} == {("head.weight",), ("head.bias",)}
    assert "on_save_checkpoint" in found[0].hint
    torch.save({"state_dict": model.state_dict(), "epoch": 0}, tmp_path / "last.ckpt")
    assert check_checkpoint(model, str(tmp_path / "last.ckpt"), verify_values=True) == []


def test_ddp_and_compile_prefixes_map_to_the_users_names(tmp_path):
    """Live names under DDP (module.) and saved keys from torch.compile (_orig_mod.) meet in one name."""
    import torch.distributed as dist

    model = HeadDroppingNet(drop_head=False)
    keys = {f"_orig_mod.{k}": v for k, v in model.state_dict().items() if k != "head.bias"}
    save_file(keys, str(tmp_path / "model.safetensors"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        found = monitor(verify_values=True).dispatch("checkpoint", ddp, step=1, checkpoint_dir=str(tmp_path))
    finally:
        dist.destroy_process_group()
    assert brief(found) == [("UNSAVED_TRAINABLE", "checkpoint", 1, ("head.bias",))]


# -- PEFT details ---------------------------------------------------------------------------------------------
def peft_gpt2(**config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(tiny_gpt2(tie=False), LoraConfig(target_modules=["c_attn"], **config))


def test_new_token_rows_unfrozen_by_hand_point_to_trainable_token_indices(tmp_path):
    model = peft_gpt2()
    model.base_model.model.transformer.wte.weight.requires_grad_(True)
    mon = monitor()
    (finding,) = mon.dispatch("init", model, step=0)
    assert finding.params == ("transformer.wte.weight",)
    assert "trainable_token_indices={'wte'" in finding.hint


def test_trainable_token_indices_saved_clean(tmp_path):
    model = peft_gpt2(trainable_token_indices={"wte": [60, 61]})
    assert any("trainable_tokens_delta" in n for n, p in model.named_parameters() if p.requires_grad)
    mon = monitor(verify_values=True)
    assert mon.dispatch("init", model, step=0) == []
    model.save_pretrained(tmp_path)
    assert mon.dispatch("checkpoint", model, step=1, checkpoint_dir=str(tmp_path)) == []


def test_second_adapter_in_its_sub_folder(tmp_path):
    model = peft_gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("second", LoraConfig(target_modules=["c_attn"]))
    for name, param in model.named_parameters():  # train both adapters
        if "lora_" in name:
            param.requires_grad_(True)
    mon = monitor(verify_values=True)
    assert mon.dispatch("init", model, step=0) == []
    model.save_pretrained(tmp_path)
    assert set(list_checkpoint(str(tmp_path)).groups) == {"", "second"}
    assert mon.dispatch("checkpoint", model, step=1, checkpoint_dir=str(tmp_path)) == []
    os.remove(tmp_path / "second" / "adapter_model.safetensors")  # the second adapter never reached disk
    found = mon.dispatch("checkpoint", model, step=1, checkpoint_dir=str(tmp_path))
    assert len(found) == 4 and all(".second." in f.params[0] for f in found)


# -- read-only ------------------------------------------------------------------------------------------------
def test_check_changes_no_file_no_flag_no_rng(tmp_path):
    model = untied_gpt2(equal=False)
    save_without_head(model, tmp_path)
    path = tmp_path / "model.safetensors"
    before = (hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns)
    flags = [p.requires_grad for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    rng = (torch.get_rng_state(), random.getstate())
    mon = monitor(verify_values=True)
    mon.dispatch("init", model, step=0)
    mon.dispatch("checkpoint", model, step=1, checkpoint_dir=str(tmp_path))
    assert (hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns) == before
    assert [p.requires_grad for p in model.parameters()] == flags and model.training
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert mon.check("saved_state").state_dict()["history"]  # plain picklable data


@pytest.mark.parametrize("in_modules_to_save", [False, True], ids=["unfrozen_by_hand", "in_modules_to_save"])
def test_hand_unfrozen_layernorm_under_peft(tmp_path, in_modules_to_save):
    from models import tiny_vit_classifier

    norm = "vit.layers.1.layernorm_after"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved_modules = ["classifier", *([norm] if in_modules_to_save else [])]
        model = get_peft_model(tiny_vit_classifier(),
                               LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=saved_modules))
    if not in_modules_to_save:
        model.base_model.model.get_submodule(norm).requires_grad_(True)
    model.save_pretrained(tmp_path)
    found = monitor(verify_values=True).dispatch("checkpoint", model, step=3, checkpoint_dir=str(tmp_path))
    if in_modules_to_save:
        assert found == []
    else:
        assert sorted(f.params for f in found) == [(f"{norm}.bias",), (f"{norm}.weight",)]
        assert f"add the module that holds it, {norm!r}, to modules_to_save" in found[0].hint
