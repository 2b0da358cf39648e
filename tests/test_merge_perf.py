"""What the merge check's speed-ups rest on: the batched reference hash is the per-tensor hash, the change
digest sees every change it is used for, and the GC pause and NaN scan leave nothing behind."""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from callbacks import Monitor  # noqa: E402
from callbacks.checks import merge as merge_module  # noqa: E402
from callbacks.checks.merge import gc_paused, snapshot_parameters  # noqa: E402
from callbacks.hashing import digest as digest_module  # noqa: E402
from callbacks.hashing import reference  # noqa: E402
from callbacks.hashing.digest import change_digest, host_digest, keyed_digest  # noqa: E402

#: both digests: XXH3 over the bytes (CPU tensors) and the keyed torch digest (tensors on other devices)
DIGESTS = pytest.mark.parametrize("digest_fn", [host_digest, keyed_digest], ids=["host", "keyed"])


def mixed_tensors() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [
        torch.randn(40, 30, generator=gen), torch.randn(7, generator=gen).half(), torch.randn(300, generator=gen),
        torch.randn(5, 9, generator=gen).t(), torch.zeros(0), torch.randn(11, generator=gen).bfloat16(),
        torch.randint(0, 255, (33,), dtype=torch.uint8, generator=gen), torch.randn(6, generator=gen).double(),
        torch.tensor([True, False, True]), torch.randint(-9, 9, (13,), dtype=torch.int64, generator=gen),
        torch.randn(3, dtype=torch.complex64, generator=gen), torch.randn(1000, generator=gen),
    ]


@pytest.mark.parametrize(("chunk", "cached_keys"), [(5, 0), (64, 100), (256, 7), (1 << 16, 1 << 20)])
def test_batched_reference_hash_equals_the_per_tensor_hash(monkeypatch, chunk, cached_keys):
    tensors = mixed_tensors()
    single = [reference.hash_tensor(t) for t in tensors]  # one tensor per pass
    monkeypatch.setattr(reference, "CHUNK_UNITS", chunk)  # tensors split across and packed into chunks
    monkeypatch.setattr(reference, "KEY_CACHE_UNITS", cached_keys)  # keys read, computed, or both in one chunk
    assert reference.hash_tensors(tensors) == single
    assert reference.hash_tensors(tensors[::-1]) == single[::-1]


@DIGESTS
def test_change_digest_sees_any_single_bit_flip(digest_fn):
    base = torch.randn(3 * digest_module.DIGEST_CHUNK + 17, generator=torch.Generator().manual_seed(2))
    digest = digest_fn(base)
    assert digest_fn(base.clone()) == digest
    words = base.view(torch.int32)
    for index in (0, 1, digest_module.DIGEST_CHUNK - 1, digest_module.DIGEST_CHUNK, 2 * digest_module.DIGEST_CHUNK + 5,
                  base.numel() - 1):
        for bit in (0, 17, 31):
            flipped = base.clone()
            flipped.view(torch.int32)[index] = words[index] ^ (1 << bit) if bit < 31 else words[index] ^ -(2**31)
            assert digest_fn(flipped) != digest, (index, bit)
    swapped = base.clone()
    swapped[[0, 1]] = base[[1, 0]]
    assert digest_fn(swapped) != digest


@DIGESTS
def test_change_digest_covers_dtype_shape_and_every_dtype(digest_fn):
    x = torch.randn(8, 4)
    assert digest_fn(x) != digest_fn(x.reshape(4, 8))
    assert digest_fn(x) != digest_fn(x.view(torch.int32))
    values = [digest_fn(t) for t in mixed_tensors()]  # bf16, bool, complex, empty, non-contiguous...
    assert values == [digest_fn(t.clone()) for t in mixed_tensors()] and len(set(values)) == len(values)
    transposed = torch.randn(5, 9).t()
    assert digest_fn(transposed) == digest_fn(transposed.contiguous())  # defined on the contiguous bytes


def test_keyed_digest_gives_unaligned_tensors_the_spec_hash():
    odd = torch.randn(3).half()  # 6 bytes: not whole int32 words
    assert keyed_digest(odd) == reference.hash_tensor(odd)


def test_change_digest_on_cpu_is_the_host_digest():
    x = torch.randn(100)
    assert change_digest(x) == host_digest(x) != keyed_digest(x)


def tiny_lora_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                         tie_word_embeddings=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                   init_lora_weights=False))


