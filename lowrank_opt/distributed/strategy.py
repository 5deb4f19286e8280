"""The contract between :class:`~lowrank_opt.LowRankWrapper` and a distributed strategy.

The wrapper computes every step as in a single process; a strategy is given data at a few named
points and gives data back. It never changes the wrapper's pairs or param groups:

* :meth:`DistributedStrategy.setup`: once, with the pairs, the rule and each factor's param group
  (assign work, check inputs);
* :meth:`DistributedStrategy.owns`: whether this rank keeps the statistics of a pair and steps it;
* :meth:`DistributedStrategy.materialised`: a context that yields the pairs as whole, plain
  tensors with their gradients and state entries (:class:`Materialised`), and writes back on exit
  what the step changed (FSDP2 gathers and re-shards there; the other modes hand over their own
  tensors);
* :meth:`DistributedStrategy.base_products`: the frozen weights' products a rule asked for
  (``base_products_every``), never gathering a base weight;
* :meth:`DistributedStrategy.finite_flags`, :meth:`DistributedStrategy.reduce_pair_squares` and
  :meth:`DistributedStrategy.squared_norm`: the finiteness check and the clipping norms, agreed
  over ranks where the work or the tensors are split;
* :meth:`DistributedStrategy.publish` and :meth:`DistributedStrategy.record_moved`: after the
  step, every rank gets the factors that moved and records their new basis Grams.

Ranks must agree on what they do. Every strategy with a process group checks at construction
that all ranks hold the same pairs, rule and strategy (:func:`check_ranks_agree`: one all-gather
of a 16-byte digest), and agrees the finiteness verdict over ranks (:func:`agree_flags`: one
all-reduce), so a non-finite gradient on one rank makes every rank raise, or skip, together.

The default, :class:`Replicated`, hands over its own tensors: a single process, or DDP, where
every rank holds the same gradients and computes the same step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..engine import finite_flags
from ..layout import BASIS_GRAM_KEY, SKETCH_KEY, WRAPPER_KEYS, basis_gram, basis_sketch, coefficients_of
from ..pairs import LoRAPair, label
from ..rule import CalibrationRule
from ..views import Side

T = TypeVar("T")

__all__ = [
    "DistributedStrategy",
    "Materialised",
    "Replicated",
    "agree_flags",
    "check_ranks_agree",
    "comm_device",
    "fill_buckets",
    "owner_state_dict_hooks",
    "refuse_unsupported_wrappers",
    "state_bytes",
]


@dataclass(frozen=True)
class Materialised:
    """The pairs as one step sees them.

    Attributes:
        pairs: the pairs, in the wrapper's order, with whole plain factors (and a whole base
            weight where asked) that carry their gradients.
        state: the state entry of every factor of ``pairs``, keyed by those factors.
        originals: working factor -> the optimizer's parameter, where the two differ.
        indices: the pairs this piece of a step covers (:meth:`DistributedStrategy.bucketed`);
            ``None``: every pair with gradients.
    """

    pairs: list[LoRAPair]
    state: MutableMapping[Tensor, dict[str, Any]]
    originals: dict[Tensor, Tensor] = field(default_factory=dict)
    indices: list[int] | None = None


class DistributedStrategy:
    """Base class of the strategies; on its own it is the replicated mode.

    Attributes:
        replicated: every rank holds every pair whole and steps it, so the wrapper keeps in-memory
            sketches of the factors (cheap here) and lets new pairs join (``add_param_group``);
            a strategy that assigned its work at construction cannot take them.
        restorable: a rank that raises inside its step can restore what it changed and leave its
            peers able to go on: nothing after that point waits for it in a collective. The
            wrapper's ``transactional=None`` follows it.
    """

    replicated: bool = True
    restorable: bool = True

    def setup(
        self, pairs: Sequence[LoRAPair], rule: CalibrationRule, param_group_of: Mapping[Tensor, Mapping[str, Any]]
    ) -> None:
        """Called once by the wrapper, after it found its pairs and rule, before any state exists."""

    def owns(self, index: int) -> bool:
        """Whether this rank holds the statistics of pair ``index`` and computes its step."""
        return True

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once by the wrapper after :meth:`setup`, with the wrapper itself: a strategy may
        register state-dict hooks on it (:func:`owner_state_dict_hooks`)."""

    @contextmanager
    def materialised(
        self, pairs: Sequence[LoRAPair], state: MutableMapping[Tensor, dict[str, Any]], with_bases: bool
    ) -> Iterator[Materialised]:
        """Around state creation, clipping and every step: the pairs as whole, plain tensors.

        ``with_bases``: the rule reads the frozen base weights, so they must be whole too."""
        yield Materialised(list(pairs), state)

    def buckets(self, pairs: Sequence[LoRAPair], stepping: Sequence[int], with_bases: bool) -> list[list[int]]:
        """The stepping pairs cut into the pieces a step computes one after another (the same on
        every rank), for a step that need not hold them all at once. Here: one piece."""
        return [list(stepping)]

    def bucketed(
        self,
        pairs: Sequence[LoRAPair],
        state: MutableMapping[Tensor, dict[str, Any]],
        with_bases: bool,
        buckets: Sequence[Sequence[int]],
    ) -> Generator[Materialised, None, None]:
        """Each bucket of :meth:`buckets` in turn, as :meth:`materialised` gives the pairs, with
        ``indices`` set; the consumer closes the generator (``contextlib.closing``) if it stops early."""
        for bucket in buckets:
            with self.materialised(pairs, state, with_bases) as work:
                yield replace(work, indices=list(bucket))

    def release_gradients(self, factors: Sequence[Tensor]) -> None:
        """Called with the working factors of a group once their coefficient gradients exist and
        nothing in the step reads their gradients again: a strategy may drop copies it made for
        the step. Here: nothing to drop (the gradients are the caller's)."""

    def base_products(self, pairs: Sequence[LoRAPair], due: Sequence[int]) -> dict[int, Tensor]:
        """``(||W0||^2, <W0, B A>)`` (2,) of each pair of ``due`` that this rank owns and that has a
        base weight, from the factors before the step, keyed by pair index; called before any
        bucket is materialised, with the same ``due`` on every rank. Here: read from the whole base
        weight block by block (:meth:`LoRAPair.base_products`)."""
        products = {}
        for i in due:
            if self.owns(i):
                value = pairs[i].base_products()
                if value is not None:
                    products[i] = value
        return products

    def finite_flags(self, grads: Sequence[Tensor]) -> Tensor:
        """Whether each gradient of the step (the factors' of the stepping pairs, then the other
        parameters') is finite everywhere: one tensor ``(len(grads),)`` (bool, or 0/1 integers),
        the same on every rank once :meth:`settle` returned."""
        return finite_flags(grads)

    def settle(self) -> None:
        """Wait for the collectives that :meth:`finite_flags` and :meth:`base_products` may leave in
        flight (their tensors hold the agreed values from then on); the step calls it before it
        reads them, so that the agreement overlaps the work in between. Here: none are."""

    def reduce_pair_squares(self, local: Tensor) -> Tensor:
        """The sum of the squared full-space norms of this rank's pairs (0-dim float64) -> of all pairs."""
        return local

    def squared_norm(self, grads: Sequence[Tensor]) -> Tensor:
        """``sum ||g||^2`` (0-dim float64) of the gradients of the parameters that are not LoRA factors."""
        if not grads:
            return torch.zeros((), dtype=torch.float64)
        norms = torch._foreach_norm(list(grads))
        return torch.stack([n.to(norms[0].device, torch.float64) for n in norms]).square().sum()

    def publish(self, moved: Sequence[tuple[int, Tensor]]) -> None:
        """After the step: ``(pair index, factor)`` of every factor that moved, in the same order on every rank."""

    def record_moved(
        self,
        pairs: Sequence[LoRAPair],
        moved: Sequence[tuple[int, Side]],
        state: MutableMapping[Tensor, dict[str, Any]],
    ) -> None:
        """After :meth:`publish`: record the new basis Gram ``C C^T`` of every moved factor
        (``(pair index, "a" or "b")``) of a pair this rank does not own; the owner recorded it as
        it moved the factor. The default reads the whole published factor (``r^2 l`` flops each)."""
        for i, side in moved:
            if self.owns(i):
                continue
            factor = getattr(pairs[i], side)
            matrix = coefficients_of(pairs[i], side, factor)
            entry = state[factor]
            entry[BASIS_GRAM_KEY] = basis_gram(matrix)
            if SKETCH_KEY in entry:
                entry[SKETCH_KEY] = basis_sketch(matrix)


