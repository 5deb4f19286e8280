"""``LowRankWrapper``: any torch optimizer around the LoRA pairs of a model (MATH.md sections 2-4).

One step, as data:

1. the schedule says which factor of each pair moves (from the pair's step counter, a tensor);
2. views of both factors are built, each Gram factored once;
3. gradients become coefficient gradients ``g_hat`` (one sync checks they are finite and that no
   factor changed outside the optimizer);
4. the clip coefficient is computed from full-space norms and applied;
5. the rule observes ``g_hat`` on both factors;
6. the active factor's rule returns ``delta_C`` (decay included), which is applied;
7. the partner's statistics are calibrated with ``T = Gamma_new^-1 F_new^T F_old``;
8. every other parameter goes through the base optimizer unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ._sync import to_host
from .distributed import DistributedStrategy, default_strategy
from .linalg import damped_cholesky, transport
from .pairs import LoRAPair, find_lora_pairs
from .registry import resolve_rule
from .rule import CalibrationRule, StateKind, Switches
from .schedule import Schedule
from .views import FactorView, Side, build_view, coefficient_gram, tangent_sq_norm

__all__ = ["LowRankWrapper", "STATE_VERSION"]

STATE_VERSION = 1
VERSION_KEY = "lowrank_opt_version"
STEP_KEY = "lowrank_step"  # steps this pair has taken (float32 scalar, on both factors)
BASIS_GRAM_KEY = "lowrank_basis_gram"  # C C^T of this factor: its partner's Gram, to detect outside changes
_WRAPPER_KEYS = (STEP_KEY, BASIS_GRAM_KEY)  # kept by every rank, whichever rank owns the pair


def _other(side: Side) -> Side:
    return "b" if side == "a" else "a"


class LowRankWrapper(Optimizer):
    r"""Lift an already-built optimizer to the LoRA pairs of a model.

    For every pair ``W = W0 + s B A`` the active factor ``C`` (over the frozen basis ``F``) moves as
    full fine-tuning with the base optimizer would move ``W``, restricted to the span of ``F``:

    .. math::
        \hat g = \Gamma^{-1} \tfrac{\partial L}{\partial C} / s^2, \qquad
        U = \mathrm{rule}(s F \hat g,\ \text{statistics}), \qquad
        C \leftarrow C + \Gamma^{-1} F^\top U / s

    with ``Gamma = F^T F``. Statistics of both factors are updated every step and re-based when the
    other factor moves. Parameters that are not LoRA factors are stepped by the base optimizer.

    Args:
        base_optimizer: a built ``torch.optim`` optimizer over all trainable parameters, LoRA
            factors included. Its ``param_groups`` and ``state`` are shared, so LR schedulers,
            hyperparameter changes and ``state_dict()`` act on both.
        model_or_pairs: a model (pairs are found with :func:`~lowrank_opt.find_lora_pairs`) or
            :class:`~lowrank_opt.LoRAPair` objects.
        rule: ``None`` (the rule registered for the optimizer's class), a registered name, a
            :class:`~lowrank_opt.CalibrationRule` class or instance.
        rule_options: keyword arguments for the rule's constructor.
        schedule: ``"alternate"`` (``b`` first, then ``a``, switching every ``alternate_every``
            steps) or ``"both"`` (both factors every step).
        rescale_grad: use ``g_hat`` rather than the raw factor gradient.
        calibrate_first_moment: re-base linear statistics (first moments) when the basis moves.
        calibrate_second_moment: re-base second moments when the basis moves.
        project_update: build the update in full space and project it back (rules may refuse off).
        max_grad_norm: clip the total full-space gradient norm to this value inside ``step()``.
        full_space_clip: measure clipping norms in full space (``False``: on raw factor gradients).
        distributed: how ranks share the work (:mod:`lowrank_opt.distributed`): ``None`` picks
            :class:`~lowrank_opt.distributed.FSDP2` for DTensor factors, else
            :class:`~lowrank_opt.distributed.Replicated` (a single process or DDP);
            :class:`~lowrank_opt.distributed.PairSharded` gives each pair to one rank.

    Departures from the dense optimizer are stated by each rule; weight decay on a factor decays
    ``s B A`` (``W0`` is frozen), not ``W``.
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        model_or_pairs: nn.Module | Iterable[LoRAPair],
        rule: CalibrationRule | str | type[CalibrationRule] | None = None,
        *,
        rule_options: dict[str, Any] | None = None,
        schedule: Literal["alternate", "both"] = "alternate",
        alternate_every: int = 1,
        rescale_grad: bool = True,
        calibrate_first_moment: bool = True,
        calibrate_second_moment: bool = True,
        project_update: bool = True,
        max_grad_norm: float | None = None,
        full_space_clip: bool = True,
        distributed: DistributedStrategy | None = None,
    ) -> None:
        if not isinstance(base_optimizer, Optimizer) or isinstance(base_optimizer, LowRankWrapper):
            raise ValueError(
                f"base_optimizer must be a built torch.optim.Optimizer, got {type(base_optimizer).__name__}"
            )
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and 0 < max_grad_norm < math.inf):
            raise ValueError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}")
        self.base = base_optimizer
        self.pairs = find_lora_pairs(model_or_pairs)
        self.schedule = Schedule(schedule, alternate_every)
        self.switches = Switches(rescale_grad, calibrate_first_moment, calibrate_second_moment, project_update)
        self.max_grad_norm = max_grad_norm
        self.full_space_clip = full_space_clip
        self.last_grad_norm: Tensor | None = None  # the total full-space norm of the last clip or measure
        self.rule = resolve_rule(rule, base_optimizer, rule_options)
        self.rule.bind(base_optimizer, self.switches)

        groups = self._group_of()
        for i, pair in enumerate(self.pairs):
            for side in ("a", "b"):
                factor = pair.a if side == "a" else pair.b
                if not factor.requires_grad:
                    raise ValueError(f"{_label(pair, i)}: factor {side} does not require grad; both factors must train")
                if factor not in groups:
                    raise ValueError(f"{_label(pair, i)}: factor {side} is not in the base optimizer's param_groups")
        self._factors = {factor for pair in self.pairs for factor in (pair.a, pair.b)}
        self._views: list[tuple[FactorView, FactorView]] | None = None
        if distributed is not None and not isinstance(distributed, DistributedStrategy):
            raise ValueError(f"distributed must be a lowrank_opt.distributed strategy or None, got {distributed!r}")
        self.distributed = distributed if distributed is not None else default_strategy(self.pairs)
        self.distributed.bind(self)

        # torch.optim.Optimizer bookkeeping; param_groups and state stay the base optimizer's.
        self.defaults = base_optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True
        self._init_state()

    # ------------------------------------------------------------------ shared with the base
    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.base.state

    @state.setter
    def state(self, value: Any) -> None:
        self.base.state = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.base.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"LowRankWrapper({type(self.base).__name__}, rule={self.rule!r}, pairs={len(self.pairs)}, schedule={self.schedule})"

    # ------------------------------------------------------------------ state
    def _group_of(self) -> dict[Tensor, dict[str, Any]]:
        return {p: group for group in self.param_groups for p in group["params"]}

    def _init_state(self) -> None:
        """Create every factor's state now, so a checkpoint has an entry per factor before step 1.

        Statistics only where this rank owns the pair; counters and basis Grams everywhere."""
        with self.distributed.gathered(self):
            groups = self._group_of()
            for i, pair in enumerate(self.pairs):
                for view in (build_view(pair, "a"), build_view(pair, "b")):
                    state = self.state[view.param]
                    if STEP_KEY in state:  # loaded; a base optimizer may also fill its own state eagerly (Adagrad)
                        continue
                    if self.distributed.owns(i) and not self.rule.uses_base_step:
                        state.update(self.rule.init_state(view, groups[view.param]))
                    state[STEP_KEY] = torch.zeros((), dtype=torch.float32)
                    state[BASIS_GRAM_KEY] = coefficient_gram(view.coeff)

    def _swap_factors(self, mapping: dict[Tensor, Tensor]) -> None:
        """Put ``mapping[f]`` in place of factor (or base weight) ``f`` in the pairs, the param groups and the state.

        How :class:`~lowrank_opt.distributed.FSDP2` runs a step on gathered, whole factors; the
        inverse mapping puts the originals back."""
        if not mapping:
            return

        def swap(t: Tensor) -> Tensor:
            return mapping.get(t, t)

        self.pairs = [
            replace(
                pair,
                a=swap(pair.a),
                b=swap(pair.b),
                base_weight=None if pair.base_weight is None else swap(pair.base_weight),
            )
            for pair in self.pairs
        ]
        for group in self.param_groups:
            group["params"] = [mapping.get(p, p) for p in group["params"]]
        for old, new in mapping.items():
            if old in self.state:
                self.state[new] = self.state.pop(old)
        self._factors = {factor for pair in self.pairs for factor in (pair.a, pair.b)}
        self._views = None

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict, with the factors' statistics and counters, versioned."""
        state_dict = super().state_dict()
        state_dict[VERSION_KEY] = STATE_VERSION
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`; checked whole before anything changes."""
        version = state_dict.get(VERSION_KEY, STATE_VERSION)
        if version != STATE_VERSION:
            raise ValueError(f"state dict version {version!r} is not supported (expected {STATE_VERSION})")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(saved_groups)} param groups, the optimizer has {len(self.param_groups)}"
            )
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {i} of the state dict has {len(saved['params'])} parameters, the optimizer's has {len(group['params'])}"
                )
        id_map = {
            saved_id: p
            for saved, group in zip(saved_groups, self.param_groups)
            for saved_id, p in zip(saved["params"], group["params"])
        }
        saved_state = state_dict["state"]
        factor_ids = {saved_id for saved_id, p in id_map.items() if p in self._factors}
        pair_of = {factor: i for i, pair in enumerate(self.pairs) for factor in (pair.a, pair.b)}
        for i, pair in enumerate(self.pairs):
            self._check_saved_pair(i, pair, saved_state, id_map)

        base_state = {k: v for k, v in saved_state.items() if k not in factor_ids}
        self.base.load_state_dict({"state": base_state, "param_groups": saved_groups})
        for saved_id in factor_ids:
            p = id_map[saved_id]
            entry = {
                key: value.to(device=p.device, copy=True) if isinstance(value, Tensor) else value
                for key, value in saved_state[saved_id].items()
            }
            entry[STEP_KEY] = entry[STEP_KEY].to(device="cpu", dtype=torch.float32)
            if not self.distributed.owns(pair_of[p]):
                entry = {key: entry[key] for key in _WRAPPER_KEYS}
            self.state[p] = entry
        self._views = None

    def _check_saved_pair(
        self, index: int, pair: LoRAPair, saved_state: dict[Any, Any], id_map: dict[Any, Tensor]
    ) -> None:
        ids = {p: saved_id for saved_id, p in id_map.items()}
        label = _label(pair, index)
        entries = {}
        for side, factor in (("a", pair.a), ("b", pair.b)):
            entry = saved_state.get(ids[factor])
            if not isinstance(entry, dict) or any(key not in entry for key in _WRAPPER_KEYS):
                raise ValueError(f"state dict has no low-rank state for factor {side} of {label}")
            r = pair.rank
            if tuple(entry[BASIS_GRAM_KEY].shape) != (r, r):
                raise ValueError(
                    f"{label}, factor {side}: saved {BASIS_GRAM_KEY} is {tuple(entry[BASIS_GRAM_KEY].shape)}, "
                    f"expected {(r, r)} (a checkpoint of another rank?)"
                )
            current = self.state[factor]
            for key, value in current.items():
                if key in _WRAPPER_KEYS or not isinstance(value, Tensor):
                    continue
                if key not in entry:
                    raise ValueError(
                        f"{label}, factor {side}: state dict lacks {key!r} (a checkpoint of another rule?)"
                    )
                if tuple(entry[key].shape) != tuple(value.shape):
                    raise ValueError(
                        f"{label}, factor {side}: saved {key!r} is {tuple(entry[key].shape)}, expected {tuple(value.shape)}"
                    )
            entries[side] = entry
        if float(entries["a"][STEP_KEY]) != float(entries["b"][STEP_KEY]):
            raise ValueError(f"{label}: the two factors' step counters differ in the state dict")

    # ------------------------------------------------------------------ step
    def _take_views(self) -> list[tuple[FactorView, FactorView]]:
        views = (
            self._views if self._views is not None else [(build_view(p, "a"), build_view(p, "b")) for p in self.pairs]
        )
        self._views = views
        return views

    def _stepping_pairs(self) -> list[int]:
        """Indices of the pairs with gradients; a pair has gradients on both factors or on neither."""
        stepping = []
        for i, pair in enumerate(self.pairs):
            if pair.a.grad is None and pair.b.grad is None:
                continue
            if pair.a.grad is None or pair.b.grad is None:
                missing = "a" if pair.a.grad is None else "b"
                raise ValueError(f"{_label(pair, i)}: factor {missing} has no gradient while its partner has one")
            stepping.append(i)
        return stepping

    def _coefficient_grads(
        self, views: list[tuple[FactorView, FactorView]], stepping: list[int]
    ) -> dict[int, dict[Side, Tensor]]:
        """``g_hat`` of both factors of every stepping pair that this rank owns."""
        grads: dict[int, dict[Side, Tensor]] = {}
        for i in stepping:
            if not self.distributed.owns(i):
                continue
            pair = self.pairs[i]
            grads[i] = {}
            for view in views[i]:
                grad = view.param.grad
                assert grad is not None
                if grad.shape != view.param.shape:
                    raise ValueError(
                        f"{_label(pair, i)}: gradient of factor {view.side} is {tuple(grad.shape)}, expected {tuple(view.param.shape)}"
                    )
                if self.switches.rescale_grad:
                    grads[i][view.side] = view.rescale(grad)
                else:
                    grads[i][view.side] = view.canonical(grad).to(view.gram.dtype)
        return grads

    def _other_grads(self) -> list[Tensor]:
        """Gradients of the parameters that are not LoRA factors."""
        return [
            p.grad
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None and p not in self._factors
        ]

    def _check_inputs(self, views: list[tuple[FactorView, FactorView]]) -> None:
        """One host sync: every gradient finite, and the factors as this optimizer left them.

        A non-finite gradient raises before any state changes. A factor changed outside the
        optimizer (loaded, merged, edited) leaves its partner's statistics in a stale basis; they
        cannot be re-based without the old factor, so they are reset with a warning.
        """
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        finite = self.distributed.finite_flags(grads)
        changed = []
        for pair_views in views:
            for view in pair_views:
                stored = self.state[view.partner][BASIS_GRAM_KEY]
                tol = 100 * torch.finfo(view.gram.dtype).eps
                changed.append((view.gram - stored).norm() > tol * stored.norm() + torch.finfo(view.gram.dtype).tiny)
        flags = [bool(flag) for flag in to_host(finite + changed, torch.bool)]
        for ok, grad in zip(flags[: len(finite)], grads):
            if not ok:
                raise ValueError(f"non-finite gradient in {self._describe(grad)}; no state was changed")
        for flag, (pair, view) in zip(
            flags[len(finite) :], ((pair, v) for pair, vs in zip(self.pairs, views) for v in vs)
        ):
            if flag:
                index = self.pairs.index(pair)
                warnings.warn(
                    f"{_label(pair, index)}: factor {_other(view.side)} changed outside the optimizer; the statistics "
                    f"of factor {view.side} were in its old basis and are reset",
                    stacklevel=3,
                )
                self._reset_statistics(view)
                self.state[view.partner][BASIS_GRAM_KEY] = view.gram.clone()

    def _reset_statistics(self, view: FactorView) -> None:
        state = self.state[view.param]
        for key, kind in self.rule.state_kinds().items():
            if kind is not StateKind.FULL_SPACE and isinstance(state.get(key), Tensor):
                state[key].zero_()

    def _describe(self, grad: Tensor) -> str:
        for i, pair in enumerate(self.pairs):
            for side, factor in (("a", pair.a), ("b", pair.b)):
                if factor.grad is grad:
                    return f"factor {side} of {_label(pair, i)}"
        for g, group in enumerate(self.param_groups):
            for j, p in enumerate(group["params"]):
                if p.grad is grad:
                    return f"parameter {j} of param group {g} (shape {tuple(p.shape)})"
        return "a parameter"

    def _pair_sq_norm(
        self, views: tuple[FactorView, FactorView], grads: dict[Side, Tensor], active: tuple[Side, ...]
    ) -> Tensor:
        view_a, view_b = views
        if not self.full_space_clip:
            raw = [view.param.grad for view in views if view.param.grad is not None]
            return torch.stack([g.float().pow(2).sum() for g in raw]).sum()
        if len(active) == 2:
            return tangent_sq_norm(view_a, grads["a"], view_b, grads["b"])
        view = view_a if active[0] == "a" else view_b
        return view.full_sq_norm(grads[active[0]])

    def _total_norm(
        self, views: list[tuple[FactorView, FactorView]], grads: dict[int, dict[Side, Tensor]], others: list[Tensor]
    ) -> Tensor:
        squares = [
            self._pair_sq_norm(views[i], grads[i], self.schedule.active(int(self.state[self.pairs[i].a][STEP_KEY])))
            for i in grads
        ]
        squares = self.distributed.reduce_squares(to_host(squares, torch.float64))
        squares += self.distributed.squared_norms(others)
        return torch.stack(squares).sum().sqrt() if squares else torch.zeros((), dtype=torch.float64)

    def _clip(self, max_norm: float, views, grads) -> Tensor:
        others = self._other_grads()
        total = self._total_norm(views, grads, others)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for pair_grads in grads.values():
            for g in pair_grads.values():
                g.mul_(coef.to(g.device, g.dtype))
        for g in others:
            g.mul_(coef.to(g.device, g.dtype))
        return total

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip the total full-space gradient norm of every parameter to ``max_norm``.

        Like :func:`torch.nn.utils.clip_grad_norm_` (call it between ``backward()`` and ``step()``),
        but a pair contributes the norm of its full-space gradient ``||s F g_hat||``, never of its
        raw factor gradients. Scales every ``.grad`` in place and returns the total norm before clipping
        (also kept in ``last_grad_norm``); ``max_norm=float("inf")`` only measures it.
        """
        if not (isinstance(max_norm, (int, float)) and max_norm > 0):  # NaN fails the comparison too
            raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r} (or inf to only measure)")
        with torch.no_grad(), self.distributed.gathered(self):
            views = self._take_views()
            stepping = self._stepping_pairs()
            grads = self._coefficient_grads(views, stepping)
            others = self._other_grads()
            total = self._total_norm(views, grads, others)
            self.last_grad_norm = total
            if max_norm == math.inf:
                return total
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            factor_grads = [f.grad for i in stepping for f in (self.pairs[i].a, self.pairs[i].b) if f.grad is not None]
            for g in factor_grads + others:
                g.mul_(coef.to(g.device, g.dtype))
        return total

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimizer step for every pair (through the rule) and every other parameter (through the base)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with self.distributed.gathered(self):
            views = self._take_views()
            try:
                self._check_inputs(views)
                stepping = self._stepping_pairs()
                grads = self._coefficient_grads(views, stepping)
                if self.max_grad_norm is not None:
                    self.last_grad_norm = self._clip(self.max_grad_norm, views, grads)
                groups = self._group_of()
                delegated: list[tuple[int, tuple[Side, ...]]] = []
                moved: list[tuple[int, FactorView]] = []
                for i in stepping:
                    pair = self.pairs[i]
                    done = int(self.state[pair.a][STEP_KEY])
                    active = self.schedule.active(done)
                    for factor in (pair.a, pair.b):
                        self.state[factor][STEP_KEY] += 1
                    moved += [(i, views[i][0 if side == "a" else 1]) for side in active]
                    if not self.distributed.owns(i):
                        continue
                    if self.rule.uses_base_step:
                        delegated.append((i, active))
                    else:
                        self._step_pair(views[i], grads[i], active, done + 1, groups)
                self._step_base(views, grads, delegated)
                self._synchronize(moved)
            finally:
                self._views = None
        return loss

    def _synchronize(self, moved: list[tuple[int, FactorView]]) -> None:
        """Every rank gets the factors that moved; ranks that did not step a pair record its new Gram."""
        self.distributed.synchronize([(i, view.param) for i, view in moved])
        for i, view in moved:
            if not self.distributed.owns(i):
                self.state[view.param][BASIS_GRAM_KEY] = coefficient_gram(view.coeff)

    def _step_pair(
        self,
        views: tuple[FactorView, FactorView],
        grads: dict[Side, Tensor],
        active: tuple[Side, ...],
        step: int,
        groups,
    ) -> None:
        by_side = {view.side: view for view in views}
        for view in views:
            self.rule.observe(self.state[view.param], grads[view.side], view, groups[view.param], step)
        deltas = {
            side: self.rule.update(
                self.state[by_side[side].param], grads[side], by_side[side], groups[by_side[side].param], step
            )
            for side in active
        }
        moves = [(by_side[side], self._apply(by_side[side], deltas[side])) for side in active]
        for view, t in moves:
            partner = by_side[_other(view.side)]
            self.rule.calibrate(self.state[partner.param], t, partner)

    def _apply(self, view: FactorView, delta: Tensor) -> Tensor:
        """``C <- C + delta``; returns the partner's calibration map ``T``."""
        coeff = view.coeff
        old = coeff.to(view.gram.dtype, copy=True)
        coeff.copy_(old + delta)
        return self._transport_after_move(view, old)

    def _transport_after_move(self, view: FactorView, old: Tensor) -> Tensor:
        """``T = Gamma_new^-1 C_new C_old^T``, recording the new Gram for outside-change detection."""
        new = view.coeff.to(view.gram.dtype)
        gram_new = coefficient_gram(view.coeff)
        self.state[view.param][BASIS_GRAM_KEY] = gram_new
        return transport(damped_cholesky(gram_new), new @ old.T)  # (r, l) @ (l, r) -> (r, r)

    def _step_base(
        self, views, grads: dict[int, dict[Side, Tensor]], delegated: list[tuple[int, tuple[Side, ...]]]
    ) -> None:
        """Run the base optimizer on every non-factor parameter, and on both factors of delegated
        pairs with ``g_hat`` as their gradient. The inactive factor is put back afterwards: the
        base's statistics see every gradient (MATH.md section 4), only the active factor moves."""
        stashed = {factor: factor.grad for factor in self._factors}
        for factor in self._factors:
            factor.grad = None
        moved: list[tuple[int, FactorView, Tensor]] = []
        kept: list[tuple[Tensor, Tensor]] = []
        hidden_keys: dict[Tensor, dict[str, Any]] = {}
        for i, active in delegated:
            for view in views[i]:
                view.param.grad = view.canonical(grads[i][view.side]).to(view.param.dtype)
                if view.side in active:
                    moved.append((i, view, view.coeff.to(view.gram.dtype, copy=True)))
                else:
                    kept.append((view.param, view.param.detach().clone()))
                # The base initialises its state lazily when it finds it empty: hide our keys.
                state = self.state[view.param]
                hidden_keys[view.param] = {key: state.pop(key) for key in _WRAPPER_KEYS}
        try:
            self.base.step()
        finally:
            for param, keys in hidden_keys.items():
                self.state[param].update(keys)
            for factor, grad in stashed.items():
                factor.grad = grad
        for param, value in kept:
            param.copy_(value)
        for i, view, old in moved:
            t = self._transport_after_move(view, old)
            partner = views[i][1 if view.side == "a" else 0]
            self.rule.calibrate(self.state[partner.param], t, partner)


def _label(pair: LoRAPair, index: int) -> str:
    return pair.name or f"pair {index}"
