"""Make every rank's fitted structure equal the single-process fit on the *global* batch.

Rank ``r`` holds ``N_r`` samples of a global batch of ``N = Σ_r N_r``; its :class:`LayerStats`
carry the local loss scale ``c_r`` (``1/N_r`` for a mean-reduced loss, ``1`` for a sum). The global
block is ``C = c Σ_{all s} vec(G_s)vec(G_s)ᵀ`` with ``c = 1/N`` (mean) or ``1`` (sum). Each rank
therefore re-scales its statistics to ``c`` (:func:`with_scale`), after which every quantity below
is a plain sum over ranks.

Two plans, chosen by what the structure offers (``Structure.additive_statistics``; numbers per
layer per fit; weight ``(m, n)``, ``T`` positions, ``K`` backward columns, ``W`` ranks):

* ``additive`` (``kfac``, ``ekfac``, ``dense``, ``diagonal``): the batch tensors of the fit add up
  over samples. Every rank computes its shard's part (terms that are per-sample means, like
  K-FAC's ``A``, weighted by ``N_r/N``) and one all-reduce sums them: ``n² + m²`` numbers for
  ``kfac`` (dense ``(mn)²``, diagonal ``mn``); the volume does not grow with the batch. A structure
  whose fit also needs a basis computed from the sums (``ekfac``: ``Q_A, Q_G`` from the summed
  factors) has the layer's owner compute it (``Structure.shared_basis``) and broadcast it, which
  makes the basis identical on all ranks by construction; the statistics projected on it
  (``ekfac``'s core ``S``, ``mn``) are all-reduced in a second round (``additive_projection``).
* ``gather`` (every other structure: ``kron_sum``/``kpsvd``, ``tucker``, ``tt``, and model-level
  structures that couple the layers, ``two_level``): the per-sample factors are gathered on the layer's owner
  (``N·T·(n + K·m)`` numbers), the owner runs the structure's own ``fit``/``update`` on the global statistics (so any
  fit — power iteration, Gram form, ALS, warm starts — is the single-process computation), and
  broadcasts the structure's whole ``state_dict()`` (tensors: ``r(n² + m²)`` for ``kron_sum``; plus
  its start generator and certified PSD intervals, so that every rank, and rank 0's checkpoint,
  holds what the owner's next ``update`` uses). The alternative — making
  every implicit product ``R(C)x`` an all-reduce of ``n²`` (or ``m²``) numbers — costs
  ``2·iters·p·(n² + m²)`` numbers and ``2·iters`` latency-bound collectives per layer, and needs
  every rank to run the same iteration; gathering wins unless ``N·T·(n + K m)`` exceeds that (large
  conv layers at large batch), see ``scripts/bench_distributed.py`` for the measured volumes.

``update(decay)`` (running averages) is reproduced exactly: ``additive`` structures apply their EMA
to the reduced tensors (``Structure.load_reduced``; ``ekfac`` re-projects the old core into the new
basis as its ``_update`` does); ``gather`` calls the structure's own ``update``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats
from tensorcurv.distributed.comm import Comm


def infer_reduction(stats: LayerStats) -> str:
    """``mean`` if ``scale = 1/N``, ``sum`` if ``scale = 1`` (ambiguous for ``N = 1``: ``mean``)."""
    if math.isclose(stats.scale * stats.N, 1.0, rel_tol=1e-12):
        return "mean"
    if stats.scale == 1.0:
        return "sum"
    raise ValueError(
        f"layer {stats.name!r}: scale {stats.scale} is neither 1/N nor 1; pass the loss reduction explicitly"
    )


def global_scale(reduction: str, n_global: int) -> float:
    return 1.0 / n_global if reduction == "mean" else 1.0


def with_scale(stats: LayerStats, scale: float) -> LayerStats:
    """The same samples with another loss scale (the global one)."""
    return LayerStats(a=stats.a, g=stats.g, scale=scale, name=stats.name)


def all_reduce_dicts(comm: Comm, parts: Mapping[str, Mapping[str, Tensor]]) -> dict[str, dict[str, Tensor]]:
    """``{layer: {name: Σ_ranks tensor}}`` of every layer's named tensors, in one all-reduce."""
    keys = [(k, name) for k, d in parts.items() for name in d]
    out: dict[str, dict[str, Tensor]] = {k: {} for k in parts}
    for (k, name), t in zip(keys, comm.all_reduce([parts[k][name] for k, name in keys])):
        out[k][name] = t
    return out