class Replicated(DistributedStrategy):
    """Every rank computes every step (a single process, or DDP with its averaged gradients).

    Args:
        process_group: the ranks that hold the same model (default: the whole world, when
            ``torch.distributed`` is initialised).
        local: communicate nothing, for an optimizer built on some ranks only (evaluation, a
            reference run inside a distributed job).

    The step is deterministic and DDP makes the gradients equal, so the ranks stay bit-identical
    with no communication of parameters or state; each rank holds the whole optimizer state. With
    a process group of more than one rank, construction checks that every rank holds the same
    pairs (:func:`check_ranks_agree`) and each step agrees the finiteness verdict
    (:func:`agree_flags`, one all-reduce of one byte per gradient), so a gradient made non-finite
    on one rank after DDP's averaging leaves no rank stepping alone.
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None, *, local: bool = False) -> None:
        self.process_group = process_group
        self.local = local
        self._group: dist.ProcessGroup | None = None
        self._agreeing = False

    def __repr__(self) -> str:
        return "Replicated(local=True)" if self.local else "Replicated()"

    def setup(
        self, pairs: Sequence[LoRAPair], rule: CalibrationRule, param_group_of: Mapping[Tensor, Mapping[str, Any]]
    ) -> None:
        self._agreeing = (
            not self.local
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )
        if self._agreeing:
            check_ranks_agree(pairs, rule, self, self.process_group)

    def finite_flags(self, grads: Sequence[Tensor]) -> Tensor:
        flags = finite_flags(grads)
        return agree_flags(flags, self.process_group) if self._agreeing else flags


def fill_buckets(items: Sequence[T], nbytes: Callable[[T], int], limit: int) -> list[list[T]]:
    """``items`` in order, cut into consecutive buckets of at most ``limit`` bytes (``nbytes`` of
    each item); an item larger than ``limit`` makes a bucket of its own. No items, no buckets."""
    buckets: list[list[T]] = []
    filled = 0
    for item in items:
        size = nbytes(item)
        if not buckets or (buckets[-1] and filled + size > limit):
            buckets.append([])
            filled = 0
        buckets[-1].append(item)
        filled += size
    return buckets


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state held by this rank (local shards of DTensors), every parameter
    included: what this rank's ``state_dict()`` carries (the in-memory basis sketches aside)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for entry in optimizer.state.values():
        for key, value in entry.items():
            if key == SKETCH_KEY:
                continue
            if isinstance(value, DTensor):
                value = value.to_local()
            if isinstance(value, Tensor):
                total += value.numel() * value.element_size()
    return total


def comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where the group's collectives take their tensors: the CPU for gloo, the current CUDA device otherwise."""
    if "gloo" in str(dist.get_backend(group)):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def agree_flags(flags: Tensor, group: dist.ProcessGroup | None, pending: list[Any] | None = None) -> Tensor:
    """``flags`` (bool) combined over the ranks of ``group`` with a logical AND: one all-reduce (MIN).

    Every rank gets the same verdict, so every rank raises, or skips the step, together; a verdict
    taken per rank would let one rank step alone (replicated: silently different parameters;
    sharded: the next collective mismatched). With ``pending``, the all-reduce is left in flight
    (its work appended there) and the 0/1 integers it will hold are returned."""
    if flags.numel() == 0:
        return flags
    values = flags.to(comm_device(group), torch.int32)
    work = dist.all_reduce(values, op=dist.ReduceOp.MIN, group=group, async_op=pending is not None)
    if pending is not None:
        pending.append(work)
        return values
    return values.to(flags.device, torch.bool)


