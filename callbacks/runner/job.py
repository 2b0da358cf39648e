"""The training job a recipe describes: model, optional adapter, data, trainer, faults; run with the checks.

Recipe (top level; the ``integrity:`` section is read by :mod:`callbacks.recipe`)::

    seed: 0
    model:   {config: GPT2Config, args: {n_layer: 2, n_embd: 64, n_head: 2, vocab_size: 256}, task: causal_lm}
    adapter: {config: LoraConfig, args: {r: 4, target_modules: [c_attn]}}      # optional, PEFT
    data:    {source: corpus, seq_len: 32}          # corpus (shipped) | synthetic | file (path:)
    trainer: {type: hf, output_dir: out/quickstart, args: {max_steps: 6, save_steps: 3}}
    faults:  [{fault: callbacks.runner.gallery:ReinitAfterWrap}]                      # optional, the gallery's
    integrity: {...}

Nothing is downloaded: models are built from config classes, a ``module:function`` factory or a local folder;
text is tokenised as bytes. Every key is validated with pydantic (:func:`recipe_json_schema` exports the whole
format); errors name the file, the key path and what is allowed.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from callbacks.errors import IntegrityError, RecipeError
from callbacks.findings import Finding
from callbacks.monitor import Monitor
from callbacks.recipe import SECTION, IntegrityConfig, describe_validation_error, parse_integrity_section, read_yaml
from callbacks.runner.gallery import Fault

#: the corpus shipped with the package (a few KB of English text)
CORPUS_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "corpus.txt")
#: byte-level tokenisation: one token per byte
BYTE_VOCAB = 256

#: ``model.task`` -> the transformers auto class that builds a model for it
TASKS: dict[str, str] = {
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "sequence_classification": "AutoModelForSequenceClassification",
    "image_classification": "AutoModelForImageClassification",
}
#: the values ``model.task`` allows
Task = Literal["causal_lm", "masked_lm", "sequence_classification", "image_classification"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: modules that moved into :mod:`callbacks.runner`: recipes written for the old paths keep working
MOVED_MODULES = {f"callbacks.{name}": f"callbacks.runner.{name}" for name in ("gallery", "job", "audit", "cli")}


def resolve_import_path(path: str) -> Any:
    """The object named ``package.module:attribute``; a ValueError that says what is wrong otherwise."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"expected 'package.module:name', got {path!r}")
    module_name = MOVED_MODULES.get(module_name, module_name)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r}: {err}") from None
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    return obj


class ModelSpec(_Strict):
    """``model:``: an HF config class and its arguments, a local folder, or a ``module:function`` factory.

    ``freeze`` lists parameter-name patterns (``fnmatch``, user names) set to ``requires_grad=False`` before any
    adapter is applied (full fine-tuning with frozen parts).
    """

    config: str | None = Field(None, description="transformers config class, e.g. GPT2Config")
    path: str | None = Field(None, description="local folder with config.json (and weights)")
    factory: str | None = Field(None, description="'module:function' returning an nn.Module, e.g. "
                                                  "callbacks.runner.gallery:lingua_lm")
    args: dict[str, Any] = Field(default_factory=dict, description="arguments of the config class or factory")
    task: Task = "causal_lm"
    freeze: list[str] = Field(default_factory=list, description="parameter name patterns to freeze")

    @field_validator("factory")
    @classmethod
    def _factory_is_callable(cls, value: str | None) -> str | None:
        if value is not None and not callable(resolve_import_path(value)):
            raise ValueError(f"factory {value!r} is not callable")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if sum(x is not None for x in (self.config, self.path, self.factory)) != 1:
            raise ValueError("give exactly one of 'config' (an HF config class name), 'path' (a local folder) "
                             "or 'factory' ('module:function')")
        return self


