"""False-alarm and recall sweep across transformers architectures, in real HF Trainer runs.

For each architecture a tiny model is built from its config (nothing downloaded), wrapped with PEFT LoRA
(``target_modules="all-linear"``, r=4) and trained for six steps (past the adapter check's ``dead_after_steps``
and m2m_100's LayerDrop horizon) by a real ``transformers.Trainer`` with a checkpoint every two steps and
``IntegrityCallback(policy="log")``; then the adapters are merged through the monitor's checked merge. A healthy
run must end with no ``error``/``warning`` finding and no ``CHECK_FAILED`` (``ADAPTER_UNUSED``, the one warning a
healthy run may show, is counted separately).

Then faults are injected on a subset and must be caught (recall):

* ``untied_head``: the output head of a tied model gets its own copy of the embedding (expect ``TIE_BROKEN``);
* ``lora_reinit``: a module-wide re-init after ``get_peft_model`` redraws every ``lora_A`` and ``lora_B`` from
  N(0, 0.02) (expect ``ADAPTER_INIT_WRONG``; a ``lora_B``-only redraw with ``lora_A`` untouched is what a loaded
  adapter looks like, so it is judged as loaded);
* ``unsaved_trainable``: a bare trainable ``nn.Parameter`` on the wrapped model, which PEFT does not save
  (expect ``UNSAVED_TRAINABLE``).

An architecture whose model cannot be built or run one forward/backward without the callback (a transformers or
PEFT limitation, unrelated to the checks) is reported as ``skipped`` and not counted. Exits 1 if a healthy run
has an error/warning (``ADAPTER_UNUSED`` aside) or ``CHECK_FAILED``, if a run crashes, or if recall < 100%.

    python benchmarks/arch_sweep.py [--quick] [--arch NAME ...] [--head lora|save] [--no-inject] [--show-unused]
                                    [--verbose]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

VOCAB = 128
SEQ = 12
ROWS = 8
BATCH = 4
NUM_LABELS = 3

# -- tiny configs ---------------------------------------------------------------------------------------------------

# Llama-style decoder sizes; each architecture adds or renames what its config calls them.
DECODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GQA = dict(DECODER, num_key_value_heads=2)
ENCODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=64, type_vocab_size=2, pad_token_id=0)
BART_LIKE = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                 pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
VIT_LIKE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                patch_size=8, num_channels=3, num_labels=NUM_LABELS)
GPT2_LIKE = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64)

#: model_type -> (task, config kwargs). Tasks: causal, masked, seq2seq, vision, speech.
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    # causal LMs
    "gpt2": ("causal", GPT2_LIKE),
    "gpt_neo": ("causal", dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                               max_position_embeddings=64, attention_types=[[["global", "local"], 1]],
                               window_size=8)),
    "gptj": ("causal", dict(GPT2_LIKE, rotary_dim=4)),
    "codegen": ("causal", dict(GPT2_LIKE, n_ctx=64, rotary_dim=4)),
    "opt": ("causal", dict(DECODER, ffn_dim=64, word_embed_proj_dim=32)),
    "bloom": ("causal", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
    "llama": ("causal", GQA),
    "mistral": ("causal", GQA),
    "mixtral": ("causal", dict(GQA, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("causal", GQA),
    "qwen3": ("causal", dict(GQA, head_dim=8)),
    "qwen3_moe": ("causal", dict(GQA, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "olmoe": ("causal", dict(GQA, num_experts=4, num_experts_per_tok=2)),
    "phi": ("causal", DECODER),
    "phi3": ("causal", GQA),
    "gemma": ("causal", dict(GQA, head_dim=8)),
    "gemma2": ("causal", dict(GQA, head_dim=8)),
    "falcon": ("causal", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)),
    "stablelm": ("causal", GQA),
    "starcoder2": ("causal", GQA),
    "mpt": ("causal", dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=64)),
    "gpt_neox": ("causal", DECODER),
    "cohere": ("causal", GQA),
    "granite": ("causal", GQA),
    "olmo": ("causal", GQA),
    "olmo2": ("causal", GQA),
    "gpt_bigcode": ("causal", GPT2_LIKE),
    "biogpt": ("causal", DECODER),
    "xglm": ("causal", dict(vocab_size=VOCAB, d_model=32, num_layers=2, attention_heads=4, ffn_dim=64,
                            max_position_embeddings=64, pad_token_id=1)),
    "mamba": ("causal", dict(vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                             conv_kernel=4)),
    # masked LMs
    "bert": ("masked", ENCODER),
    "roberta": ("masked", dict(ENCODER, pad_token_id=1)),
    "xlm-roberta": ("masked", dict(ENCODER, pad_token_id=1)),
    "camembert": ("masked", dict(ENCODER, pad_token_id=1)),
    "albert": ("masked", dict(ENCODER, embedding_size=16)),
    "distilbert": ("masked", dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                  max_position_embeddings=64, pad_token_id=0)),
    "deberta": ("masked", ENCODER),
    "deberta-v2": ("masked", ENCODER),
    "electra": ("masked", dict(ENCODER, embedding_size=32)),
    "ernie": ("masked", ENCODER),
    "mpnet": ("masked", dict(ENCODER, pad_token_id=1)),
    "roformer": ("masked", dict(ENCODER, embedding_size=32)),
    "esm": ("masked", dict(ENCODER, pad_token_id=1, mask_token_id=3, position_embedding_type="absolute")),
    "longformer": ("masked", dict(ENCODER, pad_token_id=1, attention_window=[4, 4])),
    "mobilebert": ("masked", dict(ENCODER, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
                                  num_feedforward_networks=1)),
    # seq2seq
    "t5": ("seq2seq", dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                           pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
    "mt5": ("seq2seq", dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)),
    "bart": ("seq2seq", BART_LIKE),
    "m2m_100": ("seq2seq", BART_LIKE),
    "mbart": ("seq2seq", BART_LIKE),
    "marian": ("seq2seq", dict(BART_LIKE, decoder_start_token_id=1)),
    "pegasus": ("seq2seq", BART_LIKE),
    "blenderbot-small": ("seq2seq", BART_LIKE),
    # vision (image classification)
    "vit": ("vision", VIT_LIKE),
    "deit": ("vision", VIT_LIKE),
    "beit": ("vision", VIT_LIKE),
    "dinov2": ("vision", VIT_LIKE),
    "swin": ("vision", dict(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1],
                            num_heads=[2, 2], window_size=2, num_labels=NUM_LABELS)),
    "convnext": ("vision", dict(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                num_labels=NUM_LABELS)),
    "resnet": ("vision", dict(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                              layer_type="basic", num_labels=NUM_LABELS)),
    "regnet": ("vision", dict(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                              groups_width=8, num_labels=NUM_LABELS)),
    "levit": ("vision", dict(image_size=64, num_channels=3, patch_size=16, hidden_sizes=[16, 32, 48],
                             num_attention_heads=[1, 2, 3], depths=[1, 1, 1], key_dim=[8, 8, 8],
                             num_labels=NUM_LABELS)),
    "poolformer": ("vision", dict(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_encoder_blocks=2,
                                  patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1], num_labels=NUM_LABELS)),
    # speech seq2seq
    "whisper": ("speech", dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
                               max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                               decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])),
}

QUICK = ["gpt2", "llama", "qwen3_moe", "bert", "roberta", "t5", "bart", "vit"]

#: injection kind -> (expected code, architectures preferred for it; the first present ones are used)
INJECTIONS: dict[str, tuple[str, list[str]]] = {
    "untied_head": ("TIE_BROKEN", ["gpt2", "gemma", "bloom", "bert", "roberta", "albert", "opt", "t5"]),
    "lora_reinit": ("ADAPTER_INIT_WRONG", ["gpt2", "qwen3_moe", "bert", "t5", "vit", "llama", "bart"]),
    "unsaved_trainable": ("UNSAVED_TRAINABLE", ["gpt2", "qwen3_moe", "bert", "t5", "vit", "llama", "bart"]),
}
PER_INJECTION = 5

#: what the checked merge rightly reports when LoRA sits on a tied head (``--head lora``)
MERGE_HAZARD = ("MERGE_SIDE_EFFECT", "MERGE_MISMATCH", "TIE_BROKEN")


# -- building -------------------------------------------------------------------------------------------------------

class Skip(Exception):
    """The model cannot be built or run without the callback: not ours to judge."""


def build_model(arch: str) -> tuple[nn.Module, str]:
    """A tiny model of ``arch`` with its task head, seeded."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageClassification,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSpeechSeq2Seq,
    )

    task, kwargs = ARCHS[arch]
    auto = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM, "seq2seq": AutoModelForSeq2SeqLM,
            "vision": AutoModelForImageClassification, "speech": AutoModelForSpeechSeq2Seq}[task]
    torch.manual_seed(0)
    try:
        config = AutoConfig.for_model(arch, **kwargs)
        # Some heads map to several classes (DeiT, LeViT: plain and with-teacher); the first is the trainable one.
        cls = auto._model_mapping[type(config)]
        model = (cls[0] if isinstance(cls, (tuple, list)) else cls)(config)
    except Exception as exc:  # noqa: BLE001 - any failure here is transformers', reported as a skip
        raise Skip(f"build: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from exc
    n = sum(p.numel() for p in model.parameters())
    if n > 3_000_000:
        raise Skip(f"config not tiny ({n} parameters): a size kwarg is not honoured")
    return model, task


def is_tied(model: nn.Module) -> bool:
    """The output head shares its weight with the input embedding."""
    try:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    except Exception:  # noqa: BLE001 - vision models have neither
        return False
    return out is not None and inp is not None and getattr(out, "weight", None) is getattr(inp, "weight", 0)


def example(task: str, model: nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One training row with the input keys and labels the task's forward takes."""
    cfg = model.config
    if task in ("causal", "masked"):
        ids = torch.randint(3, VOCAB, (SEQ,), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids.clone()}
    if task == "seq2seq":
        ids = torch.randint(3, VOCAB, (SEQ,), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long),
                "labels": torch.randint(3, VOCAB, (SEQ // 2,), generator=gen)}
    if task == "speech":
        frames = 2 * cfg.max_source_positions
        return {"input_features": torch.randn(cfg.num_mel_bins, frames, generator=gen),
                "labels": torch.randint(3, VOCAB, (SEQ // 2,), generator=gen)}
    size = getattr(cfg, "image_size", 32)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return {"pixel_values": torch.randn(cfg.num_channels, size, size, generator=gen),
            "labels": torch.randint(0, NUM_LABELS, (), generator=gen)}


class Rows(torch.utils.data.Dataset):
    """A fixed list of training rows."""

    def __init__(self, rows: list[dict[str, torch.Tensor]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def head_name(model: nn.Module) -> str | None:
    """The qualified name of the output head (``lm_head``, ``cls.predictions.decoder``), if there is one."""
    try:
        head = model.get_output_embeddings()
    except Exception:  # noqa: BLE001 - vision models have none
        return None
    return next((name for name, module in model.named_modules() if module is head), None) if head else None


def lora(model: nn.Module, task: str, head: str | None = None):
    """LoRA r=4 on every linear layer (PEFT leaves the output layer out). ``head="lora"`` also puts LoRA on the
    output head (every linear leaf name, the head's included); ``head="save"`` trains a full copy of the head
    (``modules_to_save``)."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    # Whisper is wrapped without a task type, as its PEFT guides do (the seq2seq wrapper passes input_ids)
    task_type = {"causal": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}.get(task)
    targets: Any = "all-linear"
    to_save = None
    name = head_name(model)
    if head in ("lora", "lora-tied") and name:
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))})
    elif head == "save" and name:
        to_save = [name.rsplit(".", 1)[-1]]
    if getattr(model.config, "model_type", None) == "mamba" and head is None:
        targets = ["in_proj", "x_proj", "dt_proj"]  # PEFT refuses Mamba's out_proj and conv1d under all-linear
    extra = {"ensure_weight_tying": True} if head == "lora-tied" else {}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task_type, modules_to_save=to_save,
                        **extra)
    try:
        return get_peft_model(model, config)
    except Exception as exc:  # noqa: BLE001 - e.g. no linear layer to target
        raise Skip(f"peft: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from exc


def smoke(model: nn.Module, rows: list[dict[str, torch.Tensor]]) -> None:
    """One forward/backward without any callback, so transformers-side failures are skips, not findings."""
    batch = {k: torch.stack([r[k] for r in rows[:2]]) for k in rows[0]}
    try:
        model(**batch).loss.backward()
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"forward: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}") from exc
    model.zero_grad(set_to_none=True)


# -- injections -----------------------------------------------------------------------------------------------------

def untie_head(peft_model, task: str) -> None:
    """The head gets its own copy of the embedding (what a resize or a load with strict ties off does)."""
    base = peft_model.get_base_model()
    head = base.get_output_embeddings()
    head = getattr(head, "base_layer", head)  # with LoRA on the head, the Linear it wraps
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)


def reinit_lora(peft_model, task: str) -> None:
    """A module-wide re-init after ``get_peft_model`` (``_init_weights`` applied over the wrapped model, what a
    late ``post_init()`` does): every LoRA ``Linear`` is redrawn, ``lora_A`` and ``lora_B`` alike."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name or "lora_embedding" in name:
                nn.init.normal_(p, std=0.02)


def add_unsaved_trainable(peft_model, task: str) -> None:
    """A bare trainable parameter on the wrapped model: PEFT's adapter state dict does not hold it."""
    peft_model.get_base_model().extra_scale = nn.Parameter(torch.ones(4))


INJECT: dict[str, Callable[[Any, str], None]] = {
    "untied_head": untie_head, "lora_reinit": reinit_lora, "unsaved_trainable": add_unsaved_trainable,
}


# -- running --------------------------------------------------------------------------------------------------------

@dataclass
class Result:
    """What one run found."""

    arch: str
    task: str = "?"
    tied: bool = False
    skipped: str | None = None
    crashed: str | None = None
    findings: list[Any] = field(default_factory=list)
    merged: bool = False
    head: str | None = None
    seconds: float = 0.0

    def of(self, code: str) -> list[Any]:
        """Findings with ``code``."""
        return [f for f in self.findings if f.code == code]

    @property
    def hazards(self) -> list[Any]:
        """True findings of a healthy-looking setup: with LoRA on a tied head, ``merge_and_unload`` writes the
        head's delta into the embedding it is tied to (the merged model differs from the trained one)."""
        if self.head not in ("lora", "lora-tied"):
            return []
        return [f for f in self.findings if f.event == "merge" and f.code in MERGE_HAZARD]

    @property
    def alarms(self) -> list[Any]:
        """error/warning findings other than ADAPTER_UNUSED, CHECK_FAILED and the true merge hazards."""
        hazards = self.hazards
        return [f for f in self.findings if f.severity in ("error", "warning")
                and f.code not in ("ADAPTER_UNUSED", "CHECK_FAILED") and f not in hazards]


def run(arch: str, inject: str | None = None, verbose: bool = False, head: str | None = None) -> Result:
    """Build, wrap, (inject), train six steps with a checkpoint, checked merge; return the findings."""
    from transformers import Trainer, TrainingArguments

    from callbacks.hf import IntegrityCallback

    result = Result(arch, head=head)
    start = time.perf_counter()
    try:
        model, result.task = build_model(arch)
        result.tied = is_tied(model)
        gen = torch.Generator().manual_seed(0)
        rows = [example(result.task, model, gen) for _ in range(ROWS)]
        if head and not (result.tied and result.task in ("causal", "masked", "seq2seq")):
            raise Skip(f"--head {head}: not a tied language model")
        peft_model = lora(model, result.task, head)
        smoke(peft_model, rows)
    except Skip as exc:
        result.skipped = str(exc)
        return result
    if inject is not None:
        INJECT[inject](peft_model, result.task)
    callback = IntegrityCallback(policy="log")
    sink = io.StringIO()
    try:
        with (tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(sink),
              contextlib.redirect_stderr(sink)):
            args = TrainingArguments(output_dir=out, max_steps=6, save_steps=2, per_device_train_batch_size=BATCH,
                                     report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1000,
                                     learning_rate=1e-2)
            trainer = Trainer(model=peft_model, args=args, train_dataset=Rows(rows), callbacks=[callback])
            trainer.train()
            callback.monitor.checked_merge(trainer.model)
            merge_check = callback.monitor.check("merge")
            result.merged = bool(merge_check is not None and getattr(merge_check, "merges", None))
    except Exception as exc:  # noqa: BLE001 - a crash with the callback on is a defect to report
        result.crashed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else repr(exc)
        if verbose:
            traceback.print_exc()
    finally:
        callback.monitor.close()
    if verbose:
        print(sink.getvalue())
    result.findings = callback.monitor.findings
    result.seconds = time.perf_counter() - start
    return result


def describe(f: Any) -> str:
    """``CODE[severity]@event params: message`` in one line."""
    params = ",".join(f.params[:4]) + (f",+{len(f.params) - 4}" if len(f.params) > 4 else "")
    message = " ".join(str(f.message).split())[:220]
    return f"{f.code}[{f.severity}]@{f.event} ({params}): {message}"


def line(r: Result) -> str:
    """One line per healthy run."""
    if r.skipped:
        return f"{r.arch:<18} skipped: {r.skipped}"
    errors = sum(f.severity == "error" for f in r.alarms)
    head = (f"{r.arch:<18} {r.task:<8} tied={'y' if r.tied else 'n'}  err={errors} warn={len(r.alarms) - errors}"
            f" unused={len(r.of('ADAPTER_UNUSED'))} failed={len(r.of('CHECK_FAILED'))}"
            f" n/a={len(r.of('CHECK_NOT_APPLICABLE'))}"
            f"{f' merge-hazard={len(r.hazards)}' if r.head in ('lora', 'lora-tied') else ''}"
            f" merge={'checked' if r.merged else 'NOT RECORDED'}"
            f"  {r.seconds:.1f}s")
    bad = r.alarms + r.of("CHECK_FAILED")
    if r.crashed:
        head += f"\n    CRASHED: {r.crashed}"
    return head + "".join(f"\n    {describe(f)}" for f in bad)


def main() -> int:
    """Run the sweep; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} architectures: {', '.join(QUICK)}")
    parser.add_argument("--arch", action="append", choices=sorted(ARCHS), help="run only this one (repeatable)")
    parser.add_argument("--head", choices=["lora", "lora-tied", "save"],
                        help="tied language models only, the head trained too: LoRA on it (every linear leaf name "
                             "targeted; lora-tied: with PEFT's ensure_weight_tying=True) or a full copy "
                             "(modules_to_save)")
    parser.add_argument("--no-inject", action="store_true", help="healthy runs only")
    parser.add_argument("--show-unused", action="store_true", help="print ADAPTER_UNUSED/CHECK_NOT_APPLICABLE too")
    parser.add_argument("--verbose", action="store_true", help="tracebacks and the monitor's own output")
    args = parser.parse_args()

    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")

    archs = args.arch or (QUICK if args.quick else list(ARCHS))
    started = time.perf_counter()
    results = []
    for arch in archs:
        r = run(arch, verbose=args.verbose, head=args.head)
        results.append(r)
        print(line(r), flush=True)
        if args.show_unused:
            for f in r.of("ADAPTER_UNUSED") + r.of("CHECK_NOT_APPLICABLE"):
                print(f"    ({describe(f)})")
    ran = [r for r in results if not r.skipped]
    alarms = sum(len(r.alarms) for r in ran)
    failed = sum(len(r.of("CHECK_FAILED")) for r in ran)
    unused = sum(len(r.of("ADAPTER_UNUSED")) for r in ran)
    crashed = [r.arch for r in ran if r.crashed]
    unmerged = [r.arch for r in ran if not r.merged and not r.crashed]
    kinds = {t: sum(r.task == t for r in ran) for t in ("causal", "masked", "seq2seq", "vision", "speech")}
    print(f"\nHEALTHY: {len(ran)} architectures run ({', '.join(f'{k} {v}' for k, v in kinds.items())}; "
          f"tied {sum(r.tied for r in ran)}, untied {sum(not r.tied for r in ran)}), "
          f"{len(results) - len(ran)} skipped; errors+warnings {alarms}, CHECK_FAILED {failed}, "
          f"crashed {len(crashed)}{' ' + str(crashed) if crashed else ''}, merge not recorded {len(unmerged)}"
          f"{' ' + str(unmerged) if unmerged else ''}; ADAPTER_UNUSED {unused} "
          f"(in {sum(bool(r.of('ADAPTER_UNUSED')) for r in ran)} architectures)"
          + (f"; true merge hazards (tied head merged) in {sum(bool(r.hazards) for r in ran)} architectures"
             if args.head in ("lora", "lora-tied") else ""), flush=True)

    caught_total = [0, 0]
    if not args.no_inject:
        print()
        usable = {r.arch: r for r in ran if not r.crashed}
        for kind, (code, preferred) in INJECTIONS.items():
            pool = [a for a in preferred if a in usable] + [a for a in usable if a not in preferred]
            if kind == "untied_head" and args.head == "save":
                print("inject untied_head: not run with --head save (the head is a trained copy by design)")
                continue
            if kind == "untied_head":
                pool = [a for a in pool if usable[a].tied and usable[a].task in ("causal", "masked")]
            chosen = pool[:PER_INJECTION]
            caught = 0
            for arch in chosen:
                r = run(arch, inject=kind, verbose=args.verbose, head=args.head)
                hit = r.of(code)
                caught += bool(hit)
                where = (f"{hit[0].event}@{hit[0].step} ({','.join(hit[0].params[:3])})" if hit
                         else "MISSED; found: " + (", ".join(sorted({f.code for f in r.findings})) or "nothing"))
                if r.crashed:
                    where += f"; CRASHED: {r.crashed}"
                print(f"inject {kind:<18} {arch:<14} expect {code:<19} {'caught' if hit else 'MISSED'}: {where}",
                      flush=True)
            print(f"RECALL {kind}: {caught}/{len(chosen)}", flush=True)
            caught_total[0] += caught
            caught_total[1] += len(chosen)
        print(f"RECALL overall: {caught_total[0]}/{caught_total[1]}")
    print(f"total {time.perf_counter() - started:.0f}s")
    ok = alarms == 0 and failed == 0 and not crashed and not unmerged and caught_total[0] == caught_total[1]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