def _describe(pairs: Sequence[LoRAPair], rule: CalibrationRule, strategy: DistributedStrategy) -> list[str]:
    """What every rank must agree on, one line per item: strategy, rule, number of pairs, then each
    pair's name, shape, rank and factor dtypes (global shapes: a DTensor reports the whole)."""
    lines = [f"strategy {strategy!r}", f"rule {rule.name!r} {rule!r}", f"{len(pairs)} pairs"]
    for i, pair in enumerate(pairs):
        m, n = pair.full_shape
        lines.append(
            f"{label(pair, i)}: W ({m}, {n}), rank {pair.rank}, a {tuple(pair.a.shape)} {pair.a.dtype}, "
            f"b {tuple(pair.b.shape)} {pair.b.dtype}"
        )
    return lines


def check_ranks_agree(
    pairs: Sequence[LoRAPair],
    rule: CalibrationRule,
    strategy: DistributedStrategy,
    group: dist.ProcessGroup | None,
) -> None:
    """Raise the same ``ValueError`` on every rank of ``group`` unless all hold the same pairs, rule and strategy.

    One all-gather of a 16-byte digest of the description (number of pairs, each pair's name,
    ``(m, n)``, rank and dtypes, the rule and the strategy); only when the digests differ are the
    descriptions themselves gathered, to name the first line where ranks differ. Without the
    check, ranks holding different pairs fail later in a mismatched collective (or, under NCCL,
    hang or exchange wrong data).
    """
    lines = _describe(pairs, rule, strategy)
    digest = hashlib.sha256("\n".join(lines).encode()).digest()[:16]
    mine = torch.frombuffer(bytearray(digest), dtype=torch.int64).to(comm_device(group))
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    every: list[Any] = [None] * world
    dist.all_gather_object(every, lines, group=group)
    for line in range(max(len(d) for d in every)):
        seen = [d[line] if line < len(d) else "(nothing)" for d in every]
        if len(set(seen)) > 1:
            differing = next(rank for rank in range(world) if seen[rank] != seen[0])
            raise ValueError(
                f"ranks hold different optimizers: rank 0 has {seen[0]!r}, rank {differing} has "
                f"{seen[differing]!r}; build the same model, pairs, rule and strategy on every rank"
            )