class AdapterSpec(_Strict):
    """``adapter:``: a PEFT config class (``library: peft``) or an ``adapters`` config class (``library:
    adapters``, added under ``name`` and activated for training with ``train_adapter``), and its arguments.

    ``unfreeze``: parameter-name patterns made trainable by hand after wrapping (what users do for ViT's
    ``position_embeddings``, which ``modules_to_save`` cannot name). ``merge``: after training, merge the adapters
    with :meth:`Monitor.checked_merge` and save the merged model to ``<output_dir>/merged``.
    """

    library: Literal["peft", "adapters"] = "peft"
    config: str = Field(description="PEFT config class (LoraConfig, ...) or adapters config class (BnConfig, ...)")
    name: str = Field("adapter", description="adapters library: the adapter's name")
    args: dict[str, Any] = Field(default_factory=dict)
    unfreeze: list[str] = Field(default_factory=list, description="parameter name patterns to unfreeze by hand")
    merge: bool = False


#: most rows a recipe's data may ask for (the runner builds them in memory)
MAX_ROWS = 1_000_000


class DataSpec(_Strict):
    """``data:``: the shipped corpus, synthetic tokens, or a local text file, cut into rows of ``seq_len``.

    Classification tasks get labels from the row; image tasks always use synthetic images (``rows`` of them).
    """

    source: Literal["corpus", "synthetic", "file"] = "corpus"
    path: str | None = None
    seq_len: int = Field(32, ge=2)
    rows: int | None = Field(None, ge=1, le=MAX_ROWS)

    @model_validator(mode="after")
    def _path_for_file(self) -> DataSpec:
        if self.source == "file" and not self.path:
            raise ValueError("source 'file' needs 'path'")
        return self


class TrainerSpec(_Strict):
    """``trainer:``: which trainer runs the job and its arguments.

    ``args``: ``TrainingArguments`` for ``hf``; ``pl.Trainer`` arguments plus ``learning_rate``, ``batch_size``
    and ``logger`` (``csv`` | ``tensorboard``) for ``lightning``; :class:`AccelerateArgs` for ``accelerate``.
    ``processes`` > 1 relaunches the job under ``torchrun`` (CPU: gloo), one data-parallel replica per process.
    ``resume_from``: a checkpoint to resume from (HF ``checkpoint-N`` folder, Lightning ``.ckpt``).
    """

    type: Literal["hf", "lightning", "accelerate"] = "hf"
    output_dir: str = "out/run"
    processes: int = Field(1, ge=1, le=8)
    resume_from: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)


class AccelerateArgs(_Strict):
    """``trainer.args`` of an ``accelerate`` job (the loop is :func:`_run_accelerate`)."""

    max_steps: int = Field(4, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(1.0, gt=0)
    save_steps: int | None = Field(None, ge=1)
    log_with: str | None = Field(None, description="an accelerate tracker (tensorboard, wandb, ...)")


class FaultSpec(_Strict):
    """One entry of ``faults:``: a :class:`callbacks.runner.gallery.Fault` subclass by import path, and its ``args``."""

    fault: str = Field(description="'module:Class', e.g. callbacks.runner.gallery:ReinitAfterWrap")
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("fault")
    @classmethod
    def _is_fault(cls, value: str) -> str:
        obj = resolve_import_path(value)
        if not (isinstance(obj, type) and issubclass(obj, Fault)):
            raise ValueError(f"{value!r} is not a callbacks.runner.gallery.Fault subclass")
        return value

    def validate_args(self, source: str, key: str) -> None:
        """Validate ``args`` with the fault's ``Config``; a :class:`RecipeError` at ``key`` otherwise."""
        config_cls = resolve_import_path(self.fault).Config
        try:
            config_cls.model_validate(self.args)
        except ValidationError as err:
            where, problem = describe_validation_error(config_cls, err, key)
            raise RecipeError(source, where, problem) from None

    def build(self) -> Any:
        """The fault instance."""
        cls = resolve_import_path(self.fault)
        return cls(cls.Config.model_validate(self.args))


class JobRecipe(_Strict):
    """A whole recipe: the job and its ``integrity:`` section."""

    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds random, numpy and torch (numpy takes 32 bits)")
    model: ModelSpec
    adapter: AdapterSpec | None = None
    data: DataSpec = Field(default_factory=DataSpec)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    faults: list[FaultSpec] = Field(default_factory=list, description="failures to inject (the gallery's)")
    integrity: dict[str, Any] | None = None


def recipe_json_schema() -> dict[str, Any]:
    """JSON schema of a whole recipe: the job's models with the ``integrity:`` section's own schema in place."""
    schema = JobRecipe.model_json_schema()
    integrity = IntegrityConfig.model_json_schema()
    defs = schema.setdefault("$defs", {})
    defs.update(integrity.pop("$defs", {}))
    defs["IntegrityConfig"] = integrity
    schema["properties"][SECTION] = {"anyOf": [{"$ref": "#/$defs/IntegrityConfig"}, {"type": "null"}],
                                     "default": None, "description": "the integrity checks (see README)"}
    defs["AccelerateArgs"] = AccelerateArgs.model_json_schema()
    schema["title"] = "integrity-callbacks recipe"
    return _plain_descriptions(schema)


#: reStructuredText roles (``:class:`~a.B```) and literals (````x````): docstring markup a terminal shows raw
_RST_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|obj|exc):`~?([^`]+)`")
_RST_LITERAL = re.compile(r"``([^`]+)``")


