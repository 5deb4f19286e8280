"""Where the wrapper keeps its state, and how a checkpoint of it is checked and loaded.

Every LoRA factor has one entry in the base optimizer's ``state`` (keyed by the parameter
object, so ``state_dict()`` and distributed checkpoints see one entry per parameter): the rule's
statistics, and two keys of the wrapper's own:

* ``lowrank_step``: steps this pair has taken (int64, on the CPU; the same on both factors), from
  which the schedule derives which factor moves, so a resumed run continues in the same phase;
* ``lowrank_basis_gram``: ``C C^T`` of the factor as the optimizer left it, its partner's Gram,
  from which a factor changed outside the optimizer is detected;
* ``lowrank_basis_sketch`` (replicated mode, in memory only): ``C w`` for a fixed vector ``w``
  with distinct entries, which also catches a change that keeps the Gram (the rows of ``B``
  permuted). It is a check, not state a resume needs: ``state_dict()`` leaves it out (so
  checkpoints move between modes), and a step re-establishes it where it is missing;
* ``lowrank_stats_from`` (only after a reset): the pair's step count when the factor's statistics
  were reset after an outside change, so their bias corrections count from there.

Every rank keeps the wrapper's keys of every pair; a sharded strategy keeps the statistics of a
pair only where the pair is stepped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .linalg import compute_dtype, gram
from .pairs import LoRAPair, label
from .rule import CalibrationRule, Context, Switches
from .views import SIDES, Side, canonical, view_of

__all__ = [
    "STATE_VERSION",
    "VERSION_KEY",
    "IDENTITY_KEY",
    "STEP_KEY",
    "BASIS_GRAM_KEY",
    "WRAPPER_KEYS",
    "SKETCH_KEY",
    "STATS_FROM_KEY",
    "OWN_KEYS",
    "basis_sketch",
    "ensure_sketches",
    "without_sketches",
    "check_factors",
    "factor_matrix",
    "coefficients_of",
    "basis_gram",
    "create_state",
    "hidden_wrapper_keys",
    "LoadPlan",
    "plan_load",
]

STATE_VERSION = 2
VERSION_KEY = "lowrank_opt_version"
IDENTITY_KEY = "lowrank_opt_rule"  # "<rule>/<base optimizer class>": what wrote the statistics
STEP_KEY = "lowrank_step"
BASIS_GRAM_KEY = "lowrank_basis_gram"
SKETCH_KEY = "lowrank_basis_sketch"
STATS_FROM_KEY = "lowrank_stats_from"
WRAPPER_KEYS = (STEP_KEY, BASIS_GRAM_KEY)  # in every factor's entry, on every rank
OWN_KEYS = (*WRAPPER_KEYS, SKETCH_KEY, STATS_FROM_KEY)  # every key the wrapper may keep in a factor's entry


def check_factors(pairs: Sequence[LoRAPair], group_of: Mapping[Tensor, Any]) -> None:
    """Both factors of every pair train and belong to the base optimizer (``group_of``: parameter -> group)."""
    for i, pair in enumerate(pairs):
        name = label(pair, i)
        for side, factor in (("a", pair.a), ("b", pair.b)):
            if not factor.requires_grad:
                raise ValueError(f"{name}: factor {side} does not require grad; both factors must train")
            if factor not in group_of:
                raise ValueError(f"{name}: factor {side} is not in the base optimizer's param_groups")


def factor_matrix(pair: LoRAPair, side: Side, t: Tensor) -> Tensor:
    """A tensor shaped like factor ``side`` of ``pair`` seen as its matrix: ``(r, n)`` or ``(m, r)``."""
    return pair.matrix_a(t) if side == "a" else pair.matrix_b(t)


def coefficients_of(pair: LoRAPair, side: Side, t: Tensor) -> Tensor:
    """A tensor shaped like factor ``side`` seen as its coefficients ``C`` (r, l): ``a``, or ``b^T``."""
    return canonical(side, factor_matrix(pair, side, t))


def basis_gram(coeff: Tensor) -> Tensor:
    """The ``(..., r, r)`` Gram that coefficients ``C`` (..., r, l) give their partner, detached, in the compute dtype."""
    c = coeff.detach()
    return gram(c.to(compute_dtype(c.dtype)))


@functools.cache
def _sketch_weights(l: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``w_j = frac(j phi) + 1/2`` (``phi`` the golden ratio): distinct, evenly spread, fixed."""
    j = torch.arange(1, l + 1, dtype=torch.float64)
    return torch.remainder(j * 0.6180339887498949, 1.0).add_(0.5).to(device=device, dtype=dtype)


