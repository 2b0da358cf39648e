"""Saved-state coverage (issue 4): every trainable parameter reaches the checkpoint."""

from __future__ import annotations

from callbacks.checks.base import Check, CheckConfig


class SavedStateConfig(CheckConfig):
    """Recipe section ``checks.saved_state``."""

    verify_values: bool = False


class SavedStateCheck(Check):
    """Trainable parameters missing from what is (or will be) saved."""

    name = "saved_state"
    Config = SavedStateConfig
