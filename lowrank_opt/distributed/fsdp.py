"""FSDP2 and HSDP: factors that ``fully_shard`` turned into DTensors sharded on their first dimension.

Owner-computes. Every rule needs a pair's whole frozen basis ``F`` (k, r), so a pair's step cannot
be split across its shards; instead each pair is owned by one rank of the shard group, balanced
as :class:`~lowrank_opt.distributed.PairSharded` balances them (:func:`assign_pairs`):

1. the owned stepping pairs are cut into buckets of at most ``bucket_bytes`` of whole tensors per
   rank (:meth:`FSDP2.buckets`); for each bucket in turn, one ``all_to_all`` brings every owner
   the shards of its pairs' factors (into one buffer, laid out so that the engine reads a group's
   frozen factors as a stack in place) and a second one their gradients (a group's apart from
   the others', so that the step frees them group by group; and, for a rule that reads it
   whole, the base weight ``W0``), the next bucket's first exchange in flight while the current
   one is computed (:meth:`FSDP2.bucketed`). The factors, and the gradients, of one side of a
   group are assembled from the ranks' rows in one copy (:meth:`FSDP2._unpack`);
2. the owner steps its pairs exactly as a single process would, on whole plain tensors, freeing
   each group's gathered gradients once lifted; its statistics are plain, whole tensors that
   live on it alone, as in the pair-sharded mode;
3. after the step, one ``all_to_all`` returns each moved factor's rows to their ranks, together
   with its new ``r x r`` basis Gram, which every rank records.

Per rank, statistics and step compute are those of about ``1 / world`` of the pairs, and in-step
memory (whole factors, gradients and the step's temporaries) that of about one bucket of them:
they fall with the shard group's size, also when it exceeds ``r`` (a statistic shaped like
``A`` (r, n) is never split by rows).
Communication per step: ``r (m + n)`` elements of factors and as many of gradients per stepping
pair in, ``r (m or n)`` plus ``r^2`` per moved factor out. A rule that reads ``W0`` only through
``||W0||^2`` and ``<W0, B A>`` (LoFT-Adafactor) gets them from the shards at the steps it asks
for, before any bucket (:meth:`FSDP2.base_products`): ``r n`` elements per pair all-gathered and
two numbers per pair all-reduced, never ``W0``; ``m n`` more per pair for a rule that reads
``W0`` whole. The finiteness verdict is one all-reduce over every rank, left in flight until the
step reads it (:meth:`FSDP2.settle`); clipping adds one all-reduce over the shard group for the
pairs and one for the other parameters.

HSDP (a 2-D mesh, ``(Replicate(), Shard(0))``): ownership is over the shard dimension; each
replica computes the same steps on gradients that FSDP already averaged over the replicate
dimension, so norms are summed over the shard group only, and the finiteness verdict is agreed
over all ranks. Parameters that are not LoRA factors are stepped by the base optimizer on their
DTensors, as FSDP2 does.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Callable, Generator, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..engine import finite_flags
from ..layout import BASIS_GRAM_KEY, STEP_KEY
from ..pairs import LoRAPair, base_products_from
from ..rule import CalibrationRule
from ..views import SIDES, Side
from .sharded import assign_pairs, pair_costs
from .strategy import (
    DistributedStrategy,
    Materialised,
    agree_flags,
    check_ranks_agree,
    comm_device,
    fill_buckets,
    owner_state_dict_hooks,
)

__all__ = ["ALONE_BYTES", "FSDP2"]

# A base weight this large is gathered by a collective of its own (bandwidth-bound anyway), without a copy.
ALONE_BYTES = 2**20
# The longest the step waits for the backend to let go of a finished collective's buffers.
RELEASE_WAIT_S = 0.05

State = MutableMapping[Tensor, dict[str, Any]]


class FSDP2(DistributedStrategy):
    """The mode for factors sharded by ``fully_shard`` (chosen automatically for DTensor factors).

    Args:
        bucket_bytes: the most bytes of whole tensors (factors, gradients) of the pairs a rank
            steps at once: the step runs bucket by bucket, the next one gathered while the current
            one computes, unless it must run whole (``transactional=True``, or a rule that lets
            the base optimizer move the factors). Also the most bytes of moved factors one
            ``all_to_all`` sends back, and of partner factors one ``all_gather`` brings for the
            base products.
        full_state_dict: ``state_dict()`` gathers every pair's statistics to every rank (see
            :class:`~lowrank_opt.distributed.PairSharded`); for flows that save one rank's state
            dict for all.

    Factors must be ``(Shard(0),)`` on a 1-D mesh (FSDP2) or ``(Replicate(), Shard(0))`` on a 2-D
    mesh (HSDP). Uneven and empty shards (``r < world_size``) follow DTensor's chunking.
    """

    replicated = False  # each pair is owned by one rank, assigned at construction
    restorable = False  # owners send the moved factors back after the step: a raising rank strands its peers

    def __init__(self, bucket_bytes: int = 25 * 2**20, *, full_state_dict: bool = False) -> None:
        if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
        self.bucket_bytes = bucket_bytes
        self.full_state_dict = full_state_dict
        self.owners: list[int] = []
        self.rank = 0
        self.shards = 1
        self._shard_group: dist.ProcessGroup | None = None
        self._originals: dict[Tensor, Tensor] = {}  # working factor -> its DTensor, during a step
        self._working: dict[Tensor, nn.Parameter] = {}  # DTensor factor -> its working factor, kept
        self._work_state: dict[Tensor, dict[str, Any]] = {}
        self._pending: list[Any] = []  # collectives in flight until settle()

    def __repr__(self) -> str:
        return f"FSDP2(bucket_bytes={self.bucket_bytes})"

    def setup(
        self, pairs: Sequence[LoRAPair], rule: CalibrationRule, param_group_of: Mapping[Tensor, Mapping[str, Any]]
    ) -> None:
        factors = [f for pair in pairs for f in (pair.a, pair.b)]
        plain = [f for f in factors if not isinstance(f, DTensor)]
        if len(plain) == len(factors):
            raise ValueError(
                "FSDP2: no LoRA factor is a DTensor; call fully_shard on the model before building the optimizer"
            )
        if plain:
            raise ValueError(
                f"FSDP2: {len(plain)} LoRA factors are plain tensors while others are DTensors; apply fully_shard "
                "to a module that holds every LoRA layer (the root)"
            )
        mesh = factors[0].device_mesh  # type: ignore[attr-defined]
        for factor in factors:
            placements = tuple(factor.placements)  # type: ignore[attr-defined]
            if placements not in ((Shard(0),), (Replicate(), Shard(0))):
                raise ValueError(
                    "FSDP2: factors must be (Shard(0),) on a 1-D mesh or (Replicate(), Shard(0)) on a 2-D mesh, "
                    f"got {placements}"
                )
            if factor.device_mesh != mesh:  # type: ignore[attr-defined]
                raise ValueError("FSDP2: every LoRA factor must be sharded over the same device mesh")
        check_ranks_agree(pairs, rule, self, None)
        self._shard_group = mesh.get_group(mesh.ndim - 1)
        self.rank = dist.get_rank(self._shard_group)
        self.shards = dist.get_world_size(self._shard_group)
        self._device = factors[0].device
        state, cost = pair_costs(pairs, rule, param_group_of)
        self.owners = assign_pairs(state, cost, self.shards)

    def owns(self, index: int) -> bool:
        return self.owners[index] == self.rank

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        owner_state_dict_hooks(optimizer, self, self._shard_group, self.full_state_dict)

    @contextmanager
    def materialised(self, pairs: Sequence[LoRAPair], state: State, with_bases: bool) -> Iterator[Materialised]:
        """Owned stepping pairs whole on their owner, all at once; a pair whose state does not exist
        yet whole on every rank (once, at construction: every rank records its basis Grams)."""
        creating = [i for i, pair in enumerate(pairs) if STEP_KEY not in state[pair.a]]
        whole: dict[Tensor, Tensor] = {}
        if creating:
            for i in creating:
                for factor in (pairs[i].a, pairs[i].b):
                    whole[factor] = factor.detach().full_tensor()  # type: ignore[attr-defined]
        else:
            stepping = [i for i, pair in enumerate(pairs) if pair.a.grad is not None]
            whole = self._start_gather(*self._wanted(pairs, stepping, with_bases)).wait()
        with self._working_set(pairs, state, whole, None) as work:
            yield work

    def buckets(self, pairs: Sequence[LoRAPair], stepping: Sequence[int], with_bases: bool) -> list[list[int]]:
        """Each rank's owned stepping pairs, in order, cut where their whole tensors (factors,
        gradients, and base weights for a rule that reads them) would pass ``bucket_bytes``; bucket
        ``k`` holds every rank's ``k``-th piece, so that all ranks compute at once."""

        def nbytes(i: int) -> int:
            return sum(t.nbytes for t in self._pair_tensors(pairs[i], with_bases))

        pieces = [
            fill_buckets([i for i in stepping if self.owners[i] == owner], nbytes, self.bucket_bytes)
            for owner in range(self.shards)
        ]
        count = max((len(chunks) for chunks in pieces), default=0)
        return [sorted(i for chunks in pieces if k < len(chunks) for i in chunks[k]) for k in range(count)]

    def bucketed(
        self, pairs: Sequence[LoRAPair], state: State, with_bases: bool, buckets: Sequence[Sequence[int]]
    ) -> Generator[Materialised, None, None]:
        """One bucket after another, whole on their owners; the next bucket's first exchange is in
        flight while the consumer computes on the current one."""
        pending = self._start_gather(*self._wanted(pairs, buckets[0], with_bases)) if buckets else None
        try:
            for k, bucket in enumerate(buckets):
                assert pending is not None
                whole, pending = pending.wait(), None
                if k + 1 < len(buckets):
                    pending = self._start_gather(*self._wanted(pairs, buckets[k + 1], with_bases))
                with self._working_set(pairs, state, whole, bucket) as work:
                    yield work
                del whole
        finally:
            if pending is not None:  # closed early (a verdict every rank shares): drain the exchanges
                pending.wait()

    def _wanted(
        self, pairs: Sequence[LoRAPair], indices: Sequence[int], with_bases: bool
    ) -> tuple[list[tuple[int, Tensor]], dict[Tensor, tuple[Any, ...]]]:
        """``(owner, DTensor)`` of every tensor the pairs ``indices`` need whole, and the run of
        each factor and gradient: the factors, then their gradients, each by side, then shape,
        then index, so that the tensors a group steps together lie side by side
        (:meth:`_start_gather`) and are assembled in one copy per run (:meth:`_unpack`); then the
        bases. A run is one side of the pairs of one shape and rank."""
        order = sorted((side, pairs[i].full_shape, pairs[i].rank, i) for i in indices for side in SIDES)
        factors = [(self.owners[i], getattr(pairs[i], side), (side, shape, rank)) for side, shape, rank, i in order]
        items: list[tuple[int, Tensor | None]] = [(owner, f) for owner, f, _ in factors]
        items += [(owner, f.grad) for owner, f, _ in factors]
        if with_bases:
            items += [(self.owners[i], pairs[i].base_weight) for i in indices]
        runs: dict[Tensor, tuple[Any, ...]] = {f: ("factor", *run) for _, f, run in factors}
        runs.update((f.grad, ("gradient", *run)) for _, f, run in factors if f.grad is not None)
        return [(owner, t) for owner, t in items if isinstance(t, DTensor)], runs

    @contextmanager
    def _working_set(
        self, pairs: Sequence[LoRAPair], state: State, whole: dict[Tensor, Tensor], indices: Sequence[int] | None
    ) -> Iterator[Materialised]:
        """The pairs with the whole tensors of ``whole`` in working factors (the others as they are).
        Empties ``whole``: from then on the working factors alone hold the copies, so that one
        they drop (:meth:`release_gradients`) is freed."""
        shadows: dict[Tensor, nn.Parameter] = {}
        work_pairs = []
        for pair in pairs:
            a, b = pair.a, pair.b
            if a in whole:
                for factor in (a, b):
                    shadow = self._shadow_of(factor)
                    shadow.data = whole[factor]
                    shadow.grad = whole.get(factor.grad) if factor.grad is not None else None
                    shadows[factor] = shadow
                a, b = shadows[pair.a], shadows[pair.b]
            base = whole.get(pair.base_weight, pair.base_weight) if pair.base_weight is not None else None
            work_pairs.append(replace(pair, a=a, b=b, base_weight=base) if a is not pair.a else pair)
        whole.clear()
        # Working and original factors share one state entry: the statistics are the owner's plain
        # tensors. The dict and the working factors are the same objects at every step, so the
        # engine's stacked statistics are reused rather than stacked again.
        work_state = self._work_state
        work_state.clear()
        for pair in pairs:
            for factor in (pair.a, pair.b):
                work_state[shadows.get(factor, factor)] = state[factor]
        self._originals = {shadow: factor for factor, shadow in shadows.items()}
        try:
            yield Materialised(work_pairs, work_state, self._originals, None if indices is None else list(indices))
            with torch.no_grad():  # this rank's rows of its own pairs' gradients (clip_grad_norm_ scales them)
                for factor, shadow in shadows.items():
                    if shadow.grad is not None and isinstance(factor.grad, DTensor):
                        factor.grad.to_local().copy_(self._rows_of(shadow.grad, self.rank))
        finally:
            for shadow in shadows.values():  # the whole copies go; the objects stay for the next step
                shadow.grad = None
                shadow.data = shadow.data.new_empty(0)
            work_state.clear()
            self._originals = {}

    def release_gradients(self, factors: Sequence[Tensor]) -> None:
        """Drop the gathered whole gradients of these working factors: ``step()`` reads ``g_hat``
        from here on and changes no gradient, so nothing is written back to the shards."""
        for factor in factors:
            if factor in self._originals:
                factor.grad = None

    def _shadow_of(self, factor: Tensor) -> nn.Parameter:
        """The working factor that stands for the DTensor ``factor`` at every step (empty between steps)."""
        shadow = self._working.get(factor)
        if shadow is None:
            shadow = self._working[factor] = nn.Parameter(torch.empty(0, dtype=factor.dtype, device=factor.device))
        return shadow

    def record_moved(self, pairs: Sequence[LoRAPair], moved: Sequence[tuple[int, Side]], state: State) -> None:
        """Send each moved factor's rows back from its owner, with its new basis Gram (:meth:`_send_back`)."""
        sends: list[tuple[int, Tensor, Tensor | None]] = []  # (owner, original DTensor, whole on the owner)
        for i, side in moved:
            work = getattr(pairs[i], side)
            if self.owns(i):
                sends.append((self.owners[i], self._originals[work], work.detach()))
            else:
                sends.append((self.owners[i], work, None))
        grams = [state[getattr(pairs[i], side)] for i, side in moved]
        self._send_back(sends, grams)

    def base_products(self, pairs: Sequence[LoRAPair], due: Sequence[int]) -> dict[int, Tensor]:
        """``(||W0||^2, <W0, B A>)`` of the due pairs, from the shards of ``W0``: never gathered.

        With ``R`` the factor that runs along the stored rows of ``W0`` and ``P`` its partner
        (:meth:`LoRAPair.base_row_factors`), ``<W0, B A> = sum_j <R_j^T W0_j, P>`` over the shards
        ``j``. Each rank reads its rows of ``W0`` block by block against the same rows of ``R``
        (its own rows of ``B``; rows of ``A^T`` for ``W0^T``, and for a base that is not a DTensor
        the owner reads it whole) and dots the ``(r, cols)`` result with the whole ``P``, in
        float64; one all-reduce sums the two numbers of every pair, in flight until the step
        settles. The factors a rank lacks (``A``, and ``B`` too for ``W0^T`` or a whole base:
        ``r (m + n)`` elements at most per pair) are all-gathered one owner's pairs at a time, in
        chunks of at most ``bucket_bytes`` (a rank holds about its own share of them at once),
        before any bucket of the step is whole.
        """

        def nbytes(i: int) -> int:
            return sum(f.nbytes for f in self._base_partners(pairs[i]))

        chunks = []
        for owner in range(self.shards):
            owned = [i for i in due if self.owners[i] == owner and pairs[i].base_weight is not None]
            chunks += [(owner, chunk) for chunk in fill_buckets(owned, nbytes, self.bucket_bytes)]
        order = [i for _, chunk in chunks for i in chunk]
        partials = torch.zeros(len(order), 2, dtype=torch.float64, device=comm_device(self._shard_group))
        for (owner, chunk), rows in zip(chunks, partials.split([len(chunk) for _, chunk in chunks])):
            self._base_partials(pairs, chunk, owner, rows)
        if order:  # read once the step settles (:meth:`settle`), after the bucket's gathers
            self._pending.append(dist.all_reduce(partials, group=self._shard_group, async_op=True))
        return {i: summed for i, summed in zip(order, partials) if self.owns(i)}

    @staticmethod
    def _base_partners(pair: LoRAPair) -> list[Tensor]:
        """The factors every rank needs whole for its share of the pair's base products."""
        if isinstance(pair.base_weight, DTensor) and not pair.base_transposed:
            return [pair.a]  # the rows of B that run along this rank's rows of W0 are its own shard
        return [pair.a, pair.b]

    def _base_partials(self, pairs: Sequence[LoRAPair], indices: Sequence[int], owner: int, out: Tensor) -> None:
        """This rank's share ``(||W0_j||^2, <R_j^T W0_j, P>)`` of the base products of the pairs
        ``indices`` (all owned by ``owner``) into the rows of ``out``. The factors they need whole
        are all-gathered while this rank projects its rows of ``W0`` on its own rows of ``B``."""
        whole = self._all_gathered([f for i in indices for f in self._base_partners(pairs[i])])
        projected: dict[int, tuple[Tensor, Tensor]] = {}
        for i in indices:  # this rank's rows of B run along its rows of W0: nothing to wait for
            pair = pairs[i]
            if isinstance(pair.base_weight, DTensor) and not pair.base_transposed:
                rows = pair.base_row_factors(_local(pair.a).detach(), _local(pair.b).detach())[0]
                projected[i] = pair.project_base(pair.base_weight.to_local(), rows)
        for i, part in zip(indices, out):
            pair = pairs[i]
            base = pair.base_weight
            assert base is not None
            if i in projected:
                partner = pair.base_row_factors(whole[pair.a], _local(pair.b).detach())[1]
                part.copy_(base_products_from(*projected.pop(i), partner))
                continue
            if not isinstance(base, DTensor) and owner != self.rank:  # a whole base is read by its owner alone
                continue
            rows, partner = pair.base_row_factors(whole[pair.a], whole[pair.b])
            if isinstance(base, DTensor):  # rows of W0^T are columns of A: this rank's share of them
                rows, base = self._rows_of(rows, self.rank), base.to_local()
            part.copy_(base_products_from(*pair.project_base(base, rows), partner))
        whole.release()

    def finite_flags(self, grads: Sequence[Tensor]) -> Tensor:
        """Checked on this rank's pieces (whole gradients of owned pairs, local shards of the
        rest), agreed over every rank with one all-reduce: the verdict is the whole tensors'."""
        return agree_flags(finite_flags([_local(g) for g in grads]), None, self._pending)

    def settle(self) -> None:
        for work in self._pending:
            work.wait()
        self._pending.clear()

    def reduce_pair_squares(self, local: Tensor) -> Tensor:
        total = local.to(comm_device(self._shard_group), torch.float64, copy=True)
        dist.all_reduce(total, group=self._shard_group)
        return total.to(local.device)

    def squared_norm(self, grads: Sequence[Tensor]) -> Tensor:
        """Local shards' squares summed over the shard group for DTensors; plain (replicated) gradients as they are."""
        sharded = [_local(g).double().square().sum() for g in grads if isinstance(g, DTensor)]
        plain = [g.double().square().sum() for g in grads if not isinstance(g, DTensor)]
        total = torch.zeros((), dtype=torch.float64, device=comm_device(self._shard_group))
        if sharded:
            total += torch.stack(sharded).sum().to(total.device)
            dist.all_reduce(total, group=self._shard_group)
        if plain:
            total += torch.stack(plain).sum().to(total.device)
        return total.to(self._device)

    # ---------------------------------------------------------------- moving rows
    @staticmethod
    def _pair_tensors(pair: LoRAPair, with_base: bool) -> list[Tensor]:
        """The pair's sharded tensors a step needs whole: factors, gradients, and (``with_base``)
        the base weight, where it has one."""
        tensors = [pair.a, pair.b, pair.a.grad, pair.b.grad]
        if with_base:
            tensors.append(pair.base_weight)
        return [t for t in tensors if isinstance(t, DTensor)]

    def _rows(self, dim0: int, rank: int) -> tuple[int, int]:
        """``(start, count)`` of ``rank``'s rows of a first dimension ``dim0`` (DTensor's ``torch.chunk`` split)."""
        chunk = -(-dim0 // self.shards)
        start = min(rank * chunk, dim0)
        return start, min(chunk, dim0 - start)

    def _rows_of(self, whole: Tensor, rank: int) -> Tensor:
        start, count = self._rows(whole.shape[0], rank)
        return whole.narrow(0, start, count)

    def _padded(self, t: Tensor) -> int:
        """Elements one rank sends or receives for ``t``: its largest shard."""
        rows = t.shape[0]
        return -(-rows // self.shards) * (t.numel() // max(rows, 1))

    def _start_gather(
        self, items: Sequence[tuple[int, Tensor]], runs: Mapping[Tensor, tuple[Any, ...]] | None = None
    ) -> _Gathering:
        """Plan the exchanges that bring whole copies of DTensors ``(owner, dtensor)`` to their
        owners and issue the first (:class:`_Gathering` issues the rest one at a time).

        One ``all_to_all`` per kind and dtype carries every owner's tensors at once: each rank
        sends each owner its rows of that owner's tensors. The factors travel first, into one
        buffer per dtype on their owner, in the order of ``items``, so that a group's factors lie
        evenly spaced in one storage and the engine reads them as a stack without copying them
        (:func:`~lowrank_opt.engine.stacked`); the gradients (and small bases) follow, each run's
        (``runs``, :meth:`_wanted`) into a tensor of its own, so that the step can free them
        group by group. Only one exchange's buffers are alive at once. A base weight of at least
        :data:`ALONE_BYTES` is gathered on its own, straight into its whole copy: no second copy
        of it."""

        factors: list[tuple[int, Tensor]] = []
        rest: list[tuple[int, Tensor]] = []
        alone: list[tuple[int, Tensor]] = []
        for owner, t in items:
            if t.requires_grad:
                factors.append((owner, t))
            elif t.nbytes >= ALONE_BYTES and isinstance(t, nn.Parameter):  # a base weight, not a gradient
                alone.append((owner, t))
            else:
                rest.append((owner, t))
        plan: list[Callable[[], _Gather]] = []
        for kind in (factors, rest):
            by_dtype: dict[torch.dtype, list[tuple[int, Tensor]]] = {}
            for owner, t in kind:
                by_dtype.setdefault(t.dtype, []).append((owner, t))
            plan += [partial(self._exchange, members) for members in by_dtype.values()]
        plan += [partial(self._gather_alone, owner, t) for owner, t in alone]
        return _Gathering(self, plan, self._factor_buffers(factors), dict(runs or {}))

    def _factor_buffers(self, items: Sequence[tuple[int, Tensor]]) -> dict[Tensor, Tensor]:
        """Where each whole factor of ``items`` this rank owns lands: views of one buffer per dtype, in order."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for owner, t in items:
            if owner == self.rank:
                by_dtype.setdefault(t.dtype, []).append(t)
        out: dict[Tensor, Tensor] = {}
        for dtype, tensors in by_dtype.items():
            flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=tensors[0].device)
            for t, piece in zip(tensors, flat.split([t.numel() for t in tensors])):
                out[t] = piece.view(t.shape)
        return out

    def _exchange(self, items: Sequence[tuple[int, Tensor]]) -> _Gather:
        """Start one ``all_to_all`` that gives every owner the whole of its tensors among ``items``
        (one dtype): this rank sends each owner, in rank order, its rows of that owner's tensors,
        and receives every rank's rows of its own, the ranks' pieces end to end."""
        ordered = sorted(items, key=lambda item: item[0])  # stable: each owner's tensors keep their order
        tensors = [t for _, t in ordered]
        sizes = [self._padded(t) for t in tensors]
        send = self._packed(tensors, sizes)
        send_splits = [0] * self.shards
        for (owner, _), size in zip(ordered, sizes):
            send_splits[owner] += size
        mine = [t for owner, t in ordered if owner == self.rank]
        mine_sizes = [size for (owner, _), size in zip(ordered, sizes) if owner == self.rank]
        buffer = torch.empty(self.shards * sum(mine_sizes), dtype=send.dtype, device=send.device)
        work = dist.all_to_all_single(
            buffer,
            send,
            [sum(mine_sizes)] * self.shards,
            send_splits,
            group=self._shard_group,
            async_op=True,
        )
        return _Gather(work, send, buffer if mine else None, mine_sizes, mine)

    def _gather_alone(self, owner: int, t: Tensor) -> _Gather:
        """Start one gather of the large tensor ``t`` to ``owner``, straight into its whole copy."""
        send = self._packed([t], [self._padded(t)])
        buffer = (
            torch.empty(self.shards * send.numel(), dtype=send.dtype, device=send.device)
            if owner == self.rank
            else None
        )
        received = list(buffer.split(send.numel())) if buffer is not None else None
        work = dist.gather(send, received, group=self._shard_group, group_dst=owner, async_op=True)
        return _Gather(work, send, buffer, [send.numel()], [t] if buffer is not None else [], alone=True)

    def _packed(self, tensors: Sequence[Tensor], sizes: Sequence[int]) -> Tensor:
        """This rank's shards of ``tensors`` (one dtype) end to end, each padded to its ``sizes`` entry."""
        locals_ = [_local(t).detach().reshape(-1) for t in tensors]
        padded = any(local.numel() != size for local, size in zip(locals_, sizes))
        make = torch.zeros if padded else torch.empty  # padding is sent as zeros
        send = make(sum(sizes), dtype=tensors[0].dtype, device=comm_device(self._shard_group))
        pieces = send.split(sizes)
        if padded:
            pieces = tuple(piece[: local.numel()] for local, piece in zip(locals_, pieces))
        torch._foreach_copy_(pieces, locals_)
        return send

    def _all_gathered(self, tensors: Sequence[Tensor]) -> _AllGathered:
        """Whole copies of the DTensors ``tensors`` on every rank: one ``all_gather`` per dtype,
        issued without waiting; each whole tensor is assembled when it is read."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        where: dict[Tensor, tuple[_Gather, int]] = {}
        for group in by_dtype.values():
            sizes = [self._padded(t) for t in group]
            send = self._packed(group, sizes)
            buffer = torch.empty(self.shards * send.numel(), dtype=send.dtype, device=send.device)
            work = dist.all_gather(list(buffer.split(send.numel())), send, group=self._shard_group, async_op=True)
            call = _Gather(work, send, buffer, sizes, group)
            where.update((t, (call, k)) for k, t in enumerate(group))
        return _AllGathered(self, where)

    def _unpack(
        self, call: _Gather, out: dict[Tensor, Tensor], into: Mapping[Tensor, Tensor], runs: Mapping[Tensor, Any]
    ) -> None:
        """On the owner of a completed gather, assemble each whole tensor from the ranks' rows:
        into its place in ``into`` where it has one, else into a tensor of its own (one for the
        tensors of a run). The tensors of a run (:meth:`_run_end`) are assembled in one copy."""
        if call.buffer is None:
            return
        k = 0
        while k < len(call.tensors):
            end = self._run_end(call, k, into, runs)
            if end - k == 1:
                out[call.tensors[k]] = self._assembled(call, k, into.get(call.tensors[k]))
            else:
                out.update(zip(call.tensors[k:end], self._assembled_run(call, k, end, into)))
            k = end

    def _run_end(self, call: _Gather, start: int, into: Mapping[Tensor, Tensor], runs: Mapping[Tensor, Any]) -> int:
        """Where the run of tensors from ``start`` ends: tensors of one run of :meth:`_wanted`
        (so of one shape and dtype) that split evenly over the ranks, so that each rank's rows of
        them lie end to end in its piece, and whose places in ``into``, if they have them, lie end
        to end too (:meth:`_factor_buffers` places the factors in the order of :meth:`_wanted`)."""
        first = call.tensors[start]
        run = runs.get(first)
        if run is None or call.alone or first.shape[0] % self.shards:
            return start + 1
        place = into.get(first)
        end = start + 1
        while end < len(call.tensors):
            t = call.tensors[end]
            if runs.get(t) != run or t.dtype != first.dtype or (t in into) != (place is not None):
                break
            if place is not None and into[t].storage_offset() != place.storage_offset() + (end - start) * first.numel():
                break
            end += 1
        return end

    def _assembled_run(self, call: _Gather, start: int, end: int, into: Mapping[Tensor, Tensor]) -> Sequence[Tensor]:
        """Tensors ``start:end`` of a completed gather (a run of :meth:`_run_end`), whole, in one
        copy from every rank's rows of them: into their places in ``into``, or as views of one
        new tensor, which lives until the last of them is dropped (a group's gradients, which
        the step frees together; pairs of one shape in two groups, of other param groups or at
        other steps, free theirs with the later group)."""
        assert call.buffer is not None
        first = call.tensors[start]
        count, piece = end - start, call.sizes[start]
        rows = call.buffer.view(self.shards, -1)[:, call.offsets[start] : call.offsets[start] + count * piece]
        source = rearrange(rows, "rank (member piece) -> member rank piece", member=count)
        if first in into:
            into[first].as_strided((count, self.shards, piece), (first.numel(), piece, 1)).copy_(source)
            return [into[t] for t in call.tensors[start:end]]
        whole = torch.empty((count, self.shards, piece), dtype=first.dtype, device=first.device)
        whole.copy_(source)
        return whole.view(count, *first.shape).unbind(0)

    def _assembled(self, call: _Gather, k: int, into: Tensor | None = None) -> Tensor:
        """Tensor ``k`` of a completed gather, whole, from the ranks' rows in its receive buffer
        (into ``into`` when given). A tensor gathered alone is the buffer itself: DTensor's shards
        pad only at the end, so the ranks' padded pieces laid end to end are the whole."""
        assert call.buffer is not None
        t = call.tensors[k]
        if call.alone and into is None:
            return call.buffer[: t.numel()].view(t.shape).to(t.device)
        offset = call.offsets[k]
        row = t.numel() // max(t.shape[0], 1)
        pieces = call.buffer.view(self.shards, -1)
        parts = [pieces[j, offset : offset + self._rows(t.shape[0], j)[1] * row] for j in range(self.shards)]
        if into is None:
            return torch.cat(parts).view(t.shape).to(t.device)
        if into.device == call.buffer.device:
            torch.cat(parts, out=into.view(-1))
        else:  # gloo's buffers are on the CPU
            into.view(-1).copy_(torch.cat(parts))
        return into

    def _send_back(self, sends: Sequence[tuple[int, Tensor, Tensor | None]], entries: Sequence[dict[str, Any]]) -> None:
        """Each moved factor's rows from its owner into every rank's shard, and its new basis Gram
        (``entries[k][BASIS_GRAM_KEY]``, ``r x r``) into every rank's state: one ``all_to_all``
        per dtype in each piece of at most ``bucket_bytes``, in which every owner sends each rank
        its rows of the factors it moved."""
        indexed = [(owner, original) for owner, original, _ in sends]
        position = {id(original): k for k, (_, original) in enumerate(indexed)}
        for bucket in fill_buckets(indexed, lambda item: item[1].nbytes, self.bucket_bytes):
            by_dtype: dict[torch.dtype, list[tuple[int, int, bool]]] = {}  # -> (owner, send index, is the Gram)
            for owner, original in sorted(bucket, key=lambda item: item[0]):
                k = position[id(original)]
                by_dtype.setdefault(original.dtype, []).append((owner, k, False))
                by_dtype.setdefault(entries[k][BASIS_GRAM_KEY].dtype, []).append((owner, k, True))
            for dtype, members in by_dtype.items():
                self._exchange_moved(sends, entries, members, dtype)

    def _exchange_moved(
        self,
        sends: Sequence[tuple[int, Tensor, Tensor | None]],
        entries: Sequence[dict[str, Any]],
        members: Sequence[tuple[int, int, bool]],
        dtype: torch.dtype,
    ) -> None:
        """One ``all_to_all`` of the moved rows and Grams ``members`` (owner-ordered, one dtype)."""
        sizes = [
            entries[k][BASIS_GRAM_KEY].numel() if is_gram else self._padded(sends[k][1]) for _, k, is_gram in members
        ]
        mine = [(member, size) for member, size in zip(members, sizes) if member[0] == self.rank]
        send = self._moved_rows(sends, entries, mine, dtype)
        received_splits = [
            sum(size for (owner, _, _), size in zip(members, sizes) if owner == j) for j in range(self.shards)
        ]
        received = torch.empty(sum(received_splits), dtype=dtype, device=send.device)
        piece = send.numel() // self.shards
        dist.all_to_all_single(received, send, received_splits, [piece] * self.shards, group=self._shard_group)
        buffers = [_release_flag(send), _release_flag(received)]
        del send
        self._record_received(sends, entries, members, received.split(sizes))
        del received
        _await_release(buffers)  # before the next exchange's buffers exist

    def _moved_rows(
        self,
        sends: Sequence[tuple[int, Tensor, Tensor | None]],
        entries: Sequence[dict[str, Any]],
        mine: Sequence[tuple[tuple[int, int, bool], int]],
        dtype: torch.dtype,
    ) -> Tensor:
        """What this rank sends each rank, end to end: the rows of each factor it moved (of
        ``mine``, with their padded sizes) that the rank holds, and the new basis Grams."""
        piece = sum(size for _, size in mine)
        send = torch.zeros(self.shards * piece, dtype=dtype, device=comm_device(self._shard_group))
        targets, values = [], []
        for j, flat in enumerate(send.split(piece) if piece else []):
            for ((_, k, is_gram), _), part in zip(mine, flat.split([size for _, size in mine])):
                whole = sends[k][2]
                assert whole is not None  # this rank owns the pair
                value = entries[k][BASIS_GRAM_KEY] if is_gram else self._rows_of(whole, j)
                targets.append(part[: value.numel()])
                values.append(value.reshape(-1))
        if targets:
            torch._foreach_copy_(targets, values)
        return send

    def _record_received(
        self,
        sends: Sequence[tuple[int, Tensor, Tensor | None]],
        entries: Sequence[dict[str, Any]],
        members: Sequence[tuple[int, int, bool]],
        pieces: Sequence[Tensor],
    ) -> None:
        """Each received piece into this rank's shard of its factor, or (a Gram from another owner)
        into the factor's state entry, as a copy."""
        locals_, parts = [], []
        for (owner, k, is_gram), part in zip(members, pieces):
            if is_gram:
                if owner != self.rank:
                    gram = entries[k][BASIS_GRAM_KEY]
                    entries[k][BASIS_GRAM_KEY] = part.view_as(gram).to(gram.device, copy=True)
                continue
            local = _local(sends[k][1])
            locals_.append(local)
            parts.append(part[: local.numel()].view_as(local))
        if locals_:
            with torch.no_grad():
                torch._foreach_copy_(locals_, parts)


@dataclass
class _Gather:
    """One collective in flight that brings whole tensors to this rank: its work handle, what it
    sends, and the tensors it receives, every rank's padded rows of them end to end in ``buffer``."""

    work: Any
    send: Tensor | None  # kept alive until the collective completes
    buffer: Tensor | None  # None: this rank receives nothing
    sizes: list[int]  # the padded piece of each tensor of ``tensors``
    tensors: list[Tensor]
    alone: bool = False  # one tensor, whose whole copy is the buffer itself

    def __post_init__(self) -> None:
        self.offsets = [0, *itertools.accumulate(self.sizes)][:-1]  # of each piece in a rank's rows

    def finish(self) -> None:
        """Wait for the collective (once), then drop the send buffer, once no one else holds it."""
        if self.work is None:
            return
        self.work.wait()
        sent = [_release_flag(self.send)]
        self.work = self.send = None
        _await_release(sent)

    def release(self) -> list[bool]:
        """Finish, then let go of the receive buffer: the flag of its release (:func:`_release_flag`)."""
        self.finish()
        flag = _release_flag(self.buffer)
        self.buffer = None
        return flag


@dataclass
class _Gathering:
    """The collectives of one bucket, the first in flight; :meth:`wait` issues the others one
    after another and gives this rank's whole tensors, keyed by DTensor."""

    strategy: FSDP2
    planned: list[Callable[[], _Gather]]  # each issues one collective, in order
    into: dict[Tensor, Tensor]  # where the whole factors this rank owns land
    runs: dict[Tensor, tuple[Any, ...]]  # the run of each factor and gradient (FSDP2._wanted)
    current: _Gather | None = None

    def __post_init__(self) -> None:
        self.planned = list(self.planned)
        self._next()

    def _next(self) -> None:
        self.current = self.planned.pop(0)() if self.planned else None

    def wait(self) -> dict[Tensor, Tensor]:
        out: dict[Tensor, Tensor] = {}
        while self.current is not None:
            call, self.current = self.current, None
            call.finish()  # the send buffer goes before anything is unpacked
            self.strategy._unpack(call, out, self.into, self.runs)
            if not call.alone:  # a tensor gathered alone is its buffer
                _await_release([call.release()])  # which goes before the next collective's buffers exist
            del call
            self._next()
        self.into, self.runs = {}, {}
        return out


@dataclass
class _AllGathered:
    """Whole copies of DTensors that every rank received, each assembled when read: one at a
    time alongside the receive buffers, not all of them at once."""

    strategy: FSDP2
    where: dict[Tensor, tuple[_Gather, int]]

    def __getitem__(self, t: Tensor) -> Tensor:
        call, k = self.where[t]
        call.finish()
        return self.strategy._assembled(call, k)

    def release(self) -> None:
        """Drop the buffers (waiting for a gather no one read), once no one else holds them."""
        flags = [call.release() for call in {id(call): call for call, _ in self.where.values()}.values()]
        self.where = {}
        _await_release(flags)


def _release_flag(buffer: Tensor | None) -> list[bool]:
    """A list that gets an element once ``buffer``'s memory is freed, by whoever holds it last
    (at once for no buffer, and for one on an accelerator: NCCL's buffers are reused in stream
    order by the caching allocator, and its watchdog drops finished collectives on its own time)."""
    if buffer is None or buffer.device.type != "cpu":
        return [True]
    flag: list[bool] = []
    weakref.finalize(buffer.untyped_storage(), flag.append, True)
    return flag


def _await_release(flags: Sequence[list[bool]]) -> None:
    """Return once every flag of :func:`_release_flag` is set, or after :data:`RELEASE_WAIT_S`.

    gloo's worker thread keeps a completed collective, and the tensors it was given, for a moment
    after ``wait()`` returns (up to a few milliseconds when ranks share cores): waiting for that
    moment keeps the next buffers from coexisting with the last ones."""
    deadline = time.perf_counter() + RELEASE_WAIT_S
    while not all(flags) and time.perf_counter() < deadline:
        time.sleep(0)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