def plain_text(text: str) -> str:
    """``text`` without reStructuredText markup: a role becomes its target (``~`` shortens it to the last
    name, as Sphinx does), a literal its content."""
    def role(match: re.Match[str]) -> str:
        target = match.group(1)
        return target.rsplit(".", 1)[-1] if "`~" in match.group(0) else target

    return _RST_LITERAL.sub(r"\1", _RST_ROLE.sub(role, text))


def _plain_descriptions(node: Any) -> Any:
    """Every ``description`` in a JSON schema as plain text."""
    if isinstance(node, dict):
        return {k: plain_text(v) if k == "description" and isinstance(v, str) else _plain_descriptions(v)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_plain_descriptions(v) for v in node]
    return node


def load_job(path: str) -> tuple[JobRecipe, IntegrityConfig]:
    """Read and validate a job recipe; every problem is a :class:`RecipeError` naming file and key."""
    data = read_yaml(path)
    integrity = parse_integrity_section(data.get(SECTION), source=path)
    try:
        job = JobRecipe.model_validate(data)
    except ValidationError as err:
        key, problem = describe_validation_error(JobRecipe, err, "")
        raise RecipeError(path, key, problem.replace("Value error, ", "")) from None
    for i, fault in enumerate(job.faults):
        fault.validate_args(path, f"faults.{i}.args")
    return job, integrity


# -- building the parts ---------------------------------------------------------------------------------------
def build_model(spec: ModelSpec, source: str) -> torch.nn.Module:
    """The model from its config class or factory (nothing downloaded) or a local folder; ``freeze`` applied."""
    if spec.factory is not None:
        model = _call_factory(spec, source)
    else:
        import transformers

        auto = getattr(transformers, TASKS[spec.task])
        if spec.path is not None:
            if not os.path.isdir(spec.path):
                raise RecipeError(source, "model.path", f"no such local folder {spec.path!r} (nothing is downloaded)")
            model = auto.from_pretrained(spec.path, local_files_only=True)
        else:
            model = _model_from_config(spec, auto, source)
    set_trainable(model, spec.freeze, False, source, "model.freeze")
    return model


def config_arguments(config_cls: type) -> set[str]:
    """The arguments a transformers config class knows: its constructor's, its attributes' (``to_dict`` of a
    default instance, the class's own attributes and properties) and their aliases (``attribute_map``, e.g.
    ``hidden_size`` for GPT-2's ``n_embd``)."""
    names = {n for n, p in inspect.signature(config_cls.__init__).parameters.items()
             if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)} - {"self"}
    try:
        names |= set(config_cls().to_dict())
    except Exception:  # noqa: BLE001 - a config without defaults: its signature is what is known
        pass
    # attributes and properties the base config reads from keyword arguments (num_labels, attn_implementation...)
    names |= {n.lstrip("_") for n in dir(config_cls) if not n.startswith("__")}
    return names | set(getattr(config_cls, "attribute_map", {}) or {})


