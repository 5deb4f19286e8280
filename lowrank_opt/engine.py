"""The step as functions over groups of pairs (docs/math.md sections 2-4).

Pairs whose matrices have equal ``(m, n, r)``, dtypes, device and param groups, and whose same
factor moves this step, form a group; the group's factors, gradients and statistics are stacked
into ``(G, ...)`` tensors and every formula runs once per group: batched Grams and Cholesky
factors, batched solves, ``bmm``. The Python work per step grows with the number of groups, not of
pairs; a group of one runs the same code with ``G = 1``.

One step, as data:

1. the schedule says which factor of each pair moves (from the pair's step counter);
2. pairs are grouped; views of both factors are built, each Gram factored once;
3. one host sync checks that every gradient is finite, that no factor changed outside the
   optimizer and which bases need the minimum-norm inverse; gradients then become coefficient
   gradients ``g_hat``, each lifted once;
4. the clip coefficient is computed from full-space norms and applied;
5. the rule observes ``g_hat`` on both factors and returns the step of the active one;
6. decay and the move are applied, and the partner's statistics are calibrated with
   ``T = Gamma_new^-1 F_new^T F_old``;
7. every other parameter goes through the base optimizer unchanged.

The functions here read and write only what they are given (pairs, state entries, the base
optimizer's step); the facade (:class:`~lowrank_opt.LowRankWrapper`) and the distributed
strategies decide what that is.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence, Set
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .layout import (
    BASIS_GRAM_KEY,
    OWN_KEYS,
    SKETCH_KEY,
    STATS_FROM_KEY,
    STEP_KEY,
    basis_gram,
    basis_sketch,
    factor_matrix,
    hidden_wrapper_keys,
)
from .linalg import compute_dtype, needs_pseudo_inverse, pseudo_inverse, transport
from .pairs import LoRAPair, label
from .rule import CalibrationRule, Context, StateKind, Switches
from .schedule import Schedule
from .views import SIDES, FactorView, Side, build_view, other_side, tangent_sq_norm

__all__ = [
    "StepConfig",
    "Group",
    "GroupStore",
    "steps_done",
    "form_groups",
    "stacked",
    "base_products_due",
    "attach_base_products",
    "check_inputs",
    "lift_gradients",
    "clip_coefficient",
    "run_step",
    "balancing_due",
]

State = MutableMapping[Tensor, dict[str, Any]]


@dataclass(frozen=True)
class StepConfig:
    """What the wrapper was built with; the same at every step."""

    rule: CalibrationRule
    schedule: Schedule
    switches: Switches
    full_space_clip: bool
    balance: bool = True


def describe_gradients(
    indices: Sequence[int], pairs: Sequence[LoRAPair], param_groups: Sequence[Mapping[str, Any]], factors: Set[Tensor]
) -> str:
    """Names of the gradients a step checked, by index: the factors of the stepping pairs (a, b), then
    every other parameter with a gradient; the first three, for a message."""
    names = [
        f"factor {side} of {label(pair, i)}"
        for i, pair in enumerate(pairs)
        if pair.a.grad is not None
        for side in SIDES
    ]
    names += [
        f"parameter {j} of param group {g} (shape {tuple(p.shape)})"
        for g, group in enumerate(param_groups)
        for j, p in enumerate(group["params"])
        if p.grad is not None and p not in factors
    ]
    chosen = ", ".join(names[i] for i in indices[:3])
    return chosen + (" and more" if len(indices) > 3 else "")


def _factor(pair: LoRAPair, side: Side) -> Tensor:
    return pair.a if side == "a" else pair.b


@dataclass(eq=False)
class Group:
    """``G`` pairs stepped together: their views, coefficient gradients and this step's counts."""

    indices: list[int]
    pairs: list[LoRAPair]
    active: tuple[Side, ...]
    steps: Tensor  # (G,) the step each member is taking, compute dtype, on the device
    first_step: int  # steps[0], on the host
    balancing: list[bool]  # per member, on the host: whether it is re-balanced after this step
    param_groups: dict[Side, Mapping[str, Any]]
    views: dict[Side, FactorView]
    g_hat: dict[Side, Tensor] = field(default_factory=dict)
    # Per side, where some member's statistics were reset: the steps they have seen, this one included.
    ages: dict[Side, Tensor] = field(default_factory=dict)
    # Per side, (G,) flags: a Gram that may leave a direction unresolved (decided at the host sync).
    deficient: dict[Side, Tensor] = field(default_factory=dict)
    # (G, 2) ``(||W0||^2, <W0, B A>)`` and (G,) flags where they were computed for this step; None: none were.
    base_products: tuple[Tensor, Tensor] | None = None

    def step_of(self, side: Side) -> Tensor:
        """``(G,)``: the step each member's statistics of factor ``side`` are taking (for bias corrections)."""
        return self.ages.get(side, self.steps)

    def params(self, side: Side) -> list[Tensor]:
        return [_factor(pair, side) for pair in self.pairs]

    def grads(self, side: Side) -> list[Tensor]:
        return [_factor(pair, side).grad for pair in self.pairs]  # type: ignore[misc]


