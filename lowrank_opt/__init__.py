"""lowrank_opt: LoRA fine-tuning that behaves like full fine-tuning with the optimizer you use.

Wrap an already-built optimizer around the LoRA pairs of a model::

    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = lowrank_opt.LowRankWrapper(base, model)   # LoFT-AdamW, found from the optimizer's class

See ``docs/math.md`` for the mathematics and ``docs/`` for each rule.
"""

from .advice import LowRankAdviceWarning, advise
from .factory import build
from .hybrid import MuonWithAdamW
from .layout import STATE_VERSION
from .linalg import compute_dtype
from .pairs import HasLoRAPairs, LoRALinear, LoRAPair, find_lora_pairs, inject_lora
from .registry import ENTRY_POINT_GROUP, available_rules, resolve_rule, rule_for
from .rule import CalibrationRule, Context, StateKind, Switches, calibrate_state
from .schedule import Schedule
from .views import FactorView, build_view, view_of
from .wrapper import LowRankWrapper

__all__ = [
    "CalibrationRule",
    "Context",
    "ENTRY_POINT_GROUP",
    "FactorView",
    "HasLoRAPairs",
    "LoRALinear",
    "LoRAPair",
    "LowRankAdviceWarning",
    "LowRankWrapper",
    "MuonWithAdamW",
    "STATE_VERSION",
    "Schedule",
    "StateKind",
    "Switches",
    "advise",
    "available_rules",
    "build",
    "build_view",
    "calibrate_state",
    "compute_dtype",
    "find_lora_pairs",
    "inject_lora",
    "resolve_rule",
    "rule_for",
    "view_of",
]

__version__ = "0.1.0"