def _model_from_config(spec: ModelSpec, auto: Any, source: str) -> torch.nn.Module:
    import transformers

    config_cls = getattr(transformers, spec.config, None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, transformers.PretrainedConfig)):
        raise RecipeError(source, "model.config", f"{spec.config!r} is not a transformers config class "
                                                  "(e.g. GPT2Config, LlamaConfig, Gemma2Config, BertConfig)")
    unknown = sorted(set(spec.args) - config_arguments(config_cls))
    if unknown:
        # transformers configs keep unknown keyword arguments as attributes: a typo would pass silently
        known = sorted(config_arguments(config_cls))
        hints = [f"{name!r} (did you mean {', '.join(repr(c) for c in close)}?)" if close else repr(name)
                 for name in unknown for close in [difflib.get_close_matches(name, known, n=3)]]
        raise RecipeError(source, "model.args", f"{spec.config} has no argument {', '.join(hints)}")
    try:
        return auto.from_config(config_cls(**spec.args))
    except (TypeError, ValueError) as err:
        raise RecipeError(source, "model.args", f"{spec.config} rejected these arguments: {err}") from None


def _call_factory(spec: ModelSpec, source: str) -> torch.nn.Module:
    from pydantic import validate_call

    factory = resolve_import_path(spec.factory)
    try:
        inspect.signature(factory).bind(**spec.args)
        model = validate_call(factory)(**spec.args)
    except TypeError as err:
        raise RecipeError(source, "model.args", f"{spec.factory} rejected these arguments: {err}") from None
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(["model.args", *(str(p) for p in first["loc"])])
        raise RecipeError(source, key, f"{first['msg']} (got {first.get('input')!r})") from None
    if not isinstance(model, torch.nn.Module):
        raise RecipeError(source, "model.factory", f"{spec.factory} returned {type(model).__name__}, not a module")
    return model


def set_trainable(model: torch.nn.Module, patterns: Sequence[str], trainable: bool, source: str, key: str) -> None:
    """``requires_grad`` for every parameter whose user name matches one of ``patterns``; unmatched is an error."""
    from callbacks.primitives.naming import user_name

    for pattern in patterns:
        hits = [p for raw, p in model.named_parameters() if fnmatch.fnmatchcase(user_name(raw), pattern)]
        if not hits:
            names = [user_name(n) for n, _ in model.named_parameters()][:6]
            raise RecipeError(source, key, f"pattern {pattern!r} matches no parameter; names look like {names}")
        for param in hits:
            param.requires_grad_(trainable)


def apply_adapter(model: torch.nn.Module, spec: AdapterSpec | None, source: str) -> torch.nn.Module:
    """Wrap ``model`` with a PEFT adapter when the recipe names one; then ``unfreeze`` by hand."""
    if spec is None:
        return model
    if spec.library == "adapters":
        wrapped = _apply_adapters_library(model, spec, source)
        set_trainable(wrapped, spec.unfreeze, True, source, "adapter.unfreeze")
        return wrapped
    import peft

    config_cls = getattr(peft, spec.config, None)
    if not (isinstance(config_cls, type) and issubclass(config_cls, peft.PeftConfig)):
        raise RecipeError(source, "adapter.config", f"{spec.config!r} is not a PEFT config class "
                                                    "(e.g. LoraConfig, IA3Config, LoHaConfig)")
    try:
        wrapped = peft.get_peft_model(model, config_cls(**spec.args))
    except (TypeError, ValueError) as err:
        raise RecipeError(source, "adapter.args", f"{spec.config} rejected these arguments: {err}") from None
    set_trainable(wrapped, spec.unfreeze, True, source, "adapter.unfreeze")
    return wrapped


