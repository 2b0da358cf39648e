"""Hash checks driven through Monitor.dispatch in plain torch loops: FROZEN_CHANGED, GRAD_NONFINITE,
TIE_DIVERGED, the hash ledger and its diff. Each failure is reproduced for real, next to a healthy twin."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

from callbacks import Monitor
from callbacks.errors import ConfigError
from callbacks.hashing.ledger import diff_ledgers, read_ledger


class Net(nn.Module):
    """Embedding -> linear body -> head: names ``emb.weight``, ``body.weight``, ``body.bias``, ``head.weight``."""

    def __init__(self, seed: int = 0, max_norm: float | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(16, 8, max_norm=max_norm)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(self.emb(tokens))))


def batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 16, (4, 6), generator=gen), torch.randint(0, 16, (4, 6), generator=gen))
            for _ in range(n)]


def train(model: nn.Module, mon: Monitor, steps: int = 4, *, lr: float = 1e-2, set_to_none: bool = True,
          before_step=None, after_step=None, loss_fn=None, weight_decay: float = 0.1) -> list:
    """A plain loop dispatching the events the integrations dispatch; returns all findings."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    mon.dispatch("init", model, step=0, optimizer=opt)
    for step, (x, y) in enumerate(batches(steps), 1):
        if before_step is not None:
            before_step(model, step)
        opt.zero_grad(set_to_none=set_to_none)
        logits = model(x)
        loss = (loss_fn or (lambda out, tgt: nn.functional.cross_entropy(out.flatten(0, 1), tgt.flatten())))(
            logits, y)
        loss.backward()
        mon.dispatch("step", model, step=step, phase="before_optimizer", optimizer=opt, grads_clipped=False)
        opt.step()
        mon.dispatch("step", model, step=step, phase="after_optimizer", optimizer=opt)
        if after_step is not None:
            after_step(model, step)
    mon.dispatch("end", model, step=steps, optimizer=opt)
    return mon.findings


def codes(findings, code: str) -> list:
    return [f for f in findings if f.code == code]


# -- FROZEN_CHANGED ---------------------------------------------------------------------------------------------

def freeze_body_at_step_2(model: nn.Module, step: int) -> None:
    """Progressive freezing: the body is frozen once training has started (the optimizer already holds it)."""
    if step == 2:
        model.body.requires_grad_(False)


@pytest.mark.parametrize("set_to_none", [False, True])
def test_frozen_changed_by_adamw_on_a_param_frozen_mid_training(set_to_none):
    """Freezing after step 1 with zero_grad(set_to_none=False): the stale zero grad keeps AdamW's momentum and
    weight decay moving the 'frozen' body. With set_to_none=True AdamW skips it (the healthy twin)."""
    mon = Monitor(policy="log", checks={"hashes": {"frozen_every_n_steps": 2}})
    findings = codes(train(Net(), mon, steps=4, set_to_none=set_to_none, before_step=freeze_body_at_step_2),
                     "FROZEN_CHANGED")
    if set_to_none:
        assert findings == []
        return
    assert len(findings) == 1
    finding = findings[0]
    assert set(finding.params) == {"body.weight", "body.bias"}
    assert (finding.event, finding.step) == ("step", 2)
    assert finding.details["changed_in_steps"] == [2, 2]
    assert "requires_grad=False changed in step 2" in finding.message


@pytest.mark.parametrize("max_norm", [1.0, None])
def test_frozen_changed_by_in_place_max_norm_renorm_at_defaults(max_norm):
    """nn.Embedding(max_norm=...) renormalises rows in place during forward, frozen or not. At the defaults
    (re-hash every 50 steps) a 3-step run is caught at ``end``; without max_norm the frozen embedding is clean."""
    model = Net(max_norm=max_norm)
    model.emb.weight.data.mul_(3.0)  # rows beyond the max norm, as after a pretrained load
    model.emb.requires_grad_(False)
    findings = codes(train(model, Monitor(policy="log"), steps=3), "FROZEN_CHANGED")
    if max_norm is None:
        assert findings == []
        return
    assert [(f.params, f.event, f.step) for f in findings] == [(("emb.weight",), "end", 3)]
    assert "changed in steps 1..3" in findings[0].message


