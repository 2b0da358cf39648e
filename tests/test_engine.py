"""The engine: dispatch, policies, CHECK_FAILED, the report (JSON and table), state round trip."""

import json
import pickle
import warnings

import pytest
from models import LinguaLM
from torch import nn

from callbacks import CODES, EVENTS, Finding, IntegrityError, IntegrityWarning, Monitor, Report
from callbacks.checks.base import Check

DECLARED = [("tok_embeddings.weight", "output.weight")]


def broken_model():
    model = LinguaLM()
    model.output.weight = nn.Parameter(model.output.weight.detach().clone())
    return model


class Exploding(Check):
    """A check with a bug: raises at every event."""

    name = "exploding"

    def run(self, ctx):
        raise RuntimeError("boom")


def test_policy_raise_raises_integrity_error_with_findings_and_writes_report(tmp_path, capsys):
    report = tmp_path / "r" / "integrity.json"
    monitor = Monitor(declare_ties=DECLARED, report=report)
    with pytest.raises(IntegrityError) as info:
        monitor.dispatch("init", broken_model(), step=0)
    assert [f.code for f in info.value.findings] == ["TIE_BROKEN"]
    data = json.loads(report.read_text())
    assert data["counts"] == {"TIE_BROKEN": 1}
    assert data["findings"][0]["params"] == ["output.weight", "tok_embeddings.weight"]
    out = capsys.readouterr().out
    assert out.count("integrity report") == 1 and "TIE_BROKEN" in out  # the table, once, at the first error
    message = str(info.value).splitlines()
    assert message[0] == "1 integrity error(s):"
    assert message[1].startswith("  [error] TIE_BROKEN at init@0 [output.weight, tok_embeddings.weight]: ")
    assert message[1].endswith("(fix: TIE_BROKEN below)") and len(message[1]) <= 240
    assert message[2:] == ["fixes:", f"  TIE_BROKEN: {info.value.findings[0].hint}"]


def test_policy_warn_warns_and_goes_on():
    monitor = Monitor(policy="warn", declare_ties=DECLARED)
    with pytest.warns(IntegrityWarning, match="TIE_BROKEN"):
        monitor.dispatch("init", broken_model(), step=0)
    assert [f.code for f in monitor.findings] == ["TIE_BROKEN"]


def test_policy_log_only_logs(caplog):
    monitor = Monitor(policy="log", declare_ties=DECLARED)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.dispatch("init", broken_model(), step=0)
    assert "TIE_BROKEN" in caplog.text


def test_a_check_that_raises_becomes_check_failed_and_training_goes_on():
    monitor = Monitor(policy="raise", extra_checks=[Exploding()])
    for event, ctx in [("init", {}), ("step", {"phase": "before_optimizer"}), ("end", {})]:
        found = monitor.dispatch(event, LinguaLM(tie=False), step=1, **ctx)  # no IntegrityError even under raise
        assert [f.code for f in found] == ["CHECK_FAILED"]
        assert found[0].severity == "warning" and "boom" in found[0].message
        assert found[0].check == "exploding" and "RuntimeError" in found[0].details["traceback"]


def test_report_table_and_json(tmp_path):
    monitor = Monitor(policy="log", declare_ties=DECLARED)
    model = broken_model()
    monitor.dispatch("init", model, step=0)
    report = monitor.report
    assert isinstance(report, Report)
    text = str(report)
    assert "TIE_BROKEN" in text and "init@0" in text and "fixes:" in text and "tie map" in text
    data = json.loads(report.to_json())
    assert data["sections"]["ties"]["tie_map"]["parameters_unique"] > 0
    assert Finding.from_dict(data["findings"][0]) == monitor.findings[0]


def test_finding_validation():
    with pytest.raises(ValueError, match="unknown finding code"):
        Finding.make("NOT_A_CODE", event="init", step=0, message="m", hint="h")
    finding = Finding.make("TIE_UNDECLARED", event="init", step=0, params=["a", "b"], message="m", hint="h")
    assert finding.severity == CODES["TIE_UNDECLARED"].severity == "info"
    assert finding.params == ("a", "b")


def test_unknown_event_and_step_without_phase_are_errors():
    monitor = Monitor(policy="log")
    with pytest.raises(ValueError, match="unknown event"):
        monitor.dispatch("begin", LinguaLM(), step=0)
    with pytest.raises(ValueError, match="phase"):
        monitor.dispatch("step", LinguaLM(), step=1)
    assert set(EVENTS) == {"init", "step", "checkpoint", "load", "merge", "end"}


def test_state_round_trips_and_pickles():
    model = LinguaLM()
    first = Monitor(policy="log", declare_ties=DECLARED)
    first.dispatch("init", model, step=0)
    model.output.weight = nn.Parameter(model.output.weight.detach().clone())
    first.dispatch("step", model, step=1, phase="after_optimizer")
    state = pickle.loads(pickle.dumps(first.state_dict()))
    json.dumps(state)  # plain data: HF stores it in trainer_state.json
    resumed = Monitor(policy="log", declare_ties=DECLARED)
    resumed.load_state_dict(state)
    assert resumed.findings == first.findings
    # the broken tie was already reported before the checkpoint: not reported again after resume
    assert resumed.dispatch("step", model, step=2, phase="after_optimizer") == []


def test_only_rank_zero_prints_and_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    report = tmp_path / "integrity.json"
    monitor = Monitor(policy="log", declare_ties=DECLARED, report=report)
    assert monitor.rank == 1
    monitor.dispatch("init", broken_model(), step=0)
    monitor.dispatch("end", broken_model(), step=1)
    assert not report.exists() and capsys.readouterr().out == ""
    assert [f.code for f in monitor.findings][:1] == ["TIE_BROKEN"]  # every rank still checks