def test_snapshot_digests_only_what_the_merge_may_not_write(monkeypatch):
    model = tiny_lora_llama()
    targets = {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"}
    monkeypatch.setattr(merge_module, "HOST_DIGEST_MIN_BYTES", 64)  # tensors under 64 bytes keep the spec hash
    before = snapshot_parameters(model, spec=targets)
    full = snapshot_parameters(model)
    assert not before.digested & targets and "model.norm.weight" in before.digested
    assert "model.norm.weight" in before.digested and before.hashes["model.norm.weight"] != full.hashes[
        "model.norm.weight"]  # measured with the digest
    assert all(before.hashes[n] == full.hashes[n] for n in targets)  # targets keep the spec hash
    again = snapshot_parameters(model, digest=before.digested)
    assert again.digested == before.digested and again.hashes == before.hashes


@pytest.mark.parametrize("digest_min_bytes", [0, 1 << 18])
def test_merge_code_writing_an_unrelated_weight_is_caught(monkeypatch, digest_min_bytes):
    """A merge that writes a weight no merged layer owns (no tie, no shared buffer): MERGE_SIDE_EFFECT, whether
    that weight is measured with the digest (0) or the spec hash (every tensor under 256 KiB)."""
    monkeypatch.setattr(merge_module, "HOST_DIGEST_MIN_BYTES", digest_min_bytes)
    model = tiny_lora_llama()
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    norm = model.base_model.model.model.norm.weight
    merge = layer.merge

    def merge_that_writes_the_norm(*args, **kwargs):  # a buggy merge implementation
        with torch.no_grad():
            norm.view(-1)[3] += 1.0
        return merge(*args, **kwargs)

    layer.merge = merge_that_writes_the_norm
    monitor = Monitor(policy="log")
    monitor.checked_merge(model)
    side = [f for f in monitor.findings if f.code == "MERGE_SIDE_EFFECT"]
    assert [f.params for f in side] == [("model.norm.weight",)]
    assert side[0].event == "merge" and side[0].details["via"] == []


@pytest.mark.parametrize("tie", [True, False])
def test_tied_head_merge_is_found_when_every_tensor_is_digested(monkeypatch, tie):
    """merge_and_unload on the torch backend measures targets with the digest too: with every tensor over the
    digest threshold, the Gemma2 tied lm_head merge still gives its three findings and the untied twin none."""
    from models import tiny_gemma2
    from peft import LoraConfig, get_peft_model

    monkeypatch.setattr(merge_module, "HOST_DIGEST_MIN_BYTES", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_gemma2(tie=tie), LoraConfig(r=4, target_modules=["lm_head"],
                                                                init_lora_weights=False))
    monitor = Monitor(policy="log")
    monitor.checked_merge(model, step=3)
    (merge,) = monitor.check("merge").merges
    if not tie:
        assert monitor.findings == [] and merge["changed"] == 1
        return
    found = {f.code: f for f in monitor.findings}
    assert sorted(found) == ["MERGE_MISMATCH", "MERGE_SIDE_EFFECT", "TIE_BROKEN"]
    assert found["MERGE_SIDE_EFFECT"].params == ("model.embed_tokens.weight",)
    assert found["MERGE_SIDE_EFFECT"].details["via"] == ["lm_head.weight"] and found["TIE_BROKEN"].step == 3
    assert found["TIE_BROKEN"].details["merged"] == ["lm_head.weight"]


def test_merge_and_unload_digests_its_targets_on_the_torch_backend(monkeypatch):
    """The speed-up is in place: every tensor of the CPU model, the targets included, is measured with the digest."""
    seen = []
    snapshot = merge_module.snapshot_parameters
    monkeypatch.setattr(merge_module, "snapshot_parameters",
                        lambda *args, **kwargs: seen.append(snapshot(*args, **kwargs)) or seen[-1])
    Monitor(policy="log").checked_merge(tiny_lora_llama())
    before, after = seen
    targets = {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"}
    assert targets <= before.digested and after.digested == before.digested


def test_merge_and_unload_spec_hashes_everything_where_the_fused_kernel_runs(monkeypatch):
    """On the fused backend one launch hashes every tensor: no digest (per-tensor torch calls) is used."""
    monkeypatch.setattr(merge_module, "resolve_backend", lambda backend, tensors: "triton")
    seen = []
    snapshot = merge_module.snapshot_parameters
    monkeypatch.setattr(merge_module, "snapshot_parameters",
                        lambda *args, **kwargs: seen.append(snapshot(*args, **kwargs)) or seen[-1])
    monitor = Monitor(policy="log")
    monitor.checked_merge(tiny_lora_llama())
    assert [s.digested for s in seen] == [frozenset(), frozenset()] and monitor.findings == []


def test_clean_merge_of_the_same_model_has_no_finding():
    monitor = Monitor(policy="log")
    monitor.checked_merge(tiny_lora_llama())
    assert monitor.findings == []


def test_gc_pause_restores_the_collector_state():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a user's disabled collector stays disabled
    finally:
        gc.enable()


def test_nonfinite_scan_counts_exactly_even_when_a_sum_overflows():
    big = torch.full((4,), 60000.0, dtype=torch.float16)  # finite values, the fp16 sum overflows to inf
    nan = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    snap = merge_module.ParamSnapshot(hashes={}, storage={}, memory={}, dtypes={}, ties=None,
                                      tensors={"big": big, "nan": nan, "ok": torch.ones(3),
                                               "ids": torch.arange(3)})
    assert merge_module._nonfinite(snap, ["big", "nan", "ok", "ids"]) == {"big": 0, "nan": 2, "ok": 0}


@DIGESTS
def test_change_digest_sees_structured_changes_of_small_tensors(digest_fn):
    """Negation flips every sign bit; a doubling moves every exponent: no such change may cancel out."""
    gen = torch.Generator().manual_seed(3)
    for size in (2, 3, 64, 256):
        for _ in range(50):
            x = torch.randn(size, generator=gen)
            digest = digest_fn(x)
            assert digest_fn(-x) != digest
            assert digest_fn(2 * x) != digest
            assert digest_fn(x.half().float()) != digest  # rounding: low mantissa bits cleared


def test_probe_restores_mixed_modes_and_honours_a_custom_setattr():
    from torch import nn

    from callbacks.primitives.probe import run_probe

    seen = []

    class Recording(nn.Linear):
        def __setattr__(self, name, value):
            if name == "training":
                seen.append(value)
            super().__setattr__(name, value)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.rec, self.out = nn.Embedding(16, 8), Recording(8, 8), nn.Linear(8, 4)

        def forward(self, input_ids):
            assert not any(m.training for m in self.modules())  # eval during the probe
            return self.out(self.rec(self.emb(input_ids)))

    net = Net()
    net.out.eval()
    seen.clear()
    modes = {name: m.training for name, m in net.named_modules()}
    run_probe(net, {"input_ids": torch.tensor([[1, 2, 3]])})
    assert {name: m.training for name, m in net.named_modules()} == modes
    assert seen == [False, True]  # the custom __setattr__ saw both switches