def test_unfreezing_on_purpose_is_not_a_change():
    """A parameter unfrozen during training is no longer promised constant: no finding."""
    model = Net()
    model.emb.requires_grad_(False)

    def unfreeze(m, step):
        if step == 2:
            m.emb.requires_grad_(True)

    mon = Monitor(policy="log", checks={"hashes": {"frozen_every_n_steps": 1}})
    assert codes(train(model, mon, steps=3, before_step=unfreeze), "FROZEN_CHANGED") == []


# -- GRAD_NONFINITE -------------------------------------------------------------------------------------------

def rmse_loss(out: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
    """An RMSE loss written as sqrt(mse) against an all-zero target: at an exact fit sqrt's gradient is inf and
    inf * 0 gives NaN gradients (torch.linalg.vector_norm defines 0 there; the hand-written sqrt does not)."""
    return torch.sqrt(nn.functional.mse_loss(out, torch.zeros_like(out)))


@pytest.mark.parametrize("exact_fit", [True, False])
def test_grad_nonfinite_names_the_tensors(exact_fit):
    """A head that fits exactly (all-zero output) makes sqrt(mse)'s backward inf * 0: NaN in every upstream grad.
    The twin (non-zero output) is finite."""
    model = Net()
    if exact_fit:
        nn.init.zeros_(model.head.weight)
    mon = Monitor(policy="log")
    findings = codes(train(model, mon, steps=1, loss_fn=rmse_loss), "GRAD_NONFINITE")
    if not exact_fit:
        assert findings == []
        return
    assert len(findings) == 1
    finding = findings[0]
    assert (finding.event, finding.step, finding.severity) == ("step", 1, "error")
    assert "head.weight" in finding.params
    assert finding.details["counts"]["head.weight"] == model.head.weight.numel()


def test_grad_nonfinite_reported_once_until_it_recovers():
    """A NaN in steps 1, 2 and 4: reported at 1, again at 4 after the clean step 3."""
    model = Net()
    mon = Monitor(policy="log")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    mon.dispatch("init", model, step=0)
    for step in range(1, 5):
        opt.zero_grad()
        model(torch.zeros(1, 2, dtype=torch.long)).sum().backward()
        if step in (1, 2, 4):
            model.body.bias.grad[0] = float("nan")
        mon.dispatch("step", model, step=step, phase="before_optimizer")
    assert [f.step for f in codes(mon.findings, "GRAD_NONFINITE")] == [1, 4]


# -- TIE_DIVERGED ------------------------------------------------------------------------------------------------

class CopiedTie(nn.Module):
    """Embedding and head in separate storage, kept equal by copying (as across pipeline stages)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(self.emb.weight)

    def forward(self, tokens):
        return self.head(self.emb(tokens))


def sync_copies(model: nn.Module, step: int) -> None:
    """The user's tie-by-copy: average the two copies after every step."""
    with torch.no_grad():
        mean = (model.emb.weight + model.head.weight) / 2
        model.emb.weight.copy_(mean)
        model.head.weight.copy_(mean)


@pytest.mark.parametrize("synced", [False, True])
def test_tie_diverged_for_copies_without_sync(synced):
    mon = Monitor(policy="log", checks={"hashes": {"tied_copies": [["emb.weight", "head.weight"]]}})
    model = CopiedTie()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon.dispatch("init", model, step=0)
    for step, (x, y) in enumerate(batches(3), 1):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        opt.step()
        if synced:
            sync_copies(model, step)
        mon.dispatch("step", model, step=step, phase="after_optimizer")
    mon.dispatch("end", model, step=3)
    findings = codes(mon.findings, "TIE_DIVERGED")
    if synced:
        assert findings == []
        return
    assert [(f.params, f.step) for f in findings] == [(("emb.weight", "head.weight"), 1)]  # reported once
    # not TIE_BROKEN: separate storage is by design for copies
    assert codes(mon.findings, "TIE_BROKEN") == []


def test_tied_copies_config_errors_and_an_unknown_name_is_name_not_found():
    with pytest.raises(ConfigError):
        Monitor(checks={"hashes": {"tied_copies": [["emb.weight"]]}})
    mon = Monitor(policy="log", checks={"hashes": {"tied_copies": [["emb.weight", "nope.weight"]]}})
    found = mon.dispatch("init", Net(), step=0)
    assert [(f.code, list(f.params)) for f in found] == [("NAME_NOT_FOUND", ["nope.weight"])]
    assert "checks.hashes.tied_copies" in found[0].message and "emb.weight" in found[0].message
    assert all(f.code != "CHECK_FAILED" for f in mon.findings)


# -- ledger and diff -------------------------------------------------------------------------------------------

def ledger_run(path, lr: float = 1e-2, seed: int = 0) -> None:
    mon = Monitor(policy="log", checks={"hashes": {"ledger": str(path)}})
    train(Net(seed=seed), mon, steps=3, lr=lr)


def test_ledger_two_seeded_runs_identical_and_a_changed_lr_diverges_at_step_1(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    ledger_run(a)
    ledger_run(b)
    ledger_run(c, lr=2e-2)
    records = read_ledger(a)
    assert [(r.step, r.kind) for r in records] == [(0, "param"), (1, "grad"), (1, "param"), (2, "grad"),
                                                   (2, "param"), (3, "grad"), (3, "param")]
    assert set(records[0].hashes) == {"emb.weight", "body.weight", "body.bias", "head.weight"}
    assert all(len(v) == 16 for v in records[0].hashes.values())
    code, text = diff_ledgers(a, b)
    assert code == 0 and "identical" in text
    code, text = diff_ledgers(a, c)
    # same init and data: step-1 gradients agree, the lr change first shows in the parameters after step 1
    assert code == 1
    assert "step 1, trainable parameters (after the optimizer step)" in text
    assert "4 of 4 tensors differ" in text and "head.weight" in text


def test_ledger_diff_names_only_the_tensors_that_differ(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ledger_run(a)
    lines = a.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    layout = next(r for r in records if r.get("layout") == "grad")["names"]
    target = next(i for i, r in enumerate(records) if r.get("kind") == "grad" and r["step"] == 2)
    records[target]["h"][layout.index("body.bias")] = "0" * 16
    b.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    code, text = diff_ledgers(a, b)
    assert code == 1
    assert "step 2, gradients" in text and "1 of 4 tensors differ: body.bias" in text


def test_ledger_diff_bad_input_and_cli(tmp_path):
    a = tmp_path / "a.jsonl"
    ledger_run(a)
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not json\n")
    assert diff_ledgers(a, tmp_path / "missing.jsonl")[0] == 2
    code, text = diff_ledgers(a, garbage)
    assert code == 2 and "garbage.jsonl:1" in text
    shorter = tmp_path / "short.jsonl"
    shorter.write_text("\n".join(a.read_text().splitlines()[:-2]) + "\n")
    code, text = diff_ledgers(a, shorter)
    assert code == 1 and "step 3" in text


def test_cli_diff_exit_codes(tmp_path, capsys):
    """``python -m callbacks diff A B`` (the CLI's main, in process): 0 identical, 1 diverged, 2 bad input."""
    from callbacks.runner.cli import main

    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    ledger_run(a)
    ledger_run(b)
    ledger_run(c, lr=2e-2)
    capsys.readouterr()
    assert main(["diff", str(a), str(b)]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["diff", str(a), str(c)]) == 1
    assert "ledgers differ first at step 1" in capsys.readouterr().out
    assert main(["diff", str(a), str(tmp_path / "missing.jsonl")]) == 2


# -- conformance: read-only, cheap defaults, picklable state ---------------------------------------------------

def test_read_only_and_state_round_trip():
    model = Net()
    model.emb.requires_grad_(False)
    mon = Monitor(policy="log", checks={"hashes": {"frozen_every_n_steps": 1, "every_n_steps": 1,
                                                   "tied_copies": [["body.weight", "head.weight"]]}})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon.dispatch("init", model, step=0)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    before = {n: (p.detach().clone(), None if p.grad is None else p.grad.clone(), p.requires_grad)
              for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    mon.dispatch("step", model, step=1, phase="before_optimizer", optimizer=opt)
    mon.dispatch("step", model, step=1, phase="after_optimizer", optimizer=opt)
    assert torch.equal(rng, torch.get_rng_state())
    for n, p in model.named_parameters():
        value, grad, requires_grad = before[n]
        assert torch.equal(value, p) and p.requires_grad == requires_grad
        assert (grad is None and p.grad is None) or torch.equal(grad, p.grad)
    check = mon.check("hashes")
    state = pickle.loads(pickle.dumps(check.state_dict()))
    fresh = Monitor(policy="log").check("hashes")
    fresh.load_state_dict(state)
    assert fresh.frozen_baseline == check.frozen_baseline and "emb.weight" in fresh.frozen_baseline
    assert mon.report.sections["hashes"]["replicas"].startswith("not compared")


def test_defaults_hash_nothing_per_step_in_one_process(monkeypatch):
    """At the defaults in one process (no replicas, no ledger) no step hashes gradients or parameters: only the
    cheap non-finite scan runs; frozen parameters are hashed at init and end."""
    import callbacks.checks.hashes as hashes_module

    calls = []
    real = hashes_module.hash_tensors
    monkeypatch.setattr(hashes_module, "hash_tensors", lambda ts, backend="auto": calls.append(len(ts)) or real(ts))
    model = Net()
    model.emb.requires_grad_(False)
    train(model, Monitor(policy="log"), steps=3)
    assert calls == [1, 1]  # emb.weight at init and at end


LEDGER_RECIPE = """
seed: 0
model:
  config: GPT2Config
  args: {vocab_size: 256, n_positions: 32, n_embd: 32, n_layer: 2, n_head: 2}
data: {source: synthetic, seq_len: 16, rows: 16}
trainer:
  type: hf
  output_dir: OUT
  args: {max_steps: 3, per_device_train_batch_size: 4, learning_rate: LR, save_steps: 100}
integrity:
  policy: log
  checks:
    hashes: {ledger: LEDGER}
"""


def test_recipe_runs_give_identical_ledgers_and_a_changed_learning_rate_diverges(tmp_path, capsys):
    """``python -m callbacks run`` twice on one seeded recipe: identical ledgers (diff exit 0); the same recipe
    with another learning rate first differs in the parameters after step 1 (diff exit 1)."""
    from callbacks.runner.cli import main

    ledgers = []
    for name, lr in (("a", "1.0e-3"), ("b", "1.0e-3"), ("c", "2.0e-3")):
        path = tmp_path / f"{name}.yaml"
        ledger = tmp_path / f"{name}.jsonl"
        path.write_text(LEDGER_RECIPE.replace("OUT", str(tmp_path / name)).replace("LR", lr)
                        .replace("LEDGER", str(ledger)))
        assert main(["run", str(path)]) == 0
        ledgers.append(str(ledger))
    capsys.readouterr()
    assert main(["diff", ledgers[0], ledgers[1]]) == 0
    assert "identical: 7 records, steps 0..3" in capsys.readouterr().out
    assert main(["diff", ledgers[0], ledgers[2]]) == 1
    out = capsys.readouterr().out
    assert "first at step 1, trainable parameters (after the optimizer step)" in out


@pytest.mark.slow  # the fused kernel under the interpreter, in a subprocess
def test_fused_backend_under_the_interpreter_writes_the_same_ledger(tmp_path):
    """``backend: triton`` (the fused kernel, under Triton's CPU interpreter in a subprocess) gives a ledger
    identical to the torch reference's and the same GRAD_NONFINITE, counted by the fused pass."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, os.path.join(root, "tests", "dist_scripts", "fused_backend.py"),
                           str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))[len("RESULT"):])
    assert result["triton"] == result["torch"] == [["GRAD_NONFINITE", 2, ["2.bias"], {"2.bias": 1}]]
    code, text = diff_ledgers(tmp_path / "torch.jsonl", tmp_path / "triton.jsonl")
    assert code == 0, text


@pytest.mark.parametrize("base_changed", [True, False])
def test_frozen_baseline_travels_with_the_state_across_a_resume(base_changed):
    """The frozen baselines are saved with the monitor's state; a resume whose frozen weights differ from the ones
    trained with (e.g. a different base model under an adapter-only checkpoint) is FROZEN_CHANGED at init."""
    model = Net()
    model.emb.requires_grad_(False)
    first = Monitor(policy="log")
    train(model, first, steps=2)
    state = json.loads(json.dumps(first.state_dict()))  # HF keeps it in trainer_state.json
    resumed_model = Net()
    resumed_model.emb.requires_grad_(False)
    if base_changed:
        with torch.no_grad():
            resumed_model.emb.weight[3, 1] += 1e-6
    second = Monitor(policy="log")
    second.load_state_dict(state)
    second.dispatch("load", resumed_model, step=2)
    found = codes(second.dispatch("init", resumed_model, step=2), "FROZEN_CHANGED")
    if not base_changed:
        assert found == []
        return
    assert [(f.params, f.event, f.step) for f in found] == [(("emb.weight",), "init", 2)]
    assert "between the checkpoint and the resume at step 2" in found[0].message
