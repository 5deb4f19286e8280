"""``LowRankWrapper``: any torch optimizer around the LoRA pairs of a model (docs/math.md sections 2-4).

The wrapper is a facade: it checks its arguments, owns the shared param groups and state, and
hands each step to :mod:`lowrank_opt.engine`, the state layout to :mod:`lowrank_opt.layout` and
the split of work between ranks to a :mod:`lowrank_opt.distributed` strategy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import closing
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .advice import advise
from .distributed import (
    DistributedStrategy,
    Materialised,
    default_strategy,
    refuse_unsupported_wrappers,
)
from .engine import (
    Group,
    GroupStore,
    Snapshot,
    StepConfig,
    attach_base_products,
    balancing_due,
    base_products_due,
    check_inputs,
    clip_coefficient,
    describe_gradients,
    form_groups,
    lift_gradients,
    pair_sq_norms,
    run_step,
    scale_,
    stepping_pairs,
    steps_done,
)
from .layout import (
    IDENTITY_KEY,
    STATE_VERSION,
    STEP_KEY,
    VERSION_KEY,
    check_factors,
    create_state,
    ensure_sketches,
    plan_load,
    without_sketches,
)
from .pairs import LoRAPair, find_lora_pairs, new_pairs_among
from .registry import resolve_rule
from .rule import CalibrationRule, Switches
from .schedule import Schedule
from .views import SIDES

__all__ = ["LowRankWrapper", "STATE_VERSION"]


class LowRankWrapper(Optimizer):
    r"""Lift an already-built optimizer to the LoRA pairs of a model.

    For every pair ``W = W0 + s B A`` the active factor ``C`` (over the frozen basis ``F``) moves as
    full fine-tuning with the base optimizer would move ``W``, restricted to the span of ``F``:

    .. math::
        \hat g = \Gamma^{-1} \tfrac{\partial L}{\partial C} / s^2, \qquad
        U = \mathrm{rule}(s F \hat g,\ \text{statistics}), \qquad
        C \leftarrow C (1 - \gamma \lambda) + \Gamma^{-1} F^\top U / s

    with ``Gamma = F^T F``. Statistics of both factors are updated every step and re-based when the
    other factor moves. Parameters that are not LoRA factors are stepped by the base optimizer.
    Pairs of equal shape are stepped together as one batched group (:mod:`lowrank_opt.engine`).

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
            steps), ``"both"`` (both factors every step, from the same gradient) or
            ``"sequential"`` (both every step, ``a`` then ``b`` over the moved ``a``).
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
        unsupported: a trainable peft adapter that is not a product ``s B A``: ``"error"`` (name it)
            or ``"base"`` (leave its parameters to the base optimizer, with one warning).
        advice: warn (:class:`~lowrank_opt.LowRankAdviceWarning`, once each) about settings measured
            to work badly, such as Adafactor's default learning rate under ``loft_adafactor``.
        nonfinite: a step with a non-finite gradient ``"raise"``\ s ``ValueError`` naming it, or is
            ``"skip"``\ ped whole (counted in ``skipped_steps``, with a warning); either way nothing
            changes, on every rank.
        transactional: copy what a step may change once its checks pass (the factors, their
            statistics, the other parameters with their gradients and state), so that a step that
            raises changes nothing. The copy is one pass over the state and, during the step, as
            much memory again (LoFT-AdamW ``exact`` at r = 64: 67 MiB per 4096 x 4096 pair);
            ``False`` saves both and leaves a step that raises half done. ``None`` (default): the
            strategy's :attr:`~lowrank_opt.distributed.DistributedStrategy.restorable`, True for
            the replicated mode; False for the sharded modes, whose step goes on into collectives
            after the point where a rank could raise, so that its peers are left waiting in one
            whatever the raising rank restores.
        balance: after every step, rescale each pair to ``(c B, A / c)`` with ``c`` a power of two
            that keeps ``||A|| / ||B||`` within a factor 2 of 1: ``s B A`` and its trajectory are
            unchanged, and neither factor drifts large while the other shrinks.

    After a step that clipped, or a call of :meth:`clip_grad_norm_`, ``last_grad_norm`` holds the
    total full-space gradient norm (0-dim float64 tensor) for logging.

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
        schedule: Literal["alternate", "both", "sequential"] = "alternate",
        alternate_every: int = 1,
        rescale_grad: bool = True,
        calibrate_first_moment: bool = True,
        calibrate_second_moment: bool = True,
        project_update: bool = True,
        max_grad_norm: float | None = None,
        full_space_clip: bool = True,
        distributed: DistributedStrategy | None = None,
        unsupported: Literal["error", "base"] = "error",
        advice: bool = True,
        balance: bool = True,
        nonfinite: Literal["raise", "skip"] = "raise",
        transactional: bool | None = None,
    ) -> None:
        if not isinstance(base_optimizer, Optimizer) or isinstance(base_optimizer, LowRankWrapper):
            raise ValueError(
                f"base_optimizer must be a built torch.optim.Optimizer, got {type(base_optimizer).__name__}"
            )
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and 0 < max_grad_norm < math.inf):
            raise ValueError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if transactional not in (None, True, False):
            raise ValueError(f"transactional must be True, False or None, got {transactional!r}")
        if distributed is not None and not isinstance(distributed, DistributedStrategy):
            raise ValueError(f"distributed must be a lowrank_opt.distributed strategy or None, got {distributed!r}")
        refuse_unsupported_wrappers(model_or_pairs)
        pairs = find_lora_pairs(model_or_pairs, unsupported=unsupported)
        switches = Switches(rescale_grad, calibrate_first_moment, calibrate_second_moment, project_update)
        config = StepConfig(
            resolve_rule(rule, base_optimizer, rule_options),
            Schedule(schedule, alternate_every),
            switches,
            full_space_clip,
            balance,
        )
        if config.rule.uses_base_step and schedule == "sequential":
            raise ValueError(
                f"schedule='sequential' needs a rule with its own update; {config.rule.name!r} lets the base "
                "optimizer move both factors in one step()"
            )
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        # One set of param groups and one state, shared with the base optimizer.
        self.base, self.param_groups, self.state = base_optimizer, base_optimizer.param_groups, base_optimizer.state
        self.pairs, self.config, self.max_grad_norm = pairs, config, max_grad_norm
        self.last_grad_norm: Tensor | None = None
        self.nonfinite, self.skipped_steps = nonfinite, 0
        self._store: GroupStore | None = None
        group_of = self._param_group_of()
        check_factors(pairs, group_of)
        self._factors = {factor for pair in pairs for factor in (pair.a, pair.b)}
        factor_groups = {id(group_of[f]): group_of[f] for f in self._factors}
        config.rule.check(base_optimizer, list(factor_groups.values()), switches)
        self.distributed = distributed if distributed is not None else default_strategy(pairs)
        self.distributed.setup(pairs, config.rule, group_of)
        self.distributed.attach(self)
        self.transactional = self.distributed.restorable if transactional is None else transactional
        self._model = model_or_pairs if isinstance(model_or_pairs, nn.Module) else None
        self._unsupported = unsupported
        advise(base_optimizer, config.rule.name, rule_options or {}, pairs, set(), enabled=advice)
        self._create_state()

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the derived store. The base optimizer travels as its class and attributes
        without the shared state: its own ``__setstate__`` (Adam's) would expect its keys in the
        factors' entries, which hold the rule's statistics instead."""
        base_attributes = {k: v for k, v in self.base.__dict__.items() if k not in ("state", "param_groups")}
        return {**self.__dict__, "_store": None, "base": (type(self.base), base_attributes)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        base_class, base_attributes = state["base"]
        base = base_class.__new__(base_class)
        base.__dict__.update(base_attributes)
        super().__setstate__({**state, "base": base})
        base.state, base.param_groups = self.state, self.param_groups

    @property
    def rule(self) -> CalibrationRule:
        return self.config.rule

    @property
    def schedule(self) -> Schedule:
        return self.config.schedule

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group to the base optimizer; LoRA factors in it are lifted like the others.

        With a model, its LoRA pairs are looked for again and every new pair whose factors are
        both in the new group joins the wrapper, its state created at once. Only the replicated
        mode can take new pairs (the sharded ones assigned their work at construction); a pair
        with one factor here and one elsewhere is refused.
        """
        if "base" not in self.__dict__:  # Optimizer.__init__ registering the base's own groups
            super().add_param_group(param_group)
            return
        params = param_group["params"]
        added = [params] if isinstance(params, Tensor) else list(params)
        fresh = [] if self._model is None else new_pairs_among(self._model, added, self._factors, self._unsupported)
        if fresh and not self.distributed.replicated:
            raise ValueError(
                f"{self.distributed!r} assigned its work when the wrapper was built; new LoRA pairs "
                f"({', '.join(p.name for p in fresh)}) need a new wrapper"
            )
        self.base.add_param_group(param_group)
        if not fresh:
            return
        try:
            self.rule.check(self.base, [self.param_groups[-1]], self.config.switches)
        except ValueError:
            self.param_groups.pop()  # all or nothing: the group leaves with its refusal
            raise
        self.pairs = [*self.pairs, *fresh]
        self._factors |= {f for pair in fresh for f in (pair.a, pair.b)}
        self._create_state()  # entries that exist already are left as they are

    def _create_state(self) -> None:
        """Every factor's state entry, created now (those that exist are left as they are)."""
        with self._materialised() as work:
            owns = self.distributed.owns
            create_state(work.pairs, work.state, self.rule, self._working_groups(work), self.config.switches, owns)

    def __repr__(self) -> str:
        return f"LowRankWrapper({type(self.base).__name__}, rule={self.rule!r}, pairs={len(self.pairs)}, schedule={self.schedule})"

    def _param_group_of(self) -> dict[Tensor, dict[str, Any]]:
        return {p: group for group in self.param_groups for p in group["params"]}

    def _materialised(self) -> Any:
        return self.distributed.materialised(self.pairs, self.state, self.rule.reads_base_weight)

    def _working_groups(self, work: Materialised) -> dict[Tensor, dict[str, Any]]:
        group_of = self._param_group_of()
        return {f: group_of[work.originals.get(f, f)] for pair in work.pairs for f in (pair.a, pair.b)}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict, with the factors' statistics and counters, versioned."""
        state_dict = without_sketches(super().state_dict())
        state_dict[VERSION_KEY] = STATE_VERSION
        state_dict[IDENTITY_KEY] = self._identity
        return state_dict

    @property
    def _identity(self) -> str:
        return f"{self.rule.name}/{type(self.base).__name__}"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`; checked whole before anything changes."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = pre_hook(self, state_dict) or state_dict
        plan = plan_load(state_dict, self.param_groups, self.pairs, self.state, self.distributed.owns, self._identity)
        self.base.load_state_dict(plan.base_state_dict)
        self.param_groups, self.state = self.base.param_groups, self.base.state
        self.state.update(plan.factor_entries)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # ------------------------------------------------------------------ step
    def _done(self, work: Materialised, known: Mapping[int, int] | None = None) -> dict[int, int]:
        """Steps taken by every pair the piece ``work`` covers, from ``known`` (read at the start
        of the step: a bucket moves only its own pairs' counters) or read now."""
        covered = stepping_pairs(work.pairs) if work.indices is None else work.indices
        if known is not None:
            return {i: known[i] for i in covered}
        return steps_done(work.pairs, covered, work.state)

    def _groups(self, work: Materialised, done: dict[int, int]) -> list[Group]:
        """The groups of the pairs of ``done`` that this rank owns (views built, gradients not lifted yet)."""
        owned = {i: steps for i, steps in done.items() if self.distributed.owns(i)}
        groups = form_groups(work.pairs, owned, self._working_groups(work), self.config, work.state)
        # Hyperparameters may change after construction (a scheduler, a user): refuse what the rule
        # cannot honour before anything moves.
        for param_group in {id(pg): pg for g in groups for pg in g.param_groups.values()}.values():
            self.rule.check_group(param_group)
        return groups

    def _others(self) -> list[Tensor]:
        """The parameters that are not LoRA factors and have gradients."""
        return [
            p for group in self.param_groups for p in group["params"] if p.grad is not None and p not in self._factors
        ]

    def _local_sq_norm(self, groups: list[Group]) -> Tensor:
        """Squared full-space norms of this rank's groups, summed (0-dim float64)."""
        local = torch.zeros((), dtype=torch.float64, device=self.pairs[0].a.device)
        for group in groups:
            local += pair_sq_norms(group, self.config.full_space_clip).to(torch.float64).sum()
        return local

    def _total_norm(self, local: Tensor, others: list[Tensor]) -> Tensor:
        """The total gradient norm from this rank's pairs' squares ``local`` and the other gradients."""
        total = self.distributed.reduce_pair_squares(local) + self.distributed.squared_norm(others).to(local.device)
        self.last_grad_norm = total.sqrt()
        return self.last_grad_norm

    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip the total full-space gradient norm of every parameter to ``max_norm``.

        Like :func:`torch.nn.utils.clip_grad_norm_` (call it between ``backward()`` and ``step()``),
        but a pair contributes the norm of its full-space gradient ``||s F g_hat||``, never of its
        raw factor gradients. Scales every ``.grad`` in place and returns the total norm before
        clipping; ``max_norm = inf`` only measures.
        """
        if not (isinstance(max_norm, (int, float)) and max_norm > 0):
            raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
        with torch.no_grad(), self._materialised() as work:
            done = self._done(work)
            groups = self._groups(work, done)
            lift_gradients(groups, self.config)
            others = [p.grad for p in self._others() if p.grad is not None]
            total = self._total_norm(self._local_sq_norm(groups), others)
            if max_norm < math.inf:
                factor_grads = [f.grad for i in done for f in (work.pairs[i].a, work.pairs[i].b)]
                scale_(factor_grads + others, clip_coefficient(total, max_norm))  # type: ignore[arg-type]
        return total

    def pair_grad_norms(self) -> list[Tensor | None]:
        """The full-space gradient norm of every pair, in the order of ``pairs`` (``None`` for a pair
        without gradients, or one another rank steps): what clipping would count for it, from the
        current ``.grad``, without changing anything. For logging which layers drive the total."""
        norms: list[Tensor | None] = [None] * len(self.pairs)
        with torch.no_grad(), self._materialised() as work:
            groups = self._groups(work, self._done(work))
            lift_gradients(groups, self.config)
            for group in groups:
                for i, value in zip(group.indices, pair_sq_norms(group, self.config.full_space_clip).sqrt()):
                    norms[i] = value
        return norms

    @torch.compiler.disable  # eager under torch.compile: the step's Python decides the grouping
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimizer step for every pair (through the rule) and every other parameter (through the base)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepping = stepping_pairs(self.pairs)
        other_params = self._others()
        others = [p.grad for p in other_params if p.grad is not None]
        factor_grads = [f.grad for i in stepping for f in (self.pairs[i].a, self.pairs[i].b)]
        # Agreed over ranks now, read at the first check (one host sync with the Gram checks).
        unchecked = self.distributed.finite_flags(factor_grads + others)  # type: ignore[arg-type]
        done_before = steps_done(self.pairs, stepping, self.state)  # one host transfer for the whole step
        with_bases = self.rule.reads_base_weight
        # A snapshot, or a base optimizer that moves the factors in its one step(), needs the whole
        # step at once; otherwise the strategy may cut it into buckets computed one after another.
        whole_step = self.transactional or self.rule.uses_base_step
        buckets = [stepping] if whole_step else self.distributed.buckets(self.pairs, stepping, with_bases) or [[]]
        # The gradients are not read again once lifted, unless the sequential schedule lifts them
        # again mid-step or the clip measures them raw.
        raw_clip = self.max_grad_norm is not None and not self.config.full_space_clip
        release = None if self.schedule.mode == "sequential" or raw_clip else self.distributed.release_gradients
        coef = None
        if self.max_grad_norm is not None and len(buckets) > 1:  # the clip needs every pair's norm first
            local = torch.zeros((), dtype=torch.float64, device=self.pairs[0].a.device)
            with closing(self.distributed.bucketed(self.pairs, self.state, with_bases, buckets)) as pieces:
                for work in pieces:
                    groups, bad = self._checked(work, self._done(work, done_before), unchecked, release)
                    unchecked = unchecked[:0]
                    if bad:
                        return self._refuse(bad, loss)
                    local += self._local_sq_norm(groups)
            coef = clip_coefficient(self._total_norm(local, others), self.max_grad_norm)
            scale_(others, coef)
        # From the factors before the step, for every bucket at once: no bucket is whole meanwhile.
        every = self.rule.base_products_every
        due = base_products_due(done_before, every) if every is not None else []
        products = self.distributed.base_products(self.pairs, due) if due else {}
        with closing(self.distributed.bucketed(self.pairs, self.state, with_bases, buckets)) as pieces:
            for k, work in enumerate(pieces):
                done = self._done(work, done_before)
                groups, bad = self._checked(work, done, unchecked, release)
                unchecked = unchecked[:0]
                if bad:
                    return self._refuse(bad, loss)
                store = self._store_for(work.state)  # rows of the stored statistics, reused across steps
                if due:
                    attach_base_products(groups, due, products)
                snapshot = (
                    Snapshot.take(groups, store, self.config, other_params, self.base) if self.transactional else None
                )
                try:
                    if self.max_grad_norm is not None:
                        if coef is None:  # one bucket: its groups are every pair this rank steps
                            coef = clip_coefficient(
                                self._total_norm(self._local_sq_norm(groups), others), self.max_grad_norm
                            )
                            scale_(others, coef)
                        scale_([g for group in groups for g in group.g_hat.values()], coef)
                    # The base optimizer must not see the factors (its own or gathered copies) unless a rule delegates.
                    factors = list(self._factors | {f for pair in work.pairs for f in (pair.a, pair.b)})
                    last = k == len(buckets) - 1  # the other parameters move once, with the last bucket
                    run_step(groups, self.base, store, work.originals, factors, last and bool(others), self.config)
                except BaseException:
                    if snapshot is not None:
                        snapshot.restore()  # all or nothing: the step that raised changed nothing
                    raise
                del groups, snapshot  # their stacked copies go before the moved factors travel
                self._advance(work, done)
                if last:
                    store.end_step()
        return loss

    def _checked(
        self,
        work: Materialised,
        done: dict[int, int],
        unchecked: Tensor,
        release: Callable[[list[Tensor]], None] | None,
    ) -> tuple[list[Group], list[int]]:
        """The groups of the pairs of ``done`` in ``work``, checked with the finiteness verdict
        ``unchecked`` (:func:`check_inputs`: one host sync), then, if every gradient is finite,
        lifted; with the indices of the non-finite gradients (none: the step may go on)."""
        groups = self._groups(work, done)
        if self.distributed.replicated:  # every rank holds every factor: sketches are cheap
            ensure_sketches(work.pairs, work.state)
        self.distributed.settle()  # the finiteness verdict and base products, agreed meanwhile
        bad = check_inputs(groups, unchecked, self._store_for(work.state), self.config)
        if not bad:
            lift_gradients(groups, self.config, release)
        return groups, bad

    def _refuse(self, bad: list[int], loss: float | None) -> float | None:
        """A step with non-finite gradients (indices ``bad``): raise, or count it skipped."""
        names = describe_gradients(bad, self.pairs, self.param_groups, self._factors)
        if self.nonfinite == "raise":
            raise ValueError(f"non-finite gradient in {names}; no state was changed")
        self.skipped_steps += 1
        warnings.warn(f"non-finite gradient in {names}: step skipped ({self.skipped_steps} so far)", stacklevel=3)
        return loss

    def _store_for(self, state: Any) -> GroupStore:
        """The store of stacked statistics, rebuilt when the state was replaced (a load)."""
        if self._store is None or self._store.state is not state:
            self._store = GroupStore(state)
        return self._store

    def _advance(self, work: Materialised, done: dict[int, int]) -> None:
        """Count the step on every stepping pair and give every rank the factors that moved."""
        stepping = list(done)
        # A pair re-balanced after this step (its step steps + 1) moved both factors, so both travel.
        moved = [
            (i, side)
            for i, steps in done.items()
            for side in (SIDES if self.config.balance and balancing_due(steps + 1) else self.schedule.active(steps))
        ]
        if stepping:
            counters = [work.state[f][STEP_KEY] for i in stepping for f in (work.pairs[i].a, work.pairs[i].b)]
            torch._foreach_add_(counters, 1)
        self.distributed.publish([(i, getattr(work.pairs[i], side)) for i, side in moved])
        self.distributed.record_moved(work.pairs, moved, work.state)
