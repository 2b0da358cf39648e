"""The training job a recipe describes: model, optional adapter, data, trainer; run with the checks.

Recipe (top level; the ``integrity:`` section is read by :mod:`callbacks.recipe`)::

    seed: 0
    model:   {config: GPT2Config, args: {n_layer: 2, n_embd: 64, n_head: 2, vocab_size: 256}, task: causal_lm}
    adapter: {config: LoraConfig, args: {r: 4, target_modules: [c_attn]}}      # optional, PEFT
    data:    {source: corpus, seq_len: 32}          # corpus (shipped) | synthetic | file (path:)
    trainer: {type: hf, output_dir: out/quickstart, args: {max_steps: 6, save_steps: 3}}
    integrity: {...}

Nothing is downloaded: models are built from config classes (or a local folder); text is tokenised as bytes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from callbacks.errors import RecipeError
from callbacks.recipe import SECTION, IntegrityConfig, describe_validation_error, parse_integrity_section, read_yaml

#: the corpus shipped with the package (a few KB of English text)
CORPUS_PATH = os.path.join(os.path.dirname(__file__), "data", "corpus.txt")
#: byte-level tokenisation: one token per byte
BYTE_VOCAB = 256

TASKS: dict[str, str] = {
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "image_classification": "AutoModelForImageClassification",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """``model:``: an HF config class and its arguments (or a local folder), and the task head."""

    config: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    path: str | None = None
    task: Literal["causal_lm", "masked_lm", "sequence_classification", "image_classification"] = "causal_lm"

    @model_validator(mode="after")
    def _config_or_path(self) -> ModelSpec:
        if (self.config is None) == (self.path is None):
            raise ValueError("give exactly one of 'config' (an HF config class name) or 'path' (a local folder)")
        return self


class AdapterSpec(_Strict):
    """``adapter:``: a PEFT config class name and its arguments."""

    config: str
    args: dict[str, Any] = Field(default_factory=dict)


class DataSpec(_Strict):
    """``data:``: the shipped corpus, synthetic tokens, or a local text file, cut into rows of ``seq_len``."""

    source: Literal["corpus", "synthetic", "file"] = "corpus"
    path: str | None = None
    seq_len: int = Field(32, ge=2)
    rows: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _path_for_file(self) -> DataSpec:
        if self.source == "file" and not self.path:
            raise ValueError("source 'file' needs 'path'")
        return self


class TrainerSpec(_Strict):
    """``trainer:``: which trainer runs the job and its arguments (``TrainingArguments`` for ``hf``)."""

    type: Literal["hf", "lightning", "accelerate"] = "hf"
    output_dir: str = "out/run"
    args: dict[str, Any] = Field(default_factory=dict)


class JobRecipe(_Strict):
    """A whole recipe: the job and its ``integrity:`` section."""

    seed: int = 0
    model: ModelSpec
    adapter: AdapterSpec | None = None
    data: DataSpec = Field(default_factory=DataSpec)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    integrity: dict[str, Any] | None = None


def load_job(path: str) -> tuple[JobRecipe, IntegrityConfig]:
    """Read and validate a job recipe; every problem is a :class:`RecipeError` naming file and key."""
    data = read_yaml(path)
    integrity = parse_integrity_section(data.get(SECTION), source=path)
    try:
        job = JobRecipe.model_validate(data)
    except ValidationError as err:
        key, problem = describe_validation_error(JobRecipe, err, "")
        raise RecipeError(path, key, problem) from None
    return job, integrity


# -- building the parts ---------------------------------------------------------------------------------------
def build_model(spec: ModelSpec, source: str) -> torch.nn.Module:
    """The model from its config class (nothing downloaded) or a local folder."""
    import transformers

    auto = getattr(transformers, TASKS[spec.task])
    if spec.path is not None:
        if not os.path.isdir(spec.path):
            raise RecipeError(source, "model.path", f"no such local folder {spec.path!r} (nothing is downloaded)")
        return auto.from_pretrained(spec.path, local_files_only=True)
    config_cls = getattr(transformers, spec.config, None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, transformers.PretrainedConfig)):
        raise RecipeError(source, "model.config", f"{spec.config!r} is not a transformers config class "
                                                  "(e.g. GPT2Config, LlamaConfig, Gemma2Config, BertConfig)")
    try:
        config = config_cls(**spec.args)
        return auto.from_config(config)
    except (TypeError, ValueError) as err:
        raise RecipeError(source, "model.args", f"{spec.config} rejected these arguments: {err}") from None


def apply_adapter(model: torch.nn.Module, spec: AdapterSpec | None, source: str) -> torch.nn.Module:
    """Wrap ``model`` with a PEFT adapter when the recipe names one."""
    if spec is None:
        return model
    import peft

    config_cls = getattr(peft, spec.config, None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, peft.PeftConfig)):
        raise RecipeError(source, "adapter.config", f"{spec.config!r} is not a PEFT config class "
                                                    "(e.g. LoraConfig, IA3Config, LoHaConfig)")
    try:
        return peft.get_peft_model(model, config_cls(**spec.args))
    except (TypeError, ValueError) as err:
        raise RecipeError(source, "adapter.args", f"{spec.config} rejected these arguments: {err}") from None


def token_rows(spec: DataSpec, vocab_size: int, seed: int, source: str) -> torch.Tensor:
    """Rows of token ids (``rows`` x ``seq_len``): bytes of the corpus/file, or seeded random tokens."""
    if spec.source == "synthetic":
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (spec.rows or 64, spec.seq_len), generator=gen)
    path = CORPUS_PATH if spec.source == "corpus" else spec.path
    if vocab_size < BYTE_VOCAB:
        raise RecipeError(source, "model.args.vocab_size",
                          f"text is tokenised as bytes: vocab_size must be >= {BYTE_VOCAB}, got {vocab_size}")
    try:
        with open(path, "rb") as fh:
            data = torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8).to(torch.int64)
    except OSError as err:
        raise RecipeError(source, "data.path", f"cannot read {path!r}: {err.strerror}") from None
    n = data.numel() // spec.seq_len
    if n == 0:
        raise RecipeError(source, "data.seq_len", f"{path!r} is shorter than one row of {spec.seq_len} bytes")
    rows = data[: n * spec.seq_len].view(n, spec.seq_len)
    return rows[: spec.rows] if spec.rows else rows


class RowsDataset(torch.utils.data.Dataset):
    """Token rows as HF-style examples (``input_ids`` and ``labels``)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i].clone()}


