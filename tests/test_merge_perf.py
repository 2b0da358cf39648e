"""What the merge check's speed-ups rest on: the batched reference hash is the per-tensor hash, the change
digest sees every change it is used for, and the GC pause and NaN scan leave nothing behind."""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from callbacks import (
    Monitor,  # noqa: E402
    )
from callbacks.hashing import digest as digest_module  # noqa: E402
from callbacks.hashing import reference  # noqa: E402
from callbacks.hashing.digest import change_digest, change_digests, device_digests, host_digest, keyed_digest  # noqa: E402
from callbacks.merging import gc_paused  # noqa: E402
from callbacks.primitives import snapshots  # noqa: E402
from callbacks.primitives.snapshots import ParamSnapshot, nonfinite_counts, snapshot_parameters  # noqa: E402

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


def test_batched_change_digests_are_the_per_tensor_digests_by_device(monkeypatch):
    """CPU: the host digest of each tensor; accelerators without the fused kernel: the keyed digest from
    KEYED_MIN_BYTES up and the batched spec hash below it, in the order given."""
    tensors = mixed_tensors()
    assert change_digests(tensors) == [host_digest(t) for t in tensors]
    assert change_digests([torch.empty(3, device="meta")] + tensors[:1]) == [-1, host_digest(tensors[0])]
    monkeypatch.setattr(digest_module, "KEYED_MIN_BYTES", 1000)
    expected = [keyed_digest(t) if t.numel() * t.element_size() >= 1000 else reference.hash_tensor(t) for t in tensors]
    assert {len(set(expected[:3])), expected[0] == keyed_digest(tensors[0])} == {3, True}
    assert device_digests(tensors) == expected


def test_snapshot_digests_every_storage_once_and_sees_a_single_change():
    model = tiny_lora_llama()
    first = snapshot_parameters(model)
    assert first.hashes == snapshot_parameters(model).hashes
    norm = model.base_model.model.model.norm.weight
    with torch.no_grad():
        norm.view(-1)[3] += 1.0
    second = snapshot_parameters(model)
    assert [n for n in first.hashes if first.hashes[n] != second.hashes[n]] == ["model.norm.weight"]


def test_merge_code_writing_an_unrelated_weight_is_caught():
    """A merge that writes a weight no merged layer owns (no tie, no shared buffer): MERGE_SIDE_EFFECT."""
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
def test_tied_head_merge_is_found_when_every_tensor_is_digested(tie):
    """Every tensor, the targets included, is measured with the change digest: the Gemma2 tied lm_head merge
    still gives its three findings and the untied twin none."""
    from models import tiny_gemma2
    from peft import LoraConfig, get_peft_model

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


@pytest.mark.parametrize("method", ["merge_and_unload", "merge_adapter"])
def test_every_merge_method_snapshots_with_the_one_digest(monkeypatch, method):
    """The speed-up is in place for every method: both observations hash with the batched change digest."""
    seen = []
    batched = digest_module.change_digests
    monkeypatch.setattr(snapshots, "change_digests", lambda ts, **kw: seen.append(len(ts)) or batched(ts, **kw))
    monitor = Monitor(policy="log")
    monitor.checked_merge(tiny_lora_llama(), method)
    assert len(seen) == 2 and all(seen) and monitor.findings == []


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
    snap = ParamSnapshot(hashes={}, storage={}, memory={}, dtypes={}, ties=None,
                                      tensors={"big": big, "nan": nan, "ok": torch.ones(3),
                                               "ids": torch.arange(3)})
    assert nonfinite_counts(snap, ["big", "nan", "ok", "ids"]) == {"big": 0, "nan": 2, "ok": 0}


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
