"""Gradient and weight hashes (issue 5): frozen weights, replicas, tied copies, run-to-run divergence."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from callbacks.checks.base import Check, CheckConfig


class HashConfig(CheckConfig):
    """Recipe section ``checks.hashes``."""

    every_n_steps: int = Field(1, ge=1)
    frozen_every_n_steps: int = Field(50, ge=1)
    replicas: bool = True
    frozen: bool = True
    ledger: str | None = None
    backend: Literal["auto", "torch", "triton"] = "auto"


class HashCheck(Check):
    """Bitwise fingerprints of gradients and parameters."""

    name = "hashes"
    Config = HashConfig