def refuse_unsupported_wrappers(model_or_pairs: nn.Module | Iterable[LoRAPair]) -> None:
    """Raise ``ValueError`` for a model wrapped by FSDP1 (``FullyShardedDataParallel``).

    FSDP1 flattens parameters into ``FlatParameter`` shards, so a factor is no longer an
    ``(r, n)`` or ``(m, r)`` tensor and its pair's ``r x r`` algebra cannot be formed; FSDP2
    (``fully_shard``) keeps every parameter as a DTensor and is supported."""
    if not isinstance(model_or_pairs, nn.Module):
        return
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # torch built without distributed support
        return
    for name, module in model_or_pairs.named_modules():
        if isinstance(module, FullyShardedDataParallel):
            raise ValueError(
                f"{name or 'the model'} is wrapped by FullyShardedDataParallel (FSDP1), whose flat parameters "
                "hide the LoRA factors' shapes; shard with torch.distributed.fsdp.fully_shard (FSDP2) instead"
            )


def owner_state_dict_hooks(
    optimizer: torch.optim.Optimizer,
    strategy: DistributedStrategy,
    group: dist.ProcessGroup | None,
    full_state_dict: bool,
) -> None:
    """State-dict hooks on ``optimizer`` (the wrapper) for a strategy whose ranks own pairs.

    A rank's ``state_dict()`` holds the statistics of the pairs it owns only. That is what
    ``torch.distributed.checkpoint`` wants (each rank writes its part), but a flow that saves rank
    0's state dict for every rank (accelerate's ``save_state``, ``torch.save`` on rank 0) would
    lose the others'. So:

    * with ``full_state_dict``, ``state_dict()`` gathers every pair's statistics to every rank
      (one ``all_gather_object`` of the owned statistics, moved to the CPU: every rank must call
      it, and each then holds the whole optimizer state for the duration);
    * always, ``load_state_dict()`` first checks that the state dict holds the statistics of
      every pair this rank owns, agreed over ranks (one all-reduce), and otherwise raises the
      same ``ValueError`` on every rank, naming the remedy.
    """

    def packed_ids(wrapper: Any, state_dict: Mapping[str, Any]) -> dict[Tensor, Any]:
        """Parameter -> its key in ``state_dict``, matched by position in the param groups (as torch loads)."""
        return {
            p: key
            for saved, live in zip(state_dict["param_groups"], wrapper.param_groups)
            for key, p in zip(saved["params"], live["params"])
        }

    def owned_factors(wrapper: Any) -> list[Tensor]:
        return [f for i, pair in enumerate(wrapper.pairs) if strategy.owns(i) for f in (pair.a, pair.b)]

    # The hooks read the optimizer they are called with, so a copy of the wrapper uses its own pairs.
    def gather(wrapper: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        ids = packed_ids(wrapper, state_dict)
        mine = {
            ids[f]: {
                k: v.detach().cpu() for k, v in state_dict["state"].get(ids[f], {}).items() if k not in WRAPPER_KEYS
            }
            for f in owned_factors(wrapper)
        }
        every: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, mine, group=group)
        for part in every:
            for pid, statistics in part.items():
                state_dict["state"].setdefault(pid, {}).update(statistics)
        return state_dict

    def check(wrapper: Any, state_dict: dict[str, Any]) -> None:
        ids = packed_ids(wrapper, state_dict)
        saved = state_dict.get("state", {})
        missing = [
            f
            for f in owned_factors(wrapper)
            if any(
                k not in saved.get(ids[f], {})
                for k, v in wrapper.state.get(f, {}).items()
                if k not in WRAPPER_KEYS and isinstance(v, Tensor)
            )
        ]
        complete = agree_flags(torch.tensor([not missing]), group)
        if not bool(complete.all()):
            raise ValueError(
                f"the state dict lacks the statistics of pairs owned by other ranks than the one that saved it "
                f"({strategy!r}: each rank's state_dict() holds its own pairs); save with "
                "torch.distributed.checkpoint or lowrank_opt.distributed.checkpoint.save, or build the strategy "
                "with full_state_dict=True so that state_dict() gathers every pair's statistics"
            )

    if full_state_dict:
        optimizer.register_state_dict_post_hook(gather)
    optimizer.register_load_state_dict_pre_hook(check)
