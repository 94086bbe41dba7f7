"""``DistributedCurvature``: :class:`tensorcurv.Curvature` over a data-parallel process group.

    comm = tensorcurv.distributed.init()                       # torchrun env; gloo on CPU, nccl on GPU
    curv = DistributedCurvature(model, "kfac", "ggn", comm=comm)
    curv.update(x_local, y_local, loss_fn)   # every rank: the structure of the GLOBAL batch
    curv.solve(grads, damping=1e-3)          # owners solve their layers, one all-reduce shares them

Fit (``fit_stats``): statistics are re-scaled to the global loss scale and reduced per
structure as described in :mod:`tensorcurv.distributed.reduce` (statistics that add up over
samples all-reduced, with any shared basis from the owner; any other structure gathered and
fitted by its owner, its state broadcast; a model structure that couples the layers, ``two_level``,
gathered and fitted on rank 0). Owners come from :mod:`tensorcurv.distributed.assignment`
(``assignment="cost"`` or ``"round_robin"``, costs from ``Structure.fit_flops``), fixed for the run
(shapes only), so warm starts stay on one rank.

Solve (``solve_mode``):

* ``owner`` (default, KAISA's "communicate the preconditioned gradient"): the owner of each layer
  solves it (its cached eigendecompositions exist on that rank only), the results are summed into
  a zero-initialised flat buffer by one all-reduce: ``Σ mn`` numbers per step, never more than
  broadcasting the decompositions (``n² + m² ≥ 2mn``), and the decomposition work is split.
* ``local``: every rank solves every layer (no communication, redundant decompositions).

``comm.comm_dtype`` (e.g. ``torch.float32``) sends the broadcast results (gathered structures'
tensors, preconditioned gradients) in a lower precision; every rank, the owner included, then uses
the rounded values, so the ranks stay identical.

Exactness: for ``kind`` ``ggn`` and ``empirical`` every rank's structure equals the single-process
fit on the concatenated global batch up to rounding. Over training steps that rounding (the global
gradient is a sum of per-rank partial sums) is carried on by each structure's own conditioning:
rounding level for most, far more for ``kron_sum``'s spectral PSD certificate
(docs/results/distributed_drift.md). ``mc`` draws its labels per rank, from the
curvature's generator (the same seed on each rank unless the caller seeds per rank), so it is a
different (equally valid) Monte-Carlo estimate.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from tensorcurv.core.capture import CaptureResult
from tensorcurv.core.losses import LossSpec, as_loss_spec
from tensorcurv.core.options import Option
from tensorcurv.core.stats import LayerStats
from tensorcurv.curvature import Curvature
from tensorcurv.distributed import reduce as R
from tensorcurv.distributed.assignment import assign
from tensorcurv.distributed.comm import Comm
from tensorcurv.structures.base import check_damping, check_decay


class SolveMode(Option):
    """Where a layer's solve runs: on its ``owner`` rank (then broadcast) or ``local``ly on every rank."""

    OWNER = "owner"
    LOCAL = "local"


