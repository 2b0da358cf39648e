"""The recipe format and the CLI around it: schema, validation errors naming file and key, factories and faults,
healthy twins of the gallery recipes, ``audit`` on checkpoint folders, the HTML report, and finding counts
logged through the trainers' own loggers."""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from callbacks.findings import Finding
from callbacks.report import Report
from callbacks.report_html import render_html, timeline_columns
from callbacks.runner.cli import main
from callbacks.runner.gallery import Fault

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "callbacks", "recipes")


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def findings_of(path) -> list[Finding]:
    with open(path, encoding="utf-8") as fh:
        return [Finding.from_dict(d) for d in json.load(fh)["findings"]]


# -- schema ---------------------------------------------------------------------------------------------------------
def _resolve(schema: dict, node: dict) -> dict:
    """Follow $ref and the non-null branch of anyOf."""
    while True:
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
        elif "anyOf" in node:
            node = next(n for n in node["anyOf"] if n.get("type") != "null")
        else:
            return node


def _assert_keys_in_schema(schema: dict, node: dict, data, where: str) -> None:
    node = _resolve(schema, node)
    if isinstance(data, dict) and "properties" in node:
        for key, value in data.items():
            assert key in node["properties"], f"{where}.{key} is not in the schema"
            _assert_keys_in_schema(schema, node["properties"][key], value, f"{where}.{key}")
    elif isinstance(data, list) and "items" in node:
        for i, item in enumerate(data):
            _assert_keys_in_schema(schema, node["items"], item, f"{where}.{i}")


def test_schema_covers_every_key_of_every_recipe(tmp_path, capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) == {"seed", "model", "adapter", "data", "trainer", "faults", "integrity"}
    checks = _resolve(schema, schema["$defs"]["IntegrityConfig"]["properties"]["checks"])
    assert {"ties", "adapter_init", "saved_state", "hashes", "merge"} <= set(checks["properties"])
    recipes = glob.glob(os.path.join(RECIPES, "**", "*.yaml"), recursive=True)
    assert recipes
    for path in recipes:
        with open(path, encoding="utf-8") as fh:
            _assert_keys_in_schema(schema, schema, yaml.safe_load(fh), os.path.basename(path))
    out = tmp_path / "schema.json"
    assert main(["schema", "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == schema


# -- validation errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: {factory: callbacks.runner.gallery:nothing_here}\n", "model.factory: module"),
        ("model: {factory: callbacks.runner.gallery}\n", "expected 'package.module:name'"),
        ("model: {factory: callbacks.runner.gallery:lingua_lm, args: {dim: wide}}\n", "model.args.dim"),
        ("model: {factory: callbacks.runner.gallery:lingua_lm, args: {width: 3}}\n", "model.args"),
        ("model: {factory: callbacks.runner.gallery:lingua_lm, config: GPT2Config}\n", "exactly one of"),
        ("model: {factory: callbacks.runner.gallery:lingua_lm, freeze: [nothing.*]}\n", "model.freeze"),
        ("model: {factory: callbacks.runner.gallery:lingua_lm}\n"
         "faults: [{fault: callbacks.runner.gallery:lingua_lm}]\n",
         "faults.0.fault"),
        ("model: {factory: callbacks.runner.gallery:lingua_lm}\n"
         "faults: [{fault: callbacks.runner.gallery:RankGradientNoise, args: {rank: -1}}]\n", "faults.0.args.rank"),
        ("model: {factory: callbacks.runner.gallery:lingua_lm}\n"
         "faults: [{fault: callbacks.runner.gallery:ReinitAfterWrap, args: {strength: 2}}]\n",
         "faults.0.args.strength: unknown key 'strength'"),
        ("model: {factory: callbacks.runner.gallery:lingua_lm}\ntrainer: {type: accelerate, args: {max_stepz: 3}}\n",
         "trainer.args.max_stepz"),
        ("model: {factory: callbacks.runner.gallery:lingua_lm}\ntrainer: {type: lightning, args: {logger: paper}}\n",
         "trainer.args.logger"),
        ("model: {factory: callbacks.runner.gallery:lingua_lm}\ntrainer: {type: deepspeed}\n", "trainer.type"),
        ("model: {factory: callbacks.runner.gallery:lingua_lm}\ntrainer: {processes: 0}\n", "trainer.processes"),
    ],
)
def test_bad_recipe_exits_2_naming_file_and_key(tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, text)
    assert main(["run", path]) == 2
    err = capsys.readouterr().err
    assert path in err and message in err, err