def stepping_pairs(pairs: Sequence[LoRAPair]) -> list[int]:
    """Indices of the pairs with gradients; a pair has gradients on both factors or on neither."""
    stepping = []
    for i, pair in enumerate(pairs):
        if pair.a.grad is None and pair.b.grad is None:
            continue
        if pair.a.grad is None or pair.b.grad is None:
            missing = "a" if pair.a.grad is None else "b"
            raise ValueError(f"{label(pair, i)}: factor {missing} has no gradient while its partner has one")
        for side in SIDES:
            factor = _factor(pair, side)
            if factor.grad.shape != factor.shape:  # type: ignore[union-attr]
                raise ValueError(
                    f"{label(pair, i)}: gradient of factor {side} is {tuple(factor.grad.shape)}, "  # type: ignore[union-attr]
                    f"expected {tuple(factor.shape)}"
                )
        stepping.append(i)
    return stepping


def steps_done(pairs: Sequence[LoRAPair], indices: Sequence[int], state: State) -> dict[int, int]:
    """The step counters of the pairs ``indices``, read with one transfer."""
    if not indices:
        return {}
    return dict(zip(indices, torch.stack([state[pairs[i].a][STEP_KEY] for i in indices]).tolist()))


def form_groups(
    pairs: Sequence[LoRAPair],
    done: Mapping[int, int],
    param_group_of: Mapping[Tensor, Mapping[str, Any]],
    config: StepConfig,
    state: State,
) -> list[Group]:
    """Group the pairs of ``done`` (pair index -> steps taken) and build their views.

    The coefficient gradients come later (:func:`lift_gradients`), once :func:`check_inputs` has
    chosen each side's inverse: each gradient is lifted once, and a caller may free it right after."""
    buckets: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
    for i, steps in done.items():
        pair = pairs[i]
        key = (
            config.schedule.active(steps),
            pair.full_shape,
            pair.rank,
            pair.a.dtype,
            pair.b.dtype,
            pair.a.device,
            id(param_group_of[pair.a]),
            id(param_group_of[pair.b]),
        )
        buckets.setdefault(key, []).append((i, steps + 1))
    groups = []
    for key, members in buckets.items():
        chosen = [pairs[i] for i, _ in members]
        # The moving factor is copied (the move needs its old value); the one that stays is read in place.
        a = (torch.stack if "a" in key[0] else stacked)([pair.matrix_a(pair.a) for pair in chosen])  # (G, r, n)
        b = (torch.stack if "b" in key[0] else stacked)([pair.matrix_b(pair.b) for pair in chosen])  # (G, m, r)
        cd = compute_dtype(a.dtype)
        a, b = a.to(cd), b.to(cd)
        scale = torch.tensor([pair.scale for pair in chosen], dtype=cd, device=a.device)[:, None, None]
        group = Group(
            indices=[i for i, _ in members],
            pairs=chosen,
            active=key[0],
            steps=torch.tensor([s for _, s in members], dtype=cd, device=a.device),
            first_step=members[0][1],
            balancing=[config.balance and balancing_due(step) for _, step in members],
            param_groups={"a": param_group_of[chosen[0].a], "b": param_group_of[chosen[0].b]},
            views={side: build_view(side, chosen, a, b, scale) for side in SIDES},
        )
        for side in SIDES:
            group.deficient[side] = needs_pseudo_inverse(group.views[side].gram, group.views[side].inverse)
            _age(group, side, state)
        groups.append(group)
    return groups