def _apply_adapters_library(model: torch.nn.Module, spec: AdapterSpec, source: str) -> torch.nn.Module:
    """``adapters.init(model)``, ``add_adapter(name, config)``, ``train_adapter(name)`` (the library's recipe)."""
    try:
        import adapters
    except ImportError:
        raise RecipeError(source, "adapter.library", "the 'adapters' library is not installed "
                                                     "(pip install adapters; it pins transformers 4.x)") from None
    config_cls = getattr(adapters, spec.config, None)
    if not isinstance(config_cls, type):
        raise RecipeError(source, "adapter.config", f"{spec.config!r} is not an adapters config class "
                                                    "(e.g. BnConfig, SeqBnConfig, LoRAConfig, PrefixTuningConfig)")
    try:
        config = config_cls(**spec.args)
        adapters.init(model)
        model.add_adapter(spec.name, config=config)
        model.train_adapter(spec.name)
    except (TypeError, ValueError) as err:
        raise RecipeError(source, "adapter.args", f"{spec.config} rejected these arguments: {err}") from None
    return model


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


class ExamplesDataset(torch.utils.data.Dataset):
    """Columns of equal length as HF-style examples (``{"pixel_values": ..., "labels": ...}``)."""

    def __init__(self, columns: Mapping[str, torch.Tensor]):
        self.columns = dict(columns)
        self.length = len(next(iter(self.columns.values())))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def _config_of(model: torch.nn.Module) -> Any:
    from callbacks.primitives.naming import unwrap_model

    return getattr(unwrap_model(model), "config", None)


def _vocab_size(model: torch.nn.Module) -> int:
    config = _config_of(model)
    if config is None:
        inner = _embedding_rows(model)
        return inner if inner is not None else BYTE_VOCAB
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(getattr(text, "vocab_size", BYTE_VOCAB))


def _embedding_rows(model: torch.nn.Module) -> int | None:
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            return module.num_embeddings
    return None


def build_dataset(job: JobRecipe, model: torch.nn.Module, source: str) -> torch.utils.data.Dataset:
    """The training examples for the model's task (images and class labels are synthetic, seeded)."""
    gen = torch.Generator().manual_seed(job.seed)
    config = _config_of(model)
    num_labels = int(getattr(config, "num_labels", 2) or 2)
    if job.model.task == "image_classification":
        size, channels = int(getattr(config, "image_size", 16)), int(getattr(config, "num_channels", 3))
        n = job.data.rows or 16
        return ExamplesDataset({"pixel_values": torch.randn(n, channels, size, size, generator=gen),
                                "labels": torch.randint(0, num_labels, (n,), generator=gen)})
    rows = token_rows(job.data, _vocab_size(model), job.seed, source)
    if job.model.task == "sequence_classification":
        return ExamplesDataset({"input_ids": rows, "labels": rows.sum(dim=1) % num_labels})
    return RowsDataset(rows)


def _loss(outputs: Any) -> torch.Tensor:
    return outputs["loss"] if isinstance(outputs, Mapping) else outputs.loss


# -- running ----------------------------------------------------------------------------------------------------
class FaultInjectingMonitor(Monitor):
    """A :class:`Monitor` that runs the recipe's faults at each ``step`` event, just before the checks look.

    Every trainer integration (HF, Lightning, the accelerate loop) already turns its own hooks into the
    ``before_optimizer`` and ``after_optimizer`` step events, on real optimizer steps only: the faults act at
    those events, with the event's model and step, so fault injection is written once for all trainers.
    """

    def __init__(self, faults: Sequence[Fault], **kwargs: Any):
        super().__init__(**kwargs)
        self.faults = list(faults)

    def dispatch(self, event: str, model: Any, **context: Any) -> list[Finding]:
        """Run the faults' step hook for this phase (``step`` events), then the checks."""
        if event == "step":
            for fault in self.faults:
                if context.get("phase") == "before_optimizer":
                    fault.before_optimizer_step(model, context["step"])
                elif context.get("phase") == "after_optimizer":
                    fault.after_optimizer_step(model, context["step"])
        return super().dispatch(event, model, **context)


class Trained(NamedTuple):
    """What a trainer's run hands back: the trained model (unwrapped) and the global step it ended at."""

    model: torch.nn.Module
    step: int


class JobResult(NamedTuple):
    """The outcome of :func:`run_job`: the exit code (0 clean, 1 error findings) and the job's monitor."""

    exit_code: int
    monitor: Monitor


