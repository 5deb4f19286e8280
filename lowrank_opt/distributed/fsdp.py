"""FSDP2 and HSDP: factors that ``fully_shard`` turned into DTensors sharded on their first dimension.

Owner-computes. Every rule needs a pair's whole frozen basis ``F`` (k, r), so a pair's step cannot
be split across its shards; instead each pair is owned by one rank of the shard group, balanced
as :class:`~lowrank_opt.distributed.PairSharded` balances them (:func:`assign_pairs`):

1. the owned stepping pairs are cut into buckets of at most ``bucket_bytes`` of whole tensors per
   rank (:meth:`FSDP2.buckets`); for each bucket in turn, the shards of its pairs' factors and
   gradients (and, for a rule that reads it whole, the base weight ``W0``) are gathered to their
   owners only, one ``gather`` per owner and dtype, the next bucket's gathers in flight while the
   current one is computed (:meth:`FSDP2.bucketed`);
2. the owner steps its pairs exactly as a single process would, on whole plain tensors; its
   statistics are plain, whole tensors that live on it alone, as in the pair-sharded mode;
3. after the step, the owner scatters the moved factor's rows back to their ranks, together with
   its new ``r x r`` basis Gram, which every rank records (one ``scatter`` per owner and dtype
   for every bucket).

Per rank, statistics and step compute are those of about ``1 / world`` of the pairs, and in-step
memory (whole factors, gradients and the step's temporaries) that of two buckets of them: they
fall with the shard group's size, also when it exceeds ``r`` (a statistic shaped like ``A``
(r, n) is never split by rows).
Communication per step: ``r (m + n)`` elements of factors and as many of gradients per stepping
pair in, ``r (m or n)`` plus ``r^2`` per moved factor out. A rule that reads ``W0`` only through
``||W0||^2`` and ``<W0, B A>`` (LoFT-Adafactor) gets them reduced from the shards at the steps it
asks for (:meth:`FSDP2.base_products`): ``r n`` elements per pair, never ``W0``; ``m n`` more per
pair for a rule that reads ``W0`` whole. The finiteness verdict is one all-reduce over every rank; clipping adds one
all-reduce over the shard group for the pairs and one for the other parameters.

HSDP (a 2-D mesh, ``(Replicate(), Shard(0))``): ownership is over the shard dimension; each
replica computes the same steps on gradients that FSDP already averaged over the replicate
dimension, so norms are summed over the shard group only, and the finiteness verdict is agreed
over all ranks. Parameters that are not LoRA factors are stepped by the base optimizer on their
DTensors, as FSDP2 does.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..engine import finite_flags
from ..layout import BASIS_GRAM_KEY, STEP_KEY
from ..pairs import LoRAPair, base_products_from
from ..quantized import project_rows
from ..rule import CalibrationRule
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

# A tensor this large is gathered by a collective of its own (bandwidth-bound anyway), without a copy.
ALONE_BYTES = 2**20

State = MutableMapping[Tensor, dict[str, Any]]


class FSDP2(DistributedStrategy):
    """The mode for factors sharded by ``fully_shard`` (chosen automatically for DTensor factors).

    Args:
        bucket_bytes: the most bytes of whole tensors (factors, gradients) of the pairs a rank
            steps at once: the step runs bucket by bucket, the next one gathered while the current
            one computes, unless it must run whole (``transactional=True``, or a rule that lets
            the base optimizer move the factors). Also the largest payload of one ``scatter``.
        full_state_dict: ``state_dict()`` gathers every pair's statistics to every rank (see
            :class:`~lowrank_opt.distributed.PairSharded`); for flows that save one rank's state
            dict for all.

    Factors must be ``(Shard(0),)`` on a 1-D mesh (FSDP2) or ``(Replicate(), Shard(0))`` on a 2-D
    mesh (HSDP). Uneven and empty shards (``r < world_size``) follow DTensor's chunking.
    """

    replicated = False  # each pair is owned by one rank, assigned at construction
    restorable = False  # owners broadcast or scatter after the step: a raising rank strands its peers

    def __init__(self, bucket_bytes: int = 25 * 2**20, *, full_state_dict: bool = False) -> None:
        if not isinstance(bucket_bytes, int) or bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be a positive integer, got {bucket_bytes!r}")
        self.bucket_bytes = bucket_bytes
        self.full_state_dict = full_state_dict
        self.owners: list[int] = []
        self.rank = 0
        self.shards = 1
        self._shard_group: dist.ProcessGroup | None = None
        self._shadows: dict[Tensor, nn.Parameter] = {}  # DTensor factor -> whole copy, during a step
        self._working: dict[Tensor, nn.Parameter] = {}  # DTensor factor -> its working factor, kept
        self._work_state: dict[Tensor, dict[str, Any]] = {}

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
            whole = self._start_gather(self._wanted(pairs, stepping, with_bases)).wait()
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
        """One bucket after another, whole on their owners; the next bucket's gathers are in flight
        while the consumer computes on the current one, so at most two buckets are whole at once."""
        pending = self._start_gather(self._wanted(pairs, buckets[0], with_bases)) if buckets else None
        try:
            for k, bucket in enumerate(buckets):
                assert pending is not None
                whole, pending = pending.wait(), None
                if k + 1 < len(buckets):
                    pending = self._start_gather(self._wanted(pairs, buckets[k + 1], with_bases))
                with self._working_set(pairs, state, whole, bucket) as work:
                    yield work
                del whole
        finally:
            if pending is not None:  # closed early (a verdict every rank shares): drain the gathers in flight
                pending.wait()

    def _wanted(self, pairs: Sequence[LoRAPair], indices: Sequence[int], with_bases: bool) -> list[tuple[int, Tensor]]:
        """``(owner, DTensor)`` of every tensor the pairs ``indices`` need whole."""
        return [(self.owners[i], t) for i in indices for t in self._pair_tensors(pairs[i], with_bases)]

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
        self._shadows = shadows
        try:
            originals: dict[Tensor, Tensor] = {shadow: factor for factor, shadow in shadows.items()}
            yield Materialised(work_pairs, work_state, originals, None if indices is None else list(indices))
            with torch.no_grad():  # this rank's rows of its own pairs' gradients (clip_grad_norm_ scales them)
                for factor, shadow in shadows.items():
                    if shadow.grad is not None and isinstance(factor.grad, DTensor):
                        factor.grad.to_local().copy_(self._rows_of(shadow.grad, self.rank))
        finally:
            for shadow in shadows.values():  # the whole copies go; the objects stay for the next step
                shadow.grad = None
                shadow.data = shadow.data.new_empty(0)
            work_state.clear()
            self._shadows = {}

    def release_gradients(self, work: Materialised) -> None:
        """Drop the gathered whole gradients of the working set: ``step()`` reads ``g_hat`` from
        here on and changes no gradient, so nothing is written back to the shards."""
        for shadow in self._shadows.values():
            shadow.grad = None

    def _shadow_of(self, factor: Tensor) -> nn.Parameter:
        """The working factor that stands for the DTensor ``factor`` at every step (empty between steps)."""
        shadow = self._working.get(factor)
        if shadow is None:
            shadow = self._working[factor] = nn.Parameter(torch.empty(0, dtype=factor.dtype, device=factor.device))
        return shadow

    def record_moved(self, pairs: Sequence[LoRAPair], moved: Sequence[tuple[int, str]], state: State) -> None:
        """Scatter each moved factor's rows from its owner, with its new basis Gram, bucketed."""
        originals = {shadow: factor for factor, shadow in self._shadows.items()}
        sends: list[tuple[int, Tensor, Tensor | None]] = []  # (owner, original DTensor, whole on the owner)
        for i, side in moved:
            work = getattr(pairs[i], side)
            if self.owns(i):
                sends.append((self.owners[i], originals[work], work.detach()))
            else:
                sends.append((self.owners[i], work, None))
        grams = [state[getattr(pairs[i], side)] for i, side in moved]
        self._scatter(sends, grams)

    def base_products(self, work: Materialised, due: Sequence[int]) -> dict[int, Tensor]:
        """``(||W0||^2, <W0, B A>)`` of the due pairs, reduced from the shards of ``W0``: never gathered.

        Each rank projects its rows of ``W0`` on the same rows of the factor ``R`` that runs along
        them (``B``, whose rows ``fully_shard`` splits like those of ``W0``; or, for ``W0^T``, rows
        of ``A^T``, from ``A`` all-gathered, ``r n`` elements): ``||W0_rows||^2`` and
        ``R_rows^T W0_rows`` (r, cols), in float64. A reduce to each owner sums those of its
        pairs (in chunks of at most ``bucket_bytes`` of partials, one reduce each); the owner
        finishes ``<R^T W0, P>`` with its whole partner ``P``. A base that is not a DTensor is read
        whole by the owner.
        """
        sharded = [i for i in due if isinstance(work.pairs[i].base_weight, DTensor)]
        products = super().base_products(work, sorted(set(due) - set(sharded)))  # bases every rank holds whole
        # Reduced to each owner in turn, in chunks of at most one pair or bucket_bytes of float64
        # partials: a rank holds the partials of one owner's pairs at a time, not of every pair.
        for owner in range(self.shards):
            owned = [i for i in sharded if self.owners[i] == owner]
            for chunk in fill_buckets(owned, lambda i: 8 * _partial_size(work.pairs[i]), self.bucket_bytes):
                products.update(self._reduced_base_products(work, chunk, owner))
        return products

    def _reduced_base_products(self, work: Materialised, indices: Sequence[int], owner: int) -> dict[int, Tensor]:
        """The base products of the pairs ``indices`` (DTensor bases, all owned by ``owner``) with one
        reduce to the owner; empty on the other ranks."""
        sizes = [_partial_size(work.pairs[i]) for i in indices]
        flat = torch.empty(sum(sizes), dtype=torch.float64, device=comm_device(self._shard_group))
        for i, part in zip(indices, flat.split(sizes)):  # each pair's partial straight into its piece
            pair = work.pairs[i]
            assert pair.base_weight is not None
            original_a, original_b = (work.originals.get(f, f) for f in (pair.a, pair.b))
            if pair.base_transposed:  # rows of W0^T are columns of A, whose shards hold rows of A
                whole_a = original_a.detach().full_tensor()  # type: ignore[attr-defined]
                rows = self._rows_of(pair.matrix_a(whole_a).double().T, self.rank)
            else:  # fully_shard splits the rows of B as those of W0
                rows = pair.matrix_b(_local(original_b).detach()).double()
            base_rows = pair.base_weight.to_local()  # type: ignore[attr-defined]
            sq_norm, projected = project_rows(base_rows, rows, label=pair.name or "base_weight")
            part[0] = sq_norm
            part[1:].copy_(projected.flatten())
        dist.reduce(flat, group=self._shard_group, group_dst=owner)
        products: dict[int, Tensor] = {}
        if owner != self.rank:
            return products
        for i, summed in zip(indices, flat.split(sizes)):  # the working factors are whole here: the partner P
            pair = work.pairs[i]
            partner = pair.base_row_factors(pair.a.detach(), pair.b.detach())[1]
            products[i] = base_products_from(summed[0], summed[1:].to(partner.device), partner)
        return products

    def finite_flags(self, grads: Sequence[Tensor]) -> Tensor:
        """Checked on this rank's pieces (whole gradients of owned pairs, local shards of the
        rest), agreed over every rank with one all-reduce: the verdict is the whole tensors'."""
        return agree_flags(finite_flags([_local(g) for g in grads]), None)

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

    def _start_gather(self, items: Sequence[tuple[int, Tensor]]) -> _Gathering:
        """Issue, without waiting, the gathers of whole copies of DTensors ``(owner, dtensor)`` on
        their owners: one ``gather`` per owner and dtype in each bucket. A tensor of at least
        :data:`ALONE_BYTES` is gathered on its own, straight into its whole copy (DTensor's shards
        pad only at the end, so the ranks' padded pieces laid end to end are the whole tensor):
        no second copy of a large base weight."""
        device = comm_device(self._shard_group)
        calls: list[tuple[int, list[Tensor]]] = []
        for bucket in fill_buckets(items, lambda item: item[1].nbytes, self.bucket_bytes):
            by_key: dict[tuple[int, torch.dtype], list[Tensor]] = {}
            for owner, t in bucket:
                if t.nbytes >= ALONE_BYTES:
                    calls.append((owner, [t]))
                else:
                    by_key.setdefault((owner, t.dtype), []).append(t)
            calls += [(owner, tensors) for (owner, _), tensors in by_key.items()]
        launched = []
        for owner, tensors in calls:
            sizes = [self._padded(t) for t in tensors]
            send = torch.zeros(sum(sizes), dtype=tensors[0].dtype, device=device)
            for t, piece in zip(tensors, send.split(sizes)):
                local = _local(t).detach().reshape(-1)
                piece[: local.numel()].copy_(local)
            # The ranks' pieces land end to end in one buffer.
            buffer = (
                torch.empty(self.shards * send.numel(), dtype=send.dtype, device=device) if owner == self.rank else None
            )
            received = list(buffer.split(send.numel())) if buffer is not None else None
            work = dist.gather(send, received, group=self._shard_group, group_dst=owner, async_op=True)
            launched.append(_Gather(work, send, buffer, sizes, tensors))
        return _Gathering(self, launched)

    def _unpack(self, call: _Gather, out: dict[Tensor, Tensor]) -> None:
        """On the owner of a completed gather, assemble each whole tensor from the ranks' rows."""
        buffer, tensors = call.buffer, call.tensors
        if buffer is None:
            return
        if len(tensors) == 1:  # one tensor: the buffer is already the whole, padded at the end
            t = tensors[0]
            out[t] = buffer[: t.numel()].view(t.shape).to(t.device)
            return
        pieces = [flat.split(call.sizes) for flat in buffer.split(sum(call.sizes))]
        for k, t in enumerate(tensors):
            row = t.numel() // max(t.shape[0], 1)
            parts = [pieces[j][k][: self._rows(t.shape[0], j)[1] * row] for j in range(self.shards)]
            out[t] = torch.cat(parts).view(t.shape).to(t.device)

    def _scatter(self, sends: Sequence[tuple[int, Tensor, Tensor | None]], entries: Sequence[dict[str, Any]]) -> None:
        """Each moved factor's rows from its owner into every rank's shard, and its new basis Gram
        (``entries[k][BASIS_GRAM_KEY]``, ``r x r``) into every rank's state: one ``scatter`` per
        owner and dtype in each bucket."""
        device = comm_device(self._shard_group)
        indexed = [(owner, original) for owner, original, _ in sends]
        position = {id(original): k for k, (_, original) in enumerate(indexed)}
        for bucket in fill_buckets(indexed, lambda item: item[1].nbytes, self.bucket_bytes):
            calls: dict[tuple[int, torch.dtype], list[tuple[int, bool]]] = {}  # -> (send index, is the Gram)
            for owner, original in bucket:
                k = position[id(original)]
                gram = entries[k][BASIS_GRAM_KEY]
                calls.setdefault((owner, original.dtype), []).append((k, False))
                calls.setdefault((owner, gram.dtype), []).append((k, True))
            for (owner, dtype), members in calls.items():
                sizes = [
                    entries[k][BASIS_GRAM_KEY].numel() if is_gram else self._padded(sends[k][1])
                    for k, is_gram in members
                ]
                received = torch.empty(sum(sizes), dtype=dtype, device=device)
                chunks = None
                if owner == self.rank:
                    chunks = []
                    for j in range(self.shards):
                        flat = torch.zeros_like(received)
                        for (k, is_gram), piece in zip(members, flat.split(sizes)):
                            whole = sends[k][2]
                            assert whole is not None  # this rank owns the pair
                            value = entries[k][BASIS_GRAM_KEY] if is_gram else self._rows_of(whole, j)
                            piece[: value.numel()].copy_(value.reshape(-1))
                        chunks.append(flat)
                dist.scatter(received, chunks, group=self._shard_group, group_src=owner)
                with torch.no_grad():
                    for (k, is_gram), piece in zip(members, received.split(sizes)):
                        original = sends[k][1]
                        if is_gram:
                            if owner != self.rank:
                                entry = entries[k]
                                entry[BASIS_GRAM_KEY] = piece.view_as(entry[BASIS_GRAM_KEY]).to(
                                    entry[BASIS_GRAM_KEY].device, copy=True
                                )
                            continue
                        local = _local(original)
                        local.copy_(piece[: local.numel()].view_as(local))
                del received, chunks  # before the next call's buffers


@dataclass
class _Gather:
    """One gather in flight: its work handle, what it sends, and (on the owner) where it lands."""

    work: Any
    send: Tensor | None  # kept alive until the collective completes
    buffer: Tensor | None
    sizes: list[int]
    tensors: list[Tensor]


@dataclass
class _Gathering:
    """The gathers of one bucket, issued; :meth:`wait` gives this rank's whole tensors, keyed by DTensor."""

    strategy: FSDP2
    calls: list[_Gather]

    def wait(self) -> dict[Tensor, Tensor]:
        for call in self.calls:  # every send buffer goes (the work holds it too) before anything is unpacked
            call.work.wait()
            call.work = call.send = None
        out: dict[Tensor, Tensor] = {}
        while self.calls:  # each receive buffer goes as soon as its tensors are unpacked
            self.strategy._unpack(self.calls.pop(0), out)
        return out


def _partial_size(pair: LoRAPair) -> int:
    """Float64 numbers of a pair's base-product partial: ``||W0_rows||^2`` and ``R_rows^T W0_rows``
    (r, columns of ``W0`` as stored: ``n``, or ``m`` for ``W0^T``)."""
    m, n = pair.full_shape
    return 1 + pair.rank * (m if pair.base_transposed else n)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