def basis_sketch(coeff: Tensor) -> Tensor:
    """``C w`` (..., r) of coefficients ``C`` (..., r, l), detached, in the compute dtype."""
    c = coeff.detach()
    c = c.to(compute_dtype(c.dtype))
    return c @ _sketch_weights(c.shape[-1], c.dtype, c.device)


@torch.no_grad()
def ensure_sketches(pairs: Sequence[LoRAPair], state: Mapping[Tensor, dict[str, Any]]) -> None:
    """Give every factor that has none (created, or just loaded) its sketch, from its current value."""
    for pair in pairs:
        for side, param in zip(SIDES, (pair.a, pair.b)):
            entry = state[param]
            if SKETCH_KEY not in entry:
                entry[SKETCH_KEY] = basis_sketch(coefficients_of(pair, side, param))


def without_sketches(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with the in-memory sketches left out of every entry."""
    state = {k: {key: v for key, v in e.items() if key != SKETCH_KEY} for k, e in state_dict["state"].items()}
    return {**state_dict, "state": state}


@torch.no_grad()
def create_state(
    pairs: Sequence[LoRAPair],
    state: Mapping[Tensor, dict[str, Any]],
    rule: CalibrationRule,
    groups: Mapping[Tensor, Mapping[str, Any]],
    switches: Switches,
    owns: Callable[[int], bool],
) -> None:
    """Create every factor's state now, so a checkpoint has an entry per factor before step 1.

    ``pairs`` hold whole factors (gathered copies under FSDP2). Statistics are created where this
    rank owns the pair and the rule keeps its own; the wrapper's keys everywhere. Entries already
    holding the wrapper's keys (loaded) are left as they are.
    """
    for i, pair in enumerate(pairs):
        for side, param in zip(SIDES, (pair.a, pair.b)):
            entry = state[param]
            if STEP_KEY in entry:
                continue
            view = view_of(pair, side)  # G = 1
            if owns(i) and not rule.uses_base_step:
                ctx = Context.of(
                    groups[param], torch.zeros(1, dtype=view.coeff.dtype, device=view.coeff.device), switches
                )
                entry.update({key: value[0].clone() for key, value in rule.init_state(view, ctx).items()})
            entry[STEP_KEY] = torch.zeros((), dtype=torch.int64)
            entry[BASIS_GRAM_KEY] = basis_gram(view.coeff[0])


@contextmanager
def hidden_wrapper_keys(entries: Sequence[dict[str, Any]]) -> Iterator[None]:
    """The wrapper's keys taken out of ``entries`` for the duration: a base optimizer creates its
    state lazily when it finds a parameter's entry empty."""
    hidden = [{key: entry.pop(key) for key in OWN_KEYS if key in entry} for entry in entries]
    try:
        yield
    finally:
        for entry, keys in zip(entries, hidden):
            entry.update(keys)


@dataclass(frozen=True)
class LoadPlan:
    """A checked checkpoint: the base optimizer's part, and each factor's entry, ready to install."""

    base_state_dict: dict[str, Any]
    factor_entries: dict[Tensor, dict[str, Any]]


def plan_load(
    state_dict: Mapping[str, Any],
    param_groups: Sequence[Mapping[str, Any]],
    pairs: Sequence[LoRAPair],
    live_state: Mapping[Tensor, Mapping[str, Any]],
    owns: Callable[[int], bool],
    identity: str,
) -> LoadPlan:
    """Check a whole checkpoint from ``state_dict()`` against the live optimizer before anything changes.

    Raises ``ValueError`` naming the first mismatch: version, the rule and base optimizer that wrote
    it (``identity``), param groups, a factor without the wrapper's keys, a statistic missing (a
    checkpoint of another rule), of another shape (another rank) or not finite, or step counters
    that are negative or differ between the two factors of a pair.
    """
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"state dict lacks {key!r}: not a state dict from LowRankWrapper.state_dict()")
    version = state_dict.get(VERSION_KEY, STATE_VERSION)
    if version not in (1, STATE_VERSION):
        raise ValueError(f"state dict version {version!r} is not supported (expected {STATE_VERSION})")
    saved_identity = state_dict.get(IDENTITY_KEY, identity)
    if saved_identity != identity:
        raise ValueError(f"state dict was written by {saved_identity!r}; this optimizer is {identity!r}")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"state dict has {len(saved_groups)} param groups, the optimizer has {len(param_groups)}")
    for i, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"param group {i} of the state dict has {len(saved['params'])} parameters, "
                f"the optimizer's has {len(group['params'])}"
            )
    saved_id = {
        p: pid for saved, group in zip(saved_groups, param_groups) for pid, p in zip(saved["params"], group["params"])
    }
    saved_state = state_dict["state"]
    entries: dict[Tensor, dict[str, Any]] = {}
    for index, pair in enumerate(pairs):
        name = label(pair, index)
        steps = []
        for side, factor in (("a", pair.a), ("b", pair.b)):
            entry = saved_state.get(saved_id[factor])
            if not isinstance(entry, Mapping) or any(key not in entry for key in WRAPPER_KEYS):
                raise ValueError(f"state dict has no low-rank state for factor {side} of {name}")
            r = pair.rank
            if tuple(entry[BASIS_GRAM_KEY].shape) != (r, r):
                raise ValueError(
                    f"{name}, factor {side}: saved {BASIS_GRAM_KEY} is {tuple(entry[BASIS_GRAM_KEY].shape)}, "
                    f"expected {(r, r)} (a checkpoint of another rank?)"
                )
            if SKETCH_KEY in entry and tuple(entry[SKETCH_KEY].shape) != (r,):
                raise ValueError(
                    f"{name}, factor {side}: saved {SKETCH_KEY} is {tuple(entry[SKETCH_KEY].shape)}, expected {(r,)}"
                )
            for key, value in live_state[factor].items():
                if key in OWN_KEYS or not isinstance(value, Tensor):
                    continue
                if key not in entry:
                    raise ValueError(f"{name}, factor {side}: state dict lacks {key!r} (a checkpoint of another rule?)")
                if tuple(entry[key].shape) != tuple(value.shape):
                    raise ValueError(
                        f"{name}, factor {side}: saved {key!r} is {tuple(entry[key].shape)}, expected {tuple(value.shape)}"
                    )
            for key, value in entry.items():
                if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise ValueError(f"{name}, factor {side}: saved {key!r} is not finite")
            steps.append(int(entry[STEP_KEY]))
            if steps[-1] < 0:
                raise ValueError(f"{name}, factor {side}: saved {STEP_KEY} is {steps[-1]}, a count of steps")
            keep = entry if owns(index) else {key: entry[key] for key in WRAPPER_KEYS}
            device = factor.device
            loaded = {
                key: value.to(device=device, copy=True) if isinstance(value, Tensor) else value
                for key, value in keep.items()
            }
            loaded[STEP_KEY] = torch.tensor(steps[-1], dtype=torch.int64)  # version 1 kept a float32 counter
            entries[factor] = loaded
        if steps[0] != steps[1]:
            raise ValueError(f"{name}: the two factors' step counters differ in the state dict")
    factor_ids = {saved_id[f] for f in entries}
    base_state = {k: v for k, v in saved_state.items() if k not in factor_ids}
    return LoadPlan({"state": base_state, "param_groups": saved_groups}, entries)
