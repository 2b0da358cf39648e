"""Adapter initialisation audit (issue 3): mis-initialised, frozen and dead adapters."""

from __future__ import annotations

from pydantic import Field

from callbacks.checks.base import Check, CheckConfig


class AdapterInitConfig(CheckConfig):
    """Recipe section ``checks.adapter_init``."""

    probe: bool = True
    tolerance: float = Field(1.0e-6, ge=0)
    dead_after_steps: int = Field(3, ge=1)
    modules: dict[str, str] = Field(default_factory=dict)


class AdapterInitCheck(Check):
    """Adapters whose init breaks their method's contract, frozen adapters, adapters that get no gradient."""

    name = "adapter_init"
    Config = AdapterInitConfig
