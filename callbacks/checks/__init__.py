"""Check families, one per file. :data:`REGISTRY` maps each recipe key to its class, in dispatch order."""

from __future__ import annotations

from callbacks.checks.adapter_init import AdapterInitCheck
from callbacks.checks.base import Check, CheckConfig
from callbacks.checks.hashes import HashCheck
from callbacks.checks.merge import MergeCheck
from callbacks.checks.saved_state import SavedStateCheck
from callbacks.checks.ties import TieCheck
from callbacks.checks.trainable import TrainableCheck

#: recipe key -> check family class. Ties run first: other families read the tie map it records.
REGISTRY: dict[str, type[Check]] = {
    cls.name: cls for cls in (TieCheck, AdapterInitCheck, SavedStateCheck, HashCheck, MergeCheck, TrainableCheck)
}

__all__ = ["REGISTRY", "Check", "CheckConfig", "TieCheck", "AdapterInitCheck", "SavedStateCheck", "HashCheck",
           "MergeCheck", "TrainableCheck"]