def writable_folder(source: str, key: str, folder: str) -> None:
    """Create ``folder`` if needed; a :class:`RecipeError` at ``key`` when it cannot be created or written."""
    try:
        os.makedirs(folder, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
    except OSError as err:
        raise RecipeError(source, key, f"cannot write the folder {folder!r}: {err}") from None


def run_job(path: str) -> JobResult:
    """Run the recipe's job with the checks. Returns (exit code, monitor): 0 clean, 1 error findings."""
    job, integrity = load_job(path)
    torch.manual_seed(job.seed)
    model = apply_adapter(build_model(job.model, path), job.adapter, path)
    faults = [spec.build() for spec in job.faults]
    writable_folder(path, "trainer.output_dir", job.trainer.output_dir)
    if integrity.report:
        report = os.path.abspath(integrity.report)
        if os.path.isdir(report):
            raise RecipeError(path, "integrity.report", f"{integrity.report!r} is a folder; give a file path such "
                                                        "as out/run/integrity.json")
        writable_folder(path, "integrity.report", os.path.dirname(report))
        if os.path.exists(report) and not os.access(report, os.W_OK):
            raise RecipeError(path, "integrity.report", f"cannot write the report file {integrity.report!r}")
    for fault in faults:
        fault.setup(model, job.trainer.output_dir)
    resume = job.trainer.resume_from
    if resume is not None and not os.path.exists(resume):  # checked after the faults, which may write it
        raise RecipeError(path, "trainer.resume_from", f"no checkpoint at {resume!r} (relative paths are read from "
                                                       f"the working directory, {os.getcwd()})")
    dataset = build_dataset(job, model, path)
    monitor = FaultInjectingMonitor(faults, config=integrity)
    monitor.summary_at_end = not merges_after_training(job)  # one table per job
    runner = {"hf": _run_hf, "lightning": _run_lightning, "accelerate": _run_accelerate}[job.trainer.type]
    try:
        trained = runner(job, monitor, model, dataset, path)
        if merges_after_training(job):
            _merge_and_save(job, monitor, trained.model, trained.step)
    except IntegrityError:
        pass  # the monitor already printed the table and wrote the report
    return JobResult(1 if monitor.report.errors else 0, monitor)


def merges_after_training(job: JobRecipe) -> bool:
    """Whether the job runs a checked merge after training (its table is printed after the merge, once)."""
    return job.adapter is not None and bool(job.adapter.merge)


def _merge_and_save(job: JobRecipe, monitor: Monitor, model: torch.nn.Module, step: int) -> None:
    merged = monitor.checked_merge(model, step=step)
    if monitor.rank == 0 and hasattr(merged, "save_pretrained"):
        merged.save_pretrained(os.path.join(job.trainer.output_dir, "merged"))
    monitor.finish()


def _run_hf(job: JobRecipe, monitor: Monitor, model, dataset, source: str) -> Trained:
    from transformers import Trainer, TrainingArguments, set_seed

    from callbacks.hf import IntegrityCallback

    set_seed(job.seed)
    defaults: dict[str, Any] = {"report_to": [], "use_cpu": not torch.cuda.is_available(), "disable_tqdm": True,
                                "save_strategy": "steps", "logging_steps": 10, "seed": job.seed,
                                "remove_unused_columns": False}
    if job.trainer.processes > 1 and not torch.cuda.is_available():
        defaults["ddp_backend"] = "gloo"
    try:
        args = TrainingArguments(output_dir=job.trainer.output_dir, **{**defaults, **job.trainer.args})
    except (TypeError, ValueError) as err:
        raise RecipeError(source, "trainer.args", f"TrainingArguments rejected these arguments: {err}") from None
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    # HF calls callbacks in list order and puts its reporters (TensorBoard, W&B, ...) first; the checks must add
    # their counts to `logs` before the reporters write them.
    trainer.callback_handler.callbacks.insert(0, IntegrityCallback(monitor=monitor))
    trainer.train(resume_from_checkpoint=job.trainer.resume_from)
    return Trained(trainer.model, trainer.state.global_step)


def _run_lightning(job: JobRecipe, monitor: Monitor, model, dataset, source: str) -> Trained:
    import pytorch_lightning as pl

    from callbacks.lightning import IntegrityCallback

    args = dict(job.trainer.args)
    lr = float(args.pop("learning_rate", 1e-3))
    batch_size = int(args.pop("batch_size", 4))
    logger = _lightning_logger(args.pop("logger", None), job.trainer.output_dir, source)

    class JobModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = _loss(self.model(**batch))
            self.log("train_loss", loss.detach(), on_step=True, on_epoch=False)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=lr)

    pl.seed_everything(job.seed, verbose=False)
    if job.trainer.processes > 1:
        args.setdefault("strategy", "ddp")
        args.setdefault("devices", job.trainer.processes)
    try:
        trainer = pl.Trainer(default_root_dir=job.trainer.output_dir, callbacks=[IntegrityCallback(monitor=monitor)],
                             logger=logger, enable_progress_bar=False, enable_model_summary=False,
                             **{"log_every_n_steps": 1, **args})
    except (TypeError, ValueError) as err:
        raise RecipeError(source, "trainer.args", f"Lightning Trainer rejected these arguments: {err}") from None
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    trainer.fit(JobModule(), train_dataloaders=loader, ckpt_path=job.trainer.resume_from)
    return Trained(model, trainer.global_step)