def pack_stats(st: LayerStats) -> Tensor:
    """``(N, T·n + K·T·m)`` rows: one sample's ``a`` and ``g`` side by side (for one gather)."""
    return torch.cat([st.a.reshape(st.N, -1), st.g.reshape(st.N, -1)], dim=1)


def unpack_stats(rows: Tensor, like: LayerStats, scale: float) -> LayerStats:
    T, n, K, m = like.T, like.n, like.K, like.m
    a = rows[:, : T * n].reshape(-1, T, n)
    g = rows[:, T * n :].reshape(-1, K, T, m)
    return LayerStats(a=a.contiguous(), g=g.contiguous(), scale=scale, name=like.name)


def gather_stats(comm: Comm, st: LayerStats, owner: int, sizes: Sequence[int]) -> LayerStats | None:
    """The global-batch statistics of one layer on its owner (rank order = global sample order)."""
    rows = comm.gather_rows(pack_stats(st), owner, sizes)
    return None if rows is None else unpack_stats(rows, st, st.scale)


# ---------------------------------------------------------------------- gradients
def reduce_gradients(
    comm: Comm, grads: Sequence[Tensor | None], loss: Tensor, n_local: int, reduction: str, flag: bool = False
) -> tuple[list[Tensor | None], Tensor, bool]:
    """Global-batch gradient and loss from per-rank ones, in one all-reduce.

    Mean loss: ``∇L = Σ_r (N_r/N) ∇L_r`` (the plain average when shards are equal); sum: ``Σ_r ∇L_r``.
    ``flag`` (e.g. "my statistics are non-finite") is OR-ed over ranks so that all ranks skip together.
    """
    w = float(n_local) if reduction == "mean" else 1.0
    present = [g for g in grads if g is not None]
    like = loss.detach().reshape(1)
    extra = torch.stack(
        [loss.detach().to(like.dtype) * w, like.new_tensor(float(n_local)), like.new_tensor(1.0 if flag else 0.0)]
    )
    parts = [g.to(extra.dtype) * w for g in present] + [extra]
    red = comm.all_reduce(parts)
    n_global = float(red[-1][1])
    div = n_global if reduction == "mean" else 1.0
    it = iter(red[:-1])
    out = [None if g is None else (next(it) / div).to(g.dtype) for g in grads]
    return out, red[-1][0] / div, bool(red[-1][2] > 0)


def sync_step(
    comm: Comm, named_params: Sequence[tuple[str, Any]], loss: Tensor, n_local: int, reduction: str, res: Any = None
) -> tuple[Tensor, bool]:
    """One training step's agreement across ranks: ``p.grad`` ← global-batch gradient, the global
    loss, and whether *any* rank captured non-finite statistics (so all ranks skip together)."""
    bad_stats = False
    if res is not None:
        bad_stats = any(
            not (bool(torch.isfinite(st.a.sum())) and bool(torch.isfinite(st.g.sum()))) for st in res.stats.values()
        )
    params = [p for _, p in named_params]
    grads, loss, any_bad = reduce_gradients(comm, [p.grad for p in params], loss, n_local, reduction, bad_stats)
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g
    return loss, any_bad


def reduce_loss(comm: Comm, value: float, n_local: int, reduction: str) -> float:
    """Global-batch loss from per-rank losses (``Σ_r N_r L_r / N`` for mean, ``Σ_r L_r`` for sum)."""
    w = float(n_local) if reduction == "mean" else 1.0
    t = comm.all_reduce([torch.tensor([value * w, float(n_local)], dtype=torch.float64)])[0]
    return float(t[0] / t[1]) if reduction == "mean" else float(t[0])


def global_product(
    comm: Comm, product: Callable[[Tensor], Tensor], n_local: int, reduction: str
) -> Callable[[Tensor], Tensor]:
    """``v ↦ C v`` of the global batch from this rank's ``product`` (``C_r v`` of its ``N_r`` samples, loss
    reduced by ``reduction``): ``Σ_r (N_r/N) C_r v`` for a mean, ``Σ_r C_r v`` for a sum; one all-reduce per
    product, and the same result on every rank (collective: every rank calls it equally often)."""
    n_global = sum(comm.all_gather_int(int(n_local)))
    w = n_local / n_global if reduction == "mean" else 1.0
    return lambda v: comm.all_reduce([w * product(v)])[0]
