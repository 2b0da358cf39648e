"""The integration classes spell out their constructor arguments (``inspect.signature``, IDEs and jsonargparse read
them), ``checks`` is typed, and misuse raises with the fix in the message."""

from __future__ import annotations

import inspect

import pytest

from callbacks import Monitor
from callbacks.errors import ConfigError, RecipeError
from callbacks.recipe import ChecksConfig

ARGUMENTS = ["policy", "declare_ties", "checks", "report", "extra_checks", "config", "monitor"]


def integration_classes():
    from callbacks.accelerate import AcceleratorHooks
    from callbacks.hf import IntegrityCallback as HFCallback
    from callbacks.lightning import IntegrityCallback as LightningCallback

    return [HFCallback, LightningCallback, AcceleratorHooks]


@pytest.mark.parametrize("cls", integration_classes(), ids=lambda c: c.__module__)
def test_signature_names_every_argument(cls):
    parameters = inspect.signature(cls).parameters
    assert [p for p in parameters if p != "accelerator"] == ARGUMENTS
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    assert "ChecksConfig" in str(parameters["checks"].annotation)


@pytest.mark.parametrize("cls", integration_classes()[:2], ids=lambda c: c.__module__)
def test_checks_as_typed_config_or_mapping_configure_the_same(cls):
    typed = cls(checks=ChecksConfig(hashes={"every_n_steps": 4}))
    plain = cls(checks={"hashes": {"every_n_steps": 4}})
    assert typed.monitor.config == plain.monitor.config
    assert typed.monitor.config.checks.hashes.every_n_steps == 4


@pytest.mark.parametrize("cls", integration_classes()[:2], ids=lambda c: c.__module__)
def test_misuse_raises_with_the_fix(cls):
    with pytest.raises(RecipeError, match="hashez.*allowed keys: .*hashes"):
        cls(checks={"hashez": {}})
    with pytest.raises(ConfigError, match="do not also pass checks"):
        cls(monitor=Monitor(), checks={"hashes": {"every_n_steps": 2}})
    with pytest.raises(ConfigError, match="not beside it"):
        cls(config=Monitor().config, report="x.json")
    existing = Monitor(policy="log")
    assert cls(monitor=existing).monitor is existing
    assert cls(monitor=existing, checks=None).monitor is existing  # None is "not given", as it used to be
    assert cls(config=existing.config, checks=None).monitor.config == existing.config