class DistributedCurvature(Curvature):
    """Data-parallel :class:`Curvature` (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        structure: str = "kfac",
        kind: str = "ggn",
        *,
        comm: Comm,
        assignment: str | None = None,
        solve_mode: str | None = None,
        **kwargs: Any,
    ) -> None:
        assignment = assignment or comm.assignment
        solve_mode = solve_mode or comm.solve_mode
        solve_mode = SolveMode.parse(solve_mode, "solve_mode")
        super().__init__(model, structure, kind, **kwargs)
        self.comm, self.solve_mode, self.assignment = comm, solve_mode, assignment
        costs = {name: b.fit_flops() for name, b in self.blocks.items()}
        self.owner: dict[str, int] = assign(costs, comm.world_size, assignment)
        self._reduction: str | None = None
        self.last_comm_time = 0.0
        self.last_comm_bytes = 0
        self._check_agreement()

    def _check_agreement(self) -> None:
        """Fail early and clearly if the ranks built different curvatures (model or structure differ)."""
        mine = (self.structure, self.kind, [(k, b.shape) for k, b in self.blocks.items()])
        every = self.comm.all_gather_object(mine)
        for r, other in enumerate(every):
            if other != mine:
                raise RuntimeError(
                    f"rank {self.comm.rank} and rank {r} disagree on the curvature: "
                    f"{mine} vs {other}; every rank must build the same model and structure"
                )

    # ------------------------------------------------------------------ capture & fit
    def capture(
        self, inputs: Tensor, targets: Tensor, loss_fn: LossSpec | nn.Module | str, accumulate_grad: bool = False
    ) -> CaptureResult:
        self._reduction = as_loss_spec(loss_fn).reduction
        return super().capture(inputs, targets, loss_fn, accumulate_grad)

    def fit_stats(self, stats: Mapping[str, Any], decay: float | None = None) -> None:
        """Fit every block to the global batch whose local share is ``stats`` (collective)."""
        if decay is not None:
            check_decay(decay)
        comm = self.comm
        first = next(iter(stats.values()))
        finite = True
        for st in stats.values():
            try:
                st.check_finite()
            except ValueError:
                finite = False
        sizes = comm.all_gather_int(first.N if finite else -1)  # also tells every rank who is broken
        if min(sizes) < 0:
            bad = [r for r, s in enumerate(sizes) if s < 0]
            if not finite:
                for st in stats.values():
                    st.check_finite()  # raises with the layer name
            raise ValueError(f"non-finite statistics on rank(s) {bad}; no block changed")
        reduction = self._reduction or R.infer_reduction(first)
        n_local, n_global = sizes[comm.rank], sum(sizes)
        scale = R.global_scale(reduction, n_global)
        st_g = {k: R.with_scale(st, scale) for k, st in stats.items()}
        bytes0, secs0 = comm.bytes, comm.seconds
        t0 = time.perf_counter()
        if self.model_structure.block_diagonal:
            self._fit_layers(st_g, sizes, n_local, n_global, decay)
        else:
            self._fit_coupled(st_g, sizes, decay)
        self.last_fit_time = time.perf_counter() - t0
        self.last_comm_time = comm.seconds - secs0
        self.last_comm_bytes = comm.bytes - bytes0

    def _fit_layers(self, st, sizes, n_local, n_global, decay) -> None:
        comm, blocks = self.comm, self.blocks
        # 1. one all-reduce of every additive structure's batch tensors (Structure.additive_statistics)
        parts = {k: b.additive_statistics(st[k], n_local / n_global) for k, b in blocks.items()}
        additive = [k for k in blocks if parts[k] is not None]
        reduced = R.all_reduce_dicts(comm, {k: p for k, p in parts.items() if p is not None})
        # 2. owners compute the shared bases (e.g. ekfac's eigenbasis) and broadcast them; one
        #    all-reduce of the statistics projected on them
        bases = self._shared_bases(additive, reduced, decay)
        projected = R.all_reduce_dicts(comm, {k: blocks[k].additive_projection(st[k], bases[k]) for k in additive})
        for k in additive:
            blocks[k].load_reduced(reduced[k], bases[k], projected[k], decay)
        # 3. any other structure: gather on the owner, owner fits, broadcast the tensors
        gathered = [k for k in blocks if parts[k] is None]
        for k in gathered:
            owner = self.owner[k]
            full = R.gather_stats(comm, st[k], owner, sizes)
            if full is not None:
                tb = time.perf_counter()
                blocks[k].fit(full) if decay is None else blocks[k].update(full, decay)
                blocks[k].fit_time = time.perf_counter() - tb
        for r in range(comm.world_size):
            mine = [k for k in gathered if self.owner[k] == r]
            if not mine:
                continue
            payload = None
            if comm.rank == r:
                payload = {k: _cast_state(blocks[k].state_dict(), comm.comm_dtype) for k in mine}
            payload = comm.broadcast_object(payload, src=r)
            for k in mine:  # the owner too takes the (possibly rounded) broadcast values
                blocks[k].load_state_dict(_cast_state(payload[k], st[k].a.dtype))

    def _shared_bases(self, layers, reduced, decay) -> dict[str, dict[str, Tensor]]:
        """``Structure.shared_basis`` of every layer in ``layers``, computed by its owner and broadcast
        (one broadcast per owning rank)."""
        comm, blocks = self.comm, self.blocks
        like = {k: blocks[k].shared_basis_like(reduced[k]) for k in layers}
        bases: dict[str, dict[str, Tensor]] = {k: {} for k in layers}
        for r in range(comm.world_size):
            mine = [k for k in layers if like[k] and self.owner[k] == r]
            if not mine:
                continue
            if comm.rank == r:
                computed = {k: blocks[k].shared_basis(reduced[k], decay) for k in mine}
                local = [computed[k][name] for k in mine for name in like[k]]
            else:
                local = [t for k in mine for t in like[k].values()]
            got = iter(comm.broadcast(local, src=r))
            for k in mine:
                bases[k] = {name: next(got) for name in like[k]}
        return bases

    def _fit_coupled(self, st, sizes, decay) -> None:
        """Model structures that couple the layers (``two_level``): rank 0 gathers every layer, fits,
        broadcasts the state."""
        comm = self.comm
        full = {k: R.gather_stats(comm, s, 0, sizes) for k, s in st.items()}
        state = None
        if comm.rank == 0:
            ms = self.model_structure
            gathered = cast(dict[str, LayerStats], full)  # rank 0 receives every layer's statistics
            ms.fit(gathered) if decay is None else ms.update(gathered, decay)
            state = ms.state_dict()
        state = comm.broadcast_object(state, src=0)
        if comm.rank != 0:
            self.model_structure.load_state_dict(state)

    def _fit_fallback(self, inputs: Tensor, res: CaptureResult, decay: float | None) -> None:
        """Exact diagonal of uncovered parameters for the global batch: local sum at the global
        scale, all-reduced, then the same EMA as :class:`Curvature`."""
        sizes = self.comm.all_gather_int(inputs.shape[0])
        reduction = self._reduction or "mean"
        old, self.fallback_diag = self.fallback_diag, {}
        saved = self._batch_scale
        self._batch_scale = R.global_scale(reduction, sum(sizes))
        try:
            super()._fit_fallback(inputs, res, None)
        finally:
            self._batch_scale = saved
        names = list(self.fallback_diag)
        batch = dict(zip(names, self.comm.all_reduce([self.fallback_diag[n] for n in names])))
        if decay is None:
            self.fallback_diag = batch
        else:
            self.fallback_diag = {n: decay * old[n] + (1 - decay) * D if n in old else D for n, D in batch.items()}

    # ------------------------------------------------------------------ solve
    def solve(self, grads=None, damping: float = 1e-3, out=None):
        """``(Ĉ + λI)^{-1} g``; ``owner`` mode (block-diagonal structures): each rank solves the layers
        it owns, one all-reduce of the preconditioned gradients (collective: every rank must call it).
        ``out``: as :meth:`Curvature.solve`."""
        if self.solve_mode == "local" or not self.model_structure.block_diagonal:
            return super().solve(grads, damping, out)
        check_damping(damping)
        self._check_fitted()
        rank, blocks, owner = self.comm.rank, self.blocks, self.owner

        def owned(mats):
            return {
                k: blocks[k].solve(M, damping) if owner[k] == rank else torch.zeros_like(M) for k, M in mats.items()
            }

        def fb(n, v):
            return v / (self.fallback_diag[n] + damping) if self.fallback == "diagonal" else v

        res = self.routing.apply(grads, fb, owned)
        as_dict = isinstance(res, Mapping)
        vals = list(res.values()) if as_dict else list(res)
        covered = {id(p) for ad in self.adapters.values() for _, p in ad.params()}
        idx = [i for i, p in enumerate(self.params) if id(p) in covered]
        dtype = self.comm.comm_dtype
        send = [vals[i].to(dtype) if dtype is not None else vals[i] for i in idx]
        for i, t in zip(idx, self.comm.all_reduce(send)):
            vals[i] = t.to(vals[i].dtype)
        if out is not None:
            outs = [out[n] for n, _ in self.named_params] if isinstance(out, Mapping) else list(out)
            for o, v in zip(outs, vals):
                if o is not v:
                    o.copy_(v)
            vals = outs
        if as_dict:
            return dict(zip(res.keys(), vals))
        return vals


def _cast_state(state: Mapping[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    """A structure's ``state_dict`` with its floating ``tensors`` in ``dtype`` (None: unchanged); the rest
    (generator state, PSD bounds, ...) as is, so every rank holds the owner's whole state."""
    if dtype is None:
        return dict(state)
    cast = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in state["tensors"].items()}
    return {**state, "tensors": cast}


def world_batch(x: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s contiguous share of a global batch (``torch.tensor_split``): concatenated in
    rank order the shards are the global batch, which is what the exactness guarantee assumes."""
    return torch.tensor_split(x, world_size)[rank]