def _vocab_size(model: torch.nn.Module) -> int:
    from callbacks.primitives.naming import unwrap_model

    config = getattr(unwrap_model(model), "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", BYTE_VOCAB))


# -- running ----------------------------------------------------------------------------------------------------
def run_job(path: str) -> tuple[int, Any]:
    """Run the recipe's job with the checks. Returns (exit code, monitor): 0 clean, 1 error findings."""
    from callbacks.errors import IntegrityError

    job, integrity = load_job(path)
    torch.manual_seed(job.seed)
    model = apply_adapter(build_model(job.model, path), job.adapter, path)
    rows = token_rows(job.data, _vocab_size(model), job.seed, path)
    runner = {"hf": _run_hf, "lightning": _run_lightning}.get(job.trainer.type)
    if runner is None:
        raise RecipeError(path, "trainer.type", f"{job.trainer.type!r} jobs are not runnable from a recipe yet; "
                                                "use hf or lightning")
    callback_holder: dict[str, Any] = {}
    try:
        runner(job, integrity, model, rows, path, callback_holder)
    except IntegrityError:
        pass  # the monitor already printed the table and wrote the report
    monitor = callback_holder["callback"].monitor
    return (1 if monitor.report.errors else 0), monitor


def _run_hf(job: JobRecipe, integrity: IntegrityConfig, model, rows, source: str, holder: dict) -> None:
    from transformers import Trainer, TrainingArguments, set_seed

    from callbacks.hf import IntegrityCallback

    set_seed(job.seed)
    defaults: dict[str, Any] = {"report_to": [], "use_cpu": not torch.cuda.is_available(), "disable_tqdm": True,
                                "save_strategy": "steps", "logging_steps": 10, "seed": job.seed}
    try:
        args = TrainingArguments(output_dir=job.trainer.output_dir, **{**defaults, **job.trainer.args})
    except (TypeError, ValueError) as err:
        raise RecipeError(source, "trainer.args", f"TrainingArguments rejected these arguments: {err}") from None
    holder["callback"] = callback = IntegrityCallback(config=integrity)
    Trainer(model=model, args=args, train_dataset=RowsDataset(rows), callbacks=[callback]).train()


def _run_lightning(job: JobRecipe, integrity: IntegrityConfig, model, rows, source: str, holder: dict) -> None:
    import pytorch_lightning as pl

    from callbacks.lightning import IntegrityCallback

    lr = float(job.trainer.args.get("learning_rate", 1e-3))
    batch_size = int(job.trainer.args.get("batch_size", 4))

    class CausalLMModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=lr)

    pl.seed_everything(job.seed, verbose=False)
    trainer_args = {k: v for k, v in job.trainer.args.items() if k not in ("learning_rate", "batch_size")}
    holder["callback"] = callback = IntegrityCallback(config=integrity)
    try:
        trainer = pl.Trainer(default_root_dir=job.trainer.output_dir, callbacks=[callback], logger=False,
                             enable_progress_bar=False, enable_model_summary=False, **trainer_args)
    except (TypeError, ValueError) as err:
        raise RecipeError(source, "trainer.args", f"Lightning Trainer rejected these arguments: {err}") from None
    loader = torch.utils.data.DataLoader(RowsDataset(rows), batch_size=batch_size, shuffle=False)
    trainer.fit(CausalLMModule(), train_dataloaders=loader)