def _lightning_logger(name: Any, output_dir: str, source: str) -> Any:
    if name in (None, False, "none"):
        return False
    from pytorch_lightning import loggers

    builders: dict[str, Callable[[], Any]] = {
        "csv": lambda: loggers.CSVLogger(output_dir, name="logs"),
        "tensorboard": lambda: loggers.TensorBoardLogger(output_dir, name="logs"),
    }
    if name not in builders:
        raise RecipeError(source, "trainer.args.logger", f"expected one of csv, tensorboard, none; got {name!r}")
    return builders[name]()


def _run_accelerate(job: JobRecipe, monitor: Monitor, model, dataset, source: str) -> Trained:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from callbacks.accelerate import AcceleratorHooks
    from callbacks.metrics import finding_metrics

    try:
        opts = AccelerateArgs.model_validate(job.trainer.args)
    except ValidationError as err:
        key, problem = describe_validation_error(AccelerateArgs, err, "trainer.args")
        raise RecipeError(source, key, problem) from None
    set_seed(job.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=opts.log_with,
                              gradient_accumulation_steps=opts.gradient_accumulation_steps,
                              project_dir=job.trainer.output_dir)
    if opts.log_with:
        accelerator.init_trackers("integrity")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opts.learning_rate)
    loader = torch.utils.data.DataLoader(dataset, batch_size=opts.batch_size, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    hooks = AcceleratorHooks(accelerator, monitor=monitor)
    if job.trainer.resume_from:
        accelerator.load_state(job.trainer.resume_from)
        # this runner names its save_state folders checkpoint-N: the step count goes on from N
        suffix = os.path.basename(os.path.normpath(job.trainer.resume_from)).rpartition("-")[2]
        hooks.step = int(suffix) if suffix.isdigit() else 0
    hooks.begin(model, resumed_from=job.trainer.resume_from, optimizer=optimizer)
    while hooks.step < opts.max_steps:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = _loss(model(**batch))
                accelerator.backward(loss)
                if accelerator.sync_gradients and opts.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), opts.max_grad_norm)
                hooks.before_optimizer_step(model, optimizer, grads_clipped=bool(opts.max_grad_norm))
                optimizer.step()
                hooks.after_optimizer_step(model, optimizer)
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                # the trainer's own loggers (accelerate trackers) get the finding counts beside the loss
                accelerator.log({"train_loss": loss.item(), **finding_metrics(hooks.monitor.findings)}, step=hooks.step)
                if opts.save_steps and hooks.step % opts.save_steps == 0:
                    folder = os.path.join(job.trainer.output_dir, f"checkpoint-{hooks.step}")
                    accelerator.save_state(folder)
                    hooks.saved(model, folder)
            if hooks.step >= opts.max_steps:
                break
    hooks.end(model)
    accelerator.end_training()
    return Trained(accelerator.unwrap_model(model), hooks.step)
