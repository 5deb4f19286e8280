"""Sign-SGD with momentum (Signum) and its lowrank_opt rule: an example of a third-party plugin."""

from .optimizer import Signum
from .rule import LoFTSignum

__all__ = ["LoFTSignum", "Signum"]
