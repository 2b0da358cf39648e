"""integrity-callbacks: training-loop callbacks that catch the silent failures of fine-tuning.

Public contract::

    from callbacks import Monitor, Finding, Report, IntegrityError, load_recipe
    from callbacks.hf import IntegrityCallback          # transformers.TrainerCallback
    from callbacks.lightning import IntegrityCallback   # Lightning Callback
    from callbacks.hashing import hash_tensors
"""

from callbacks.errors import ConfigError, IntegrityError, RecipeError
from callbacks.events import EVENTS, EventContext
from callbacks.findings import CODES, Finding
from callbacks.monitor import IntegrityWarning, Monitor
from callbacks.recipe import IntegrityConfig, load_recipe
from callbacks.report import Report

__version__ = "0.1.0"

__all__ = [
    "CODES", "EVENTS", "ConfigError", "EventContext", "Finding", "IntegrityConfig", "IntegrityError",
    "IntegrityWarning", "Monitor", "RecipeError", "Report", "load_recipe",
]