# -- healthy twins of the gallery recipes ----------------------------------------------------------------------------
def _twin(tmp_path, name: str, edit) -> str:
    with open(os.path.join(RECIPES, "failures", name), encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    edit(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _set(*keys_and_value):
    """An edit of a recipe dict: set the value at the key path."""
    *keys, last, value = keys_and_value

    def edit(data):
        for key in keys:
            data = data[key]
        data[last] = value
    return edit


def _drop_faults(data):
    data.pop("faults")


def _save_parent_module(data):
    """The fix: the module holding the Parameter in modules_to_save (which also makes it trainable)."""
    data["adapter"]["args"]["modules_to_save"] = ["classifier", "embeddings"]
    data["adapter"].pop("unfreeze")


#: gallery recipe -> the edit that removes its failure (the fix, or the fault left out): the run must be clean
TWINS = {
    "meta_init_tie.yaml": _set("model", "args", "meta_init", False),
    "frozen_weight_moves.yaml": _set("model", "args", "embedding_max_norm", None),
    "tied_lm_head_merge.yaml": _set("adapter", "args", "target_modules", ["q_proj", "v_proj"]),
    "vit_unsaved_position_embeddings.yaml": _save_parent_module,
    "reinit_adapter.yaml": _drop_faults,
    "dead_adapter.yaml": _set("adapter", "args", "lora_dropout", 0.1),
}


@pytest.mark.parametrize("name", sorted(TWINS))
def test_healthy_twin_of_gallery_recipe_is_clean(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", _twin(tmp_path, name, TWINS[name])]) == 0, capsys.readouterr().out[-3000:]
    (report,) = glob.glob(str(tmp_path / "out" / "**" / "integrity.json"), recursive=True)
    assert not [f for f in findings_of(report) if f.severity != "info"]


def test_resume_from_a_consistent_checkpoint_is_clean(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = _twin(tmp_path, "untied_checkpoint_resume.yaml",
                 lambda d: d["faults"][0]["args"].update(head_scale=1.0))
    assert main(["run", path]) == 0
    assert not [f for f in findings_of(tmp_path / "out/failures/untied_checkpoint_resume/integrity.json")
                if f.severity == "error"]


# -- audit ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """The untied-checkpoint gallery run: checkpoint-2 (head differs from embedding) and checkpoint-3 (HF's)."""
    tmp = tmp_path_factory.mktemp("resumed")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        assert main(["run", os.path.join(RECIPES, "failures", "untied_checkpoint_resume.yaml")]) == 1
    finally:
        os.chdir(cwd)
    return tmp / "out" / "failures" / "untied_checkpoint_resume"


def test_audit_finds_the_tie_conflict_in_a_folder(resumed_run, tmp_path, capsys):
    report = tmp_path / "audit.json"
    assert main(["audit", str(resumed_run / "checkpoint-2"), "--report", str(report)]) == 1
    out = capsys.readouterr().out
    assert "TIE_CHECKPOINT_CONFLICT" in out
    found = [(f.code, f.event, f.step, f.params) for f in findings_of(report) if f.severity == "error"]
    assert found == [("TIE_CHECKPOINT_CONFLICT", "load", 2, ("lm_head.weight", "transformer.wte.weight"))]
    assert "TIE_CHECKPOINT_CONFLICT" in (tmp_path / "audit.html").read_text()


def test_audit_of_a_checkpoint_hf_wrote_is_clean(resumed_run, capsys):
    assert main(["audit", str(resumed_run / "checkpoint-3")]) == 0
    assert "no findings" in capsys.readouterr().out


def test_audit_bad_input_exits_2(tmp_path, capsys):
    assert main(["audit", str(tmp_path / "missing")]) == 2
    assert "no such checkpoint folder" in capsys.readouterr().err
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": "google/gemma-2-2b"}))
    assert main(["audit", str(tmp_path / "adapter")]) == 2
    assert "holds no weight file" in capsys.readouterr().err  # never passed as clean
    from safetensors.torch import save_file

    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 4)},
              str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert main(["audit", str(tmp_path / "adapter")]) == 2
    assert "nothing is downloaded" in capsys.readouterr().err


# -- HTML report ---------------------------------------------------------------------------------------------------
def _finding(code, event, step, params=("a.weight",)):
    return Finding.make(code, event=event, step=step, params=params, message=f"<{code}> found", hint="fix <it>")


def test_html_timeline_has_one_column_per_moment_in_training_order():
    findings = [_finding("FROZEN_CHANGED", "step", 3), _finding("TIE_BROKEN", "init", 0),
                _finding("FROZEN_CHANGED", "step", 1), _finding("FROZEN_CHANGED", "step", 3, ("b.weight",)),
                _finding("UNSAVED_TRAINABLE", "checkpoint", 3), _finding("TIE_BROKEN", "end", None)]
    assert timeline_columns(findings) == [("end", None), ("init", 0), ("step", 1), ("step", 3),
                                          ("checkpoint", 3)]
    page = render_html(Report(findings=findings))
    assert page.count("<th>step@3</th>") == 1 and "<th>checkpoint@3</th>" in page
    row = page.split('<td class="code">FROZEN_CHANGED</td>')[1].split("</tr>")[0]
    assert row.count('class="error">') == 2 and '">2</td>' in row  # step 1: one finding, step 3: two
    assert "&lt;TIE_BROKEN&gt; found" in page and "fix &lt;it&gt;" in page and "<it>" not in page


def test_html_report_of_a_clean_run_says_so():
    assert "no findings" in render_html(Report())


# -- finding counts through the trainers' own loggers ------------------------------------------------------------------
BROKEN_TIE = """
    model:
      config: GPT2Config
      args: {vocab_size: 256, n_positions: 32, n_embd: 32, n_layer: 1, n_head: 2, bos_token_id: 0, eos_token_id: 0}
    data: {source: synthetic, seq_len: 16, rows: 16}
    trainer: {type: TRAINER, output_dir: out/metrics, args: ARGS}
    integrity:
      policy: log
      checks:
        ties: {declare: [["transformer.wte.weight", "transformer.h.0.mlp.c_fc.bias"]]}
"""


def test_lightning_csv_logger_gets_finding_counts_beside_the_loss(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = BROKEN_TIE.replace("TRAINER", "lightning").replace(
        "ARGS", "{max_steps: 2, batch_size: 8, accelerator: cpu, logger: csv, enable_checkpointing: false}")
    assert main(["run", write(tmp_path, text)]) == 1
    (metrics,) = glob.glob(str(tmp_path / "out" / "metrics" / "logs" / "*" / "metrics.csv"))
    with open(metrics, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    counted = [r for r in rows if r.get("integrity/TIE_BROKEN")]
    # at the steps the report names (init@0 is before any step: the first point is after step 1)
    assert [(r["step"], float(r["integrity/TIE_BROKEN"]), float(r["integrity/errors"])) for r in counted] == [
        ("1", 1.0, 1.0), ("2", 1.0, 1.0)]
    assert any(r.get("train_loss") for r in rows)  # the user's own metrics stay where Lightning put them


def test_hf_reporters_get_finding_counts_in_logs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text = BROKEN_TIE.replace("TRAINER", "hf").replace(
        "ARGS", "{max_steps: 2, per_device_train_batch_size: 8, logging_steps: 1, save_steps: 10}")
    assert main(["run", write(tmp_path, text)]) == 1
    # HF's PrinterCallback (a reporter placed after the integrity callback) prints each logs dict
    printed = [line for line in capsys.readouterr().out.splitlines() if "'loss'" in line]
    assert len(printed) == 2 and all("'integrity/TIE_BROKEN': '1'" in line for line in printed), printed


@pytest.mark.slow  # torchrun, 2 ranks
def test_replicas_without_rank_local_noise_agree(tmp_path):
    path = _twin(tmp_path, "replicas_diverge.yaml", lambda d: d.pop("faults"))
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "callbacks", "run", path], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("integrity: 0 error finding(s); exit 0") == 1
    report = json.loads((tmp_path / "out/failures/replicas_diverge/integrity.json").read_text())
    assert not [f for f in report["findings"] if f["severity"] == "error"]


@pytest.mark.parametrize("healthy", [False, True], ids=["hand-unfrozen", "parent-module-saved"])
def test_audit_of_an_adapter_folder_rebuilt_from_the_recipe(tmp_path, monkeypatch, capsys, healthy):
    monkeypatch.chdir(tmp_path)
    edit = _save_parent_module if healthy else (lambda data: None)
    recipe = _twin(tmp_path, "vit_unsaved_position_embeddings.yaml", edit)
    main(["run", recipe])
    folder = tmp_path / "out" / "failures" / "vit_unsaved_position_embeddings" / "checkpoint-2"
    assert (folder / "adapter_config.json").exists()
    capsys.readouterr()
    code = main(["audit", str(folder), "--recipe", recipe, "--report", str(tmp_path / "audit.json")])
    found = [(f.code, f.event, f.step, f.params) for f in findings_of(tmp_path / "audit.json") if f.severity != "info"]
    if healthy:
        assert code == 0 and found == []
    else:
        assert code == 1
        assert found == [("UNSAVED_TRAINABLE", "checkpoint", 2, ("vit.embeddings.position_embeddings",))]
        assert "modules_to_save" in capsys.readouterr().out
    # without the recipe the base model cannot be rebuilt: it was never saved locally and nothing is downloaded
    assert main(["audit", str(folder)]) == 2


@pytest.mark.parametrize("trainer", ["accelerate", "lightning"])
def test_resume_from_a_checkpoint_the_runner_wrote(tmp_path, monkeypatch, trainer):
    monkeypatch.chdir(tmp_path)
    args = ({"max_steps": 2, "batch_size": 8, "save_steps": 2} if trainer == "accelerate" else
            {"max_steps": 2, "batch_size": 8, "accelerator": "cpu"})

    def healthy(data, max_steps=2, resume_from=None):
        data["model"]["args"]["meta_init"] = False
        data["trainer"].update(type=trainer, args={**args, "max_steps": max_steps}, resume_from=resume_from)
        data["integrity"]["checks"]["hashes"] = {"ledger": f"out/steps-{max_steps}.jsonl"}

    assert main(["run", _twin(tmp_path, "meta_init_tie.yaml", healthy)]) == 0
    out = tmp_path / "out" / "failures" / "meta_init_tie"
    if trainer == "accelerate":
        checkpoint = out / "checkpoint-2"
    else:
        (checkpoint,) = glob.glob(str(out / "**" / "*step=2.ckpt"), recursive=True)
    assert main(["run", _twin(tmp_path, "meta_init_tie.yaml",
                              lambda d: healthy(d, max_steps=4, resume_from=str(checkpoint)))]) == 0
    found = findings_of(out / "integrity.json")
    assert not [f for f in found if f.severity != "info"]
    # the step count went on from the checkpoint's: the resumed run hashed the gradients of steps 3 and 4 only
    from callbacks.hashing.ledger import read_ledger

    assert [r.step for r in read_ledger(tmp_path / "out" / "steps-4.jsonl") if r.kind == "grad"] == [3, 4]


# -- faults: the same moments under every trainer ----------------------------------------------------------------------
class RecordingFault(Fault):
    """Records the hooks the runner calls (class-level: the runner builds the instance from the recipe)."""

    calls: list = []

    def setup(self, model, output_dir):
        RecordingFault.calls.append(("setup", None))

    def before_optimizer_step(self, model, step):
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        RecordingFault.calls.append(("before", step, all(g is not None for g in grads)))

    def after_optimizer_step(self, model, step):
        RecordingFault.calls.append(("after", step))


@pytest.mark.parametrize("trainer", ["hf", "lightning", "accelerate"])
def test_fault_hooks_run_at_the_same_moments_under_every_trainer(tmp_path, monkeypatch, trainer):
    monkeypatch.chdir(tmp_path)
    args = {"hf": {"max_steps": 2, "per_device_train_batch_size": 4, "save_strategy": "no",
                   "gradient_accumulation_steps": 2},
            "lightning": {"max_steps": 2, "batch_size": 4, "accelerator": "cpu", "enable_checkpointing": False,
                          "accumulate_grad_batches": 2},
            "accelerate": {"max_steps": 2, "batch_size": 4, "gradient_accumulation_steps": 2}}[trainer]
    path = write(tmp_path, f"""
        model: {{factory: callbacks.runner.gallery:lingua_lm, args: {{n_layers: 1, tie: false}}}}
        data: {{source: corpus, seq_len: 16, rows: 32}}
        trainer: {{type: {trainer}, output_dir: out/faults, args: {json.dumps(args)}}}
        faults: [{{fault: "test_recipes_cli:RecordingFault"}}]
        integrity: {{policy: log}}
    """)
    RecordingFault.calls = []
    assert main(["run", path]) == 0
    assert RecordingFault.calls == [("setup", None), ("before", 1, True), ("after", 1), ("before", 2, True),
                                    ("after", 2)]


# -- help and schema are plain text --------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["run"], ["audit"], ["recipes"], ["schema"], ["diff"]])
def test_help_is_plain_text_with_examples(command, capsys):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"python -m callbacks {command[0] if command else 'run'} " in out
    assert "``" not in out and ":class:" not in out


def test_schema_descriptions_are_plain_text(capsys):
    assert main(["schema"]) == 0
    out = capsys.readouterr().out
    schema = json.loads(out)
    assert schema["title"] == "integrity-callbacks recipe"
    assert "``" not in out and not any(role in out for role in (":class:", ":meth:", ":func:", ":mod:"))
    assert "callbacks.runner.gallery.Fault subclass" in out  # a role's target kept, its markup gone


# -- a terminal that says it once ----------------------------------------------------------------------------------
def test_merge_gallery_recipe_prints_one_table_and_ends_with_the_report_paths(tmp_path, monkeypatch, capsys,
                                                                              caplog):
    monkeypatch.chdir(tmp_path)
    assert main(["run", os.path.join(RECIPES, "failures", "tied_lm_head_merge.yaml")]) == 1
    out = capsys.readouterr().out
    assert out.count("integrity report") == 1  # not after training, after the merge and at the end
    folder = tmp_path / "out" / "failures" / "tied_lm_head_merge"
    tail = out.strip().splitlines()[-4:]
    assert tail == [f"integrity: JSON report {folder / 'integrity.json'}",
                    f"integrity: HTML report {folder / 'integrity.html'}",
                    f"integrity: training outputs in {folder}", "integrity: 3 error finding(s); exit 1"]
    # three codes, one cause: the fix is said once, after the codes that share it
    assert out.count("untie before adding the adapter") == 1
    assert "MERGE_MISMATCH, MERGE_SIDE_EFFECT, TIE_BROKEN: untie before adding the adapter" in out
    logged = [r.getMessage() for r in caplog.records if r.name == "callbacks"]
    assert len(logged) == 3 and all(len(line) <= 240 for line in logged)
    assert all("untie before" not in line and "in the integrity report" in line for line in logged)
    assert any(line.startswith("[error] TIE_BROKEN at merge@2 [lm_head.weight, model.embed_tokens.weight]")
               for line in logged)


def test_audit_prints_one_table(resumed_run, tmp_path, capsys):
    assert main(["audit", str(resumed_run / "checkpoint-2"), "--report", str(tmp_path / "a.json")]) == 1
    out = capsys.readouterr().out
    assert out.count("integrity report") == 1 and f"integrity: JSON report {tmp_path / 'a.json'}" in out


def test_recipes_naming_the_modules_before_they_moved_into_runner_still_resolve():
    from callbacks.runner import gallery
    from callbacks.runner.job import resolve_import_path

    assert resolve_import_path("callbacks.gallery:lingua_lm") is gallery.lingua_lm
    assert resolve_import_path("callbacks.runner.gallery:lingua_lm") is gallery.lingua_lm