def stacked(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.stack(tensors)`` for a step that only reads it: a view when the tensors already
    lie evenly spaced in one storage (one tensor; a strategy's gathered copies), else a copy."""
    first = tensors[0]
    if len(tensors) == 1:
        return first.unsqueeze(0)
    gap = tensors[1].storage_offset() - first.storage_offset()
    storage = first.untyped_storage().data_ptr()
    if gap >= first.numel() and first.is_contiguous():
        if all(
            t.untyped_storage().data_ptr() == storage
            and t.shape == first.shape
            and t.stride() == first.stride()
            and t.storage_offset() == first.storage_offset() + k * gap
            for k, t in enumerate(tensors)
        ):
            return first.as_strided((len(tensors), *first.shape), (gap, *first.stride()), first.storage_offset())
    return torch.stack(list(tensors))


def _age(group: Group, side: Side, state: State) -> None:
    """Record in ``group.ages`` the steps seen by statistics that were reset (none: nothing to do)."""
    entries = [state[p] for p in group.params(side)]
    if any(STATS_FROM_KEY in entry for entry in entries):
        reset_at = [int(entry[STATS_FROM_KEY]) if STATS_FROM_KEY in entry else 0 for entry in entries]
        group.ages[side] = group.steps - torch.tensor(reset_at, dtype=group.steps.dtype, device=group.steps.device)


def _lift_gradients(group: Group, side: Side, config: StepConfig) -> None:
    """``g_hat`` of factor ``side`` of every member, from its gradient and current view."""
    view = group.views[side]
    grad = torch.stack([factor_matrix(pair, side, g) for pair, g in zip(group.pairs, group.grads(side))])
    group.g_hat[side] = view.rescale(grad) if config.switches.rescale_grad else view.canonical(grad).to(view.gram.dtype)


def lift_gradients(
    groups: Sequence[Group], config: StepConfig, release: Callable[[list[Tensor]], None] | None = None
) -> None:
    """Step 3's ``g_hat`` of both factors of every group, after :func:`check_inputs`; ``release``
    is handed each group's factors as soon as their gradients are lifted (a strategy frees its
    copies of them there)."""
    for group in groups:
        for side in SIDES:
            _lift_gradients(group, side, config)
        if release is not None:
            release([p for side in SIDES for p in group.params(side)])


def _resolve_rank(group: Group, side: Side) -> None:
    """Give factor ``side`` the minimum-norm inverse of its Grams (some member's basis may be
    numerically rank-deficient)."""
    view = group.views[side]
    group.views[side] = replace(view, inverse=pseudo_inverse(view.gram))


class GroupStore:
    """Stacked ``(G, ...)`` statistics whose rows are the state entries themselves.

    The engine reads a group's statistic as one tensor and updates it in place. When the entries
    are still the rows this store made (same members, nothing loaded or replaced since), that
    costs nothing; otherwise the entries are stacked once and replaced by rows of the new tensor.
    The store is derived data, never saved: ``state`` stays the one source of truth, one entry per
    parameter. :meth:`end_step` forgets the groups a step did not use.
    """

    def __init__(self, state: State) -> None:
        self.state = state
        self._rows: dict[tuple[tuple[int, ...], str], tuple[Tensor, list[Tensor]]] = {}
        self._used: set[tuple[tuple[int, ...], str]] = set()

    def stacked(self, params: Sequence[Tensor], key: str) -> Tensor:
        """``key`` of every parameter of ``params``, stacked; its rows are the state entries."""
        ident = (tuple(map(id, params)), key)
        entries = [self.state[p][key] for p in params]
        self._used.add(ident)
        cached = self._rows.get(ident)
        if cached is not None and all(e is row for e, row in zip(entries, cached[1])):
            return cached[0]
        stacked = torch.stack(entries)
        rows = list(stacked.unbind(0))
        for p, row in zip(params, rows):
            self.state[p][key] = row
        self._rows[ident] = (stacked, rows)
        return stacked

    def statistics(self, params: Sequence[Tensor], keys: Sequence[str]) -> dict[str, Tensor]:
        """Every key of ``keys`` that the parameters hold, stacked."""
        return {key: self.stacked(params, key) for key in keys if key in self.state[params[0]]}

    def end_step(self) -> None:
        self._rows = {ident: rows for ident, rows in self._rows.items() if ident in self._used}
        self._used = set()


def finite_flags(grads: Sequence[Tensor]) -> Tensor:
    """Whether each gradient is finite everywhere, as one bool tensor ``(len(grads),)``.

    A norm is finite exactly when every entry is: one foreach kernel for all plain tensors; tensor
    subclasses (a strategy's shards) are checked one by one."""
    if not grads:
        return torch.ones(0, dtype=torch.bool)
    is_plain = [type(g) is Tensor or isinstance(g, torch.nn.Parameter) for g in grads]
    plain = [i for i, yes in enumerate(is_plain) if yes]
    device = grads[0].device
    flags = torch.ones(len(grads), dtype=torch.bool, device=device)
    if plain:
        norms = torch._foreach_norm([grads[i] for i in plain])
        flags[plain] = torch.isfinite(torch.stack([n.to(device) for n in norms]))
    for i, (g, yes) in enumerate(zip(grads, is_plain)):
        if not yes:
            flags[i] = torch.isfinite(g).all().to(device)
    return flags


def check_inputs(groups: Sequence[Group], grad_flags: Tensor, store: GroupStore, config: StepConfig) -> list[int]:
    """One host sync: every gradient finite, the factors as this optimizer left them, and which
    bases need the minimum-norm inverse. Returns the indices of the non-finite gradients.

    ``grad_flags`` (bool, one per gradient of the step) say which gradients are finite. When one
    is not, nothing is changed and its index is returned (the caller raises or skips the step).
    Otherwise: a factor changed outside the optimizer (loaded, merged, edited) leaves its partner's
    statistics in a stale basis; they cannot be re-based without the old factor, so they are reset
    with a warning. A side whose Grams may be numerically rank-deficient gets the pseudo-inverse
    (docs/math.md section 11); every other keeps the cheaper inverse from the damped Cholesky factor.
    """
    flags: list[Tensor] = [grad_flags]
    grads_checked = grad_flags.numel()
    for group in groups:
        for side in SIDES:
            view = group.views[side]
            partner = group.params(other_side(side))
            stored = store.stacked(partner, BASIS_GRAM_KEY)
            info = torch.finfo(view.gram.dtype)
            changed = _drifted(view.gram, stored, info)
            if SKETCH_KEY in store.state[partner[0]]:
                # The partner's coefficients are this side's basis: F^T = C_partner.
                changed |= _drifted(basis_sketch(view.basis.mT), store.stacked(partner, SKETCH_KEY), info)
            flags.append(~changed)
            flags.append(~group.deficient[side])
    host = torch.cat([f.to(flags[0].device, torch.bool) for f in flags]).cpu().tolist()
    bad = [i for i, ok in enumerate(host[:grads_checked]) if not ok]
    if bad:
        return bad
    position = grads_checked
    for group in groups:
        size = len(group.pairs)
        for side in SIDES:
            for member in range(size):
                if not host[position + member]:
                    _reset_after_outside_change(group, member, side, store.state, config.rule)
            if not all(host[position + size : position + 2 * size]):
                _resolve_rank(group, side)
            position += 2 * size
    return []


def _drifted(current: Tensor, stored: Tensor, info: torch.finfo) -> Tensor:
    """Per member (G,): ``current`` differs from ``stored`` beyond rounding."""
    drift = (current - stored).flatten(1).norm(dim=1)
    return drift > 100 * info.eps * stored.flatten(1).norm(dim=1) + info.tiny


def _reset_after_outside_change(group: Group, member: int, side: Side, state: State, rule: CalibrationRule) -> None:
    pair, index = group.pairs[member], group.indices[member]
    partner = other_side(side)
    warnings.warn(
        f"{label(pair, index)}: factor {partner} changed outside the optimizer; the statistics "
        f"of factor {side} were in its old basis and are reset",
        stacklevel=4,
    )
    entry = state[_factor(pair, side)]
    for key, kind in rule.state_kinds().items():
        if kind is not StateKind.FULL_SPACE and isinstance(entry.get(key), Tensor):
            entry[key].zero_()
    # Bias corrections start again: this step is the first these statistics see.
    entry[STATS_FROM_KEY] = torch.tensor(int(group.steps[member]) - 1, dtype=torch.int64)
    _age(group, side, state)
    entry = state[_factor(pair, partner)]
    entry[BASIS_GRAM_KEY].copy_(group.views[side].gram[member])
    if SKETCH_KEY in entry:
        entry[SKETCH_KEY].copy_(basis_sketch(group.views[side].basis[member].mT))


@dataclass
class Snapshot:
    """Copies of what a step may change, taken once its checks passed: if anything raises later
    (a base optimizer's own step, an undeclared state key), :meth:`restore` puts back the factors,
    their statistics and stored Grams, and the other parameters, their gradients and base state.

    A group's factors and statistics are copied as stacked tensors (one copy each), so the cost is
    a few kernels per group and one pass over the state, not a Python loop over tensors."""

    factors: list[tuple[list[Tensor], Tensor]] = field(default_factory=list)  # (parameters, stacked copy)
    stacked: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (stacked statistic, copy)
    tensors: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (tensor, copy)
    entries: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)  # (live, shallow copy)
    absent: list[tuple[MutableMapping[Tensor, Any], Tensor]] = field(default_factory=list)  # (state, parameter)

    @staticmethod
    def take(
        groups: Sequence[Group], store: GroupStore, config: StepConfig, others: Sequence[Tensor], base: Optimizer
    ) -> Snapshot:
        snapshot = Snapshot()
        delegated = config.rule.uses_base_step
        for group in groups:
            for side in SIDES:
                params = group.params(side)
                snapshot.factors.append((params, torch.stack(params)))
                if delegated:
                    stats = _base_statistics(store, params)
                    # The base optimizer may add or replace entries: keep each entry's own objects.
                    snapshot.entries += [(store.state[p], dict(store.state[p])) for p in params]
                else:
                    stats = store.statistics(params, list(config.rule.state_kinds()))
                records = [
                    store.stacked(params, key) for key in (BASIS_GRAM_KEY, SKETCH_KEY) if key in store.state[params[0]]
                ]
                snapshot.stacked += [(t, t.clone()) for t in (*stats.values(), *records)]
        for p in others:
            snapshot.tensors += [(t, t.clone()) for t in ([p.detach()] + ([p.grad] if p.grad is not None else []))]
            entry = base.state.get(p)
            if entry is None:
                snapshot.absent.append((base.state, p))  # a first step would create it
            else:
                saved = {k: v.clone() if isinstance(v, Tensor) else v for k, v in entry.items()}
                snapshot.entries.append((entry, saved))
        return snapshot

    def restore(self) -> None:
        """Every entry as it was (the same tensor objects), then every copied value."""
        for live, saved in self.entries:
            live.clear()
            live.update(saved)
        for state, p in self.absent:
            state.pop(p, None)
        with torch.no_grad():
            for params, copy in self.factors:
                torch._foreach_copy_([p.detach() for p in params], list(copy.unbind(0)))
            for live_tensor, copy in self.stacked + self.tensors:
                live_tensor.copy_(copy)  # a stacked statistic's rows are the state entries


def pair_sq_norms(group: Group, full_space: bool) -> Tensor:
    """Squared gradient norms ``(G,)`` of the members: full-space (what the step sees) or of the raw factors."""
    if not full_space:
        return sum(  # type: ignore[return-value]
            torch.stack(group.grads(side)).float().square().flatten(1).sum(1) for side in SIDES
        )
    if len(group.active) == 2:
        return tangent_sq_norm(group.views["a"], group.g_hat["a"], group.views["b"], group.g_hat["b"])
    side = group.active[0]
    return group.views[side].full_sq_norm(group.g_hat[side])


def clip_coefficient(total: Tensor, max_norm: float) -> Tensor:
    """``min(1, max_norm / (total + 1e-6))``, as :func:`torch.nn.utils.clip_grad_norm_` computes it."""
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def scale_(tensors: Sequence[Tensor], coef: Tensor) -> None:
    """Multiply ``tensors`` in place by the 0-dim ``coef``: one foreach call per device and dtype
    for plain tensors, one call each for tensor subclasses (DTensor shards)."""
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        if type(t) is Tensor or isinstance(t, torch.nn.Parameter):
            buckets.setdefault((t.device, t.dtype), []).append(t)
        else:
            t.mul_(coef.to(device=t.device, dtype=t.dtype))
    for (device, dtype), bucket in buckets.items():
        torch._foreach_mul_(bucket, coef.to(device=device, dtype=dtype))


def _move(group: Group, side: Side, delta: Tensor, store: GroupStore) -> Tensor:
    """``C <- C (1 - lr wd) - Delta`` written into the parameters; returns ``T`` for the partner.

    Both are taken from the factor as stored (rounded to its dtype), which is what the next step
    will see.
    """
    view, params = group.views[side], group.params(side)
    group_hp = group.param_groups[side]
    lr = float(group_hp["lr"])
    decay = lr * float(group_hp.get("weight_decay", 0.0) or 0.0)
    old = view.coeff
    new = (old * (1 - decay) if decay else old) - delta
    targets = [factor_matrix(pair, side, p) for pair, p in zip(group.pairs, params)]
    torch._foreach_copy_(targets, list(view.canonical(new).unbind(0)))
    # Stored exactly when the factor's dtype is the compute dtype; else re-read the rounded values.
    return _record_move(group, side, old, store, new if params[0].dtype == new.dtype else None)


def _record_move(group: Group, side: Side, old: Tensor, store: GroupStore, new: Tensor | None = None) -> Tensor:
    """After factor ``side`` moved from ``old`` to ``new`` (read from the factors when not given):
    record its new Gram ``C_new C_new^T`` (and sketch) for outside-change detection, and return the
    partner's calibration map ``T = Gamma_new^+ C_new C_old^T``."""
    params = group.params(side)
    if new is None:
        stored = torch.stack([factor_matrix(pair, side, p) for pair, p in zip(group.pairs, params)])
        new = group.views[side].canonical(stored).to(old.dtype)
    gram_new = basis_gram(new)
    store.stacked(params, BASIS_GRAM_KEY).copy_(gram_new)
    if SKETCH_KEY in store.state[params[0]]:
        store.stacked(params, SKETCH_KEY).copy_(basis_sketch(new))
    return transport(gram_new, torch.bmm(new, old.mT))  # (r, l) @ (l, r)


def balancing_due(step: int) -> bool:
    """Whether a pair taking its ``step``-th step is re-balanced after it: at steps 1, 2, 4, 8, 16
    and then every 16th, often while the factors' norms change fast from a peft start, rarely
    after (each balancing costs a few kernels). Decided per pair from its own counter, so every
    rank knows which factors a step moved without knowing how the owner grouped them."""
    return (step & (step - 1) == 0 and step <= 16) or step % 16 == 0


def _balance(group: Group, store: GroupStore, stats: Mapping[Side, dict[str, Tensor]], config: StepConfig) -> None:
    """Re-balance every member due (``group.balancing``) as ``(c B, A / c)``: ``s B A`` is unchanged
    (docs/math.md section 11); the others keep ``c = 1``, an exact no-op.

    ``c = 2^round(log2(||A|| / ||B||) / 2)`` brings ``||A|| / ||B||`` within a factor 2 of 1, so
    neither factor drifts large while the other shrinks. A power of two scales exactly in binary
    floating point, and every rule's update is invariant under ``A -> A / c, B -> c B`` with its
    statistics re-based by ``T = c I`` (:meth:`~lowrank_opt.CalibrationRule.rescale`): balancing
    changes no rounding of ``s B A``. A member with a zero factor keeps ``c = 1``.
    """
    matrices = {
        side: [factor_matrix(pair, side, p) for pair, p in zip(group.pairs, group.params(side))] for side in SIDES
    }
    norm_a, norm_b = (torch.stack(torch._foreach_norm(matrices[side])).double() for side in SIDES)
    log_ratio = torch.log2(norm_a / norm_b).mul_(0.5).round_()
    due = torch.tensor(group.balancing, device=norm_a.device)
    c = torch.where(due & (norm_a > 0) & (norm_b > 0), torch.exp2(log_ratio), torch.ones_like(log_ratio))
    factor: dict[Side, Tensor] = {"a": 1 / c, "b": c}
    for side in SIDES:
        params = group.params(side)
        # In place, member by member: no stacked copy of the factors.
        torch._foreach_mul_(matrices[side], list(factor[side].to(params[0].dtype).unbind(0)))
        gram = store.stacked(params, BASIS_GRAM_KEY)
        gram.mul_(factor[side].to(gram.dtype)[:, None, None].square())
        if SKETCH_KEY in store.state[params[0]]:
            sketch = store.stacked(params, SKETCH_KEY)
            sketch.mul_(factor[side].to(sketch.dtype)[:, None])
        ctx = Context.of(group.param_groups[side], group.step_of(side), config.switches)
        config.rule.rescale(stats[side], factor[side], ctx)


def _rebuilt_view(group: Group, side: Side, config: StepConfig) -> None:
    """Factor ``side``'s view and ``g_hat`` over its partner as it is now (after the partner moved).

    Mid-step there is no host sync to tell whether the moved basis is resolved, so the
    minimum-norm inverse is used throughout."""
    a = torch.stack([pair.matrix_a(pair.a) for pair in group.pairs])
    b = torch.stack([pair.matrix_b(pair.b) for pair in group.pairs])
    cd = group.views[side].coeff.dtype
    view = build_view(side, group.pairs, a.to(cd), b.to(cd), group.views[side].scale)
    group.views[side] = replace(view, inverse=pseudo_inverse(view.gram))
    _lift_gradients(group, side, config)


def base_products_due(done: Mapping[int, int], every: int | None) -> list[int]:
    """The pairs of ``done`` (index -> steps taken) whose base products are due at this step:
    steps ``1, 1 + every, 1 + 2 every, ...``; none when ``every`` is None."""
    return [] if every is None else [i for i, steps in done.items() if steps % every == 0]


def attach_base_products(groups: Sequence[Group], due: Sequence[int], products: Mapping[int, Tensor]) -> None:
    """Give each group with members in ``due`` the rows of ``products`` (pair index -> (2,); absent
    for a pair without a base weight) of its members."""
    wanted = set(due)
    for group in groups:
        if wanted.isdisjoint(group.indices):
            continue
        present = [i in products for i in group.indices]
        like = group.views["a"].gram
        rows = [products[i].to(like) if i in products else like.new_zeros(2) for i in group.indices]
        group.base_products = (torch.stack(rows), torch.tensor(present, device=like.device))


def step_group(group: Group, store: GroupStore, config: StepConfig) -> None:
    """Observe both factors, move the active ones, calibrate their partners (all in place)."""
    rule = config.rule
    keys = list(rule.state_kinds())
    ctx = {side: Context.of(group.param_groups[side], group.step_of(side), config.switches) for side in SIDES}
    stats = {side: store.statistics(group.params(side), keys) for side in SIDES}
    if group.base_products is not None:
        for side in SIDES:
            rule.record_base_products(stats[side], *group.base_products, group.views[side], ctx[side])
    if config.schedule.mode == "sequential":
        for side in group.active:  # a, then b over the moved a
            if side != group.active[0]:
                _rebuilt_view(group, side, config)
            rule.observe(stats[side], group.g_hat[side], group.views[side], ctx[side])
            delta = rule.update(stats[side], group.g_hat[side], group.views[side], ctx[side])
            t = _move(group, side, delta, store)
            partner = other_side(side)
            rule.calibrate(stats[partner], t, group.views[partner], ctx[partner])
        if any(group.balancing):
            _balance(group, store, stats, config)
        return
    for side in SIDES:
        rule.observe(stats[side], group.g_hat[side], group.views[side], ctx[side])
    deltas = {side: rule.update(stats[side], group.g_hat[side], group.views[side], ctx[side]) for side in group.active}
    for side in group.active:
        t = _move(group, side, deltas[side], store)
        partner = other_side(side)
        rule.calibrate(stats[partner], t, group.views[partner], ctx[partner])
    if any(group.balancing):
        _balance(group, store, stats, config)


@contextmanager
def _substituted(base: Optimizer, originals: Mapping[Tensor, Tensor], state: State) -> Iterator[None]:
    """The base optimizer sees the working factors in place of its parameters (FSDP2's gathered
    copies): in its param groups, and with the working state entries."""
    if not originals:
        yield
        return
    working = {original: work for work, original in originals.items()}
    saved_params = [group["params"] for group in base.param_groups]
    saved_entries = {original: base.state.pop(original, None) for original in working}
    for group in base.param_groups:
        group["params"] = [working.get(p, p) for p in group["params"]]
    for work in originals:
        base.state[work] = state[work]
    try:
        yield
    finally:
        for work in originals:
            base.state.pop(work, None)
        for group, params in zip(base.param_groups, saved_params):
            group["params"] = params
        for original, entry in saved_entries.items():
            if entry is not None:
                base.state[original] = entry


def _base_step(base: Optimizer) -> None:
    """The base optimizer's own ``step()``, without firing the global optimizer hooks a second time
    (the wrapper's ``step()`` fired them already)."""
    step = type(base).step
    getattr(step, "__wrapped__", step)(base)


def _base_statistics(store: GroupStore, params: Sequence[Tensor]) -> dict[str, Tensor]:
    """Every tensor the base optimizer keeps for ``params`` (the wrapper's own keys aside), stacked."""
    entry = store.state[params[0]]
    keys = [k for k, v in entry.items() if isinstance(v, Tensor) and k not in OWN_KEYS]
    return store.statistics(params, keys)


def step_delegated(
    groups: Sequence[Group],
    base: Optimizer,
    store: GroupStore,
    originals: Mapping[Tensor, Tensor],
    factors: Sequence[Tensor],
    config: StepConfig,
) -> None:
    """The base optimizer's ``step()`` moves the factors of delegating rules on ``g_hat``, and steps
    every other parameter, in one call (docs/math.md section 9).

    Both factors get ``g_hat`` (the base's statistics see every gradient, docs/math.md section 4);
    the inactive factor is put back afterwards, the active one keeps its move, and its partner's
    statistics are calibrated by declaration.
    """
    state = store.state
    stashed = {factor: factor.grad for factor in factors}
    for factor in factors:
        factor.grad = None
    kept: list[tuple[list[Tensor], Tensor]] = []
    entries = []
    for group in groups:
        for side in SIDES:
            params = group.params(side)
            matrices = list(group.views[side].canonical(group.g_hat[side]).unbind(0))
            for p, g in zip(params, matrices):
                p.grad = g.to(p.dtype).reshape(p.shape)
            if side not in group.active:
                kept.append((params, torch.stack(params)))
            entries += [state[p] for p in params]
    try:
        with _substituted(base, originals, state), hidden_wrapper_keys(entries):
            _base_step(base)
    finally:
        for factor, grad in stashed.items():
            factor.grad = grad
    for params, values in kept:
        torch._foreach_copy_(params, list(values.unbind(0)))
    for group in groups:
        ctx = {side: Context.of(group.param_groups[side], group.step_of(side), config.switches) for side in SIDES}
        for side in group.active:
            t = _record_move(group, side, group.views[side].coeff, store)
            partner = other_side(side)
            partner_params = group.params(partner)
            config.rule.calibrate(_base_statistics(store, partner_params), t, group.views[partner], ctx[partner])
        if any(group.balancing):
            _balance(group, store, {side: _base_statistics(store, group.params(side)) for side in SIDES}, config)


def run_step(
    groups: Sequence[Group],
    base: Optimizer,
    store: GroupStore,
    originals: Mapping[Tensor, Tensor],
    factors: Sequence[Tensor],
    others_have_grads: bool,
    config: StepConfig,
) -> None:
    """Steps 5-7 for checked, clipped groups: the rule (or the base optimizer) moves the factors,
    and the base optimizer steps every other parameter."""
    if config.rule.uses_base_step:
        step_delegated(groups, base, store, originals, factors, config)
        return
    for group in groups:
        step_group(group, store, config)
    if others_have_grads:
        stashed = {factor: factor.grad for factor in factors}
        for factor in factors:
            factor.grad = None
        try:
            _base_step(base)
        finally:
            for factor, grad in stashed.items():
                factor.grad = grad
