"""``tucker``: the rearranged block as a higher-order tensor in Tucker form.

The split tensor ``𝒯`` of the block (modes ``n_1..n_d, m_1..m_e`` of sizes ``x_l²``, see ``base.py``) is

    𝒯 ≈ 𝒢 ×_1 U_1 ⋯ ×_D U_D,    U_l: (x_l², p_l) orthonormal,  𝒢: (p_1, …, p_D)

fitted by HOOI on implicit contractions (small blocks: formed and fitted by tensorly, ``dense_fit.py``).
The operator is the symmetric part ``½(Ĉ + Ĉᵀ)``; ``psd="shift"`` (default) adds ``μI``,
``μ = max(0, −λ_min)``. ``solve``: PCG on ``Ĉ + (λ + μ)I`` (exact Tikhonov damping; ``exact_solve = False``).

The mathematics (fit, symmetry, PSD shift, running average): docs/structures/tucker.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import opt_einsum as oe
import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats
from tensorcurv.structures.base import register
from tensorcurv.structures.split import dense_fit as dtf
from tensorcurv.structures.split.base import (
    SplitFormat,
    SplitHparams,
    SplitTensor,
    as_tensor,
    contract,
    from_tensor,
    sweep_budget,
    sym_shift,
)


@dataclass
class TuckerHparams(SplitHparams):
    ranks: Any = 4
    """Multilinear ranks: an int (capped at x_l² per mode) or a list with one rank per mode."""

    def __post_init__(self) -> None:
        self._check_common("tucker")


@register("tucker")
class Tucker(SplitFormat):
    """Tucker decomposition of the split rearranged block; PCG solve."""

    Hparams = TuckerHparams

    def __init__(self, shape, hparams=None):
        super().__init__(shape, hparams)
        hp = self.hparams
        sizes = self.sin + self.sout
        if isinstance(hp.ranks, (list, tuple)):
            if len(hp.ranks) != len(sizes):
                raise ValueError(f"tucker.ranks has {len(hp.ranks)} entries for {len(sizes)} modes {sizes}")
            bad = [(r, x * x) for r, x in zip(hp.ranks, sizes) if r > x * x]
            if bad:
                raise ValueError(f"tucker.ranks {list(hp.ranks)} exceed the mode sizes {[x * x for x in sizes]}")
            self.ranks = list(hp.ranks)
        else:
            self.ranks = [min(hp.ranks, x * x) for x in sizes]

    def _hooi(self, stats: LayerStats, init: list[Tensor] | None):
        hp = self.hparams
        T = SplitTensor(stats, self.sin, self.sout, hp.chunk)
        D, sizes = T.D, T.sizes
        dt = stats.a.dtype
        if init is None:
            U = [
                torch.linalg.qr(
                    torch.randn(x * x, p, generator=self.generator, dtype=torch.float64).to(dt).to(stats.a.device)
                )[0]
                for x, p in zip(sizes, self.ranks)
            ]
        else:
            U = [u.clone() for u in init]
        ps = [T.symbol() for _ in range(D)]
        energy_prev, it, change = None, 0, math.inf
        while True:
            it += 1
            for l in range(D):
                if self.ranks[l] == sizes[l] ** 2 and it > 1:
                    continue
                ops = [
                    (U[k].reshape(sizes[k], sizes[k], -1), T.rows[k] + T.cols[k] + ps[k]) for k in range(D) if k != l
                ]
                Y = T.contract(ops, T.rows[l] + T.cols[l] + "".join(ps[k] for k in range(D) if k != l))
                Y = Y.reshape(sizes[l] ** 2, -1)
                if self.ranks[l] == sizes[l] ** 2:
                    U[l] = torch.eye(sizes[l] ** 2, dtype=dt, device=Y.device)
                else:
                    U[l] = torch.linalg.svd(Y, full_matrices=False)[0][:, : self.ranks[l]]
            ops = [(U[k].reshape(sizes[k], sizes[k], -1), T.rows[k] + T.cols[k] + ps[k]) for k in range(D)]
            core = T.contract(ops, "".join(ps))
            energy = float(core.pow(2).sum())
            if energy_prev is not None:
                change = abs(energy - energy_prev) / max(energy, 1e-300)
            energy_prev = energy
            if change <= hp.tol or it >= sweep_budget(hp, init is not None):
                break
        self.last_fit = {
            "iterations": it,
            "converged": change <= hp.tol,
            "energy_change": change,
            "splits_in": self.sin,
            "splits_out": self.sout,
            "ranks": self.ranks,
        }
        return U, core

    def fit(self, stats):
        self._check_stats(stats)
        self.U, self.core = self._fit_batch(stats, (self.core, self.U) if self.fitted else None, update=False)
        self.fitted = True
        self._repair()
        return self

    def _fit_batch(self, stats: LayerStats, previous: tuple | None, update: bool):
        """Factors and core of one batch, by ``method``: the implicit HOOI (warm-started from the
        ``previous`` factors when given), or tensorly's HOOI on the formed ``𝒯`` — from the truncated HOSVD
        in ``fit``, from the ``previous`` format in ``update`` (at most ``warm_max_iter`` sweeps)."""
        if not dtf.use_tensorly(self.name, self.hparams.method, self.shape):
            U, core = self._hooi(stats, previous[1] if previous is not None else None)
            self.last_fit["method"] = "implicit"
            return U, core
        hp = self.hparams
        T = dtf.split_tensor(stats, self.sin, self.sout, hp.chunk)
        init = previous if update else None
        U, core, info = dtf.tucker_hooi(T, self.ranks, hp.tol, sweep_budget(hp, init is not None), init)
        self.last_fit = {
            "method": "tensorly",
            **info,
            "splits_in": self.sin,
            "splits_out": self.sout,
            "ranks": self.ranks,
        }
        return U, core

    def _update(self, stats, decay):
        self._check_stats(stats)
        U_old, core_old = self.U, self.core
        U, core = self._fit_batch(stats, (core_old, U_old), update=True)
        proj = oe.contract(self._core_expr(), core_old, *[u.T @ uo for u, uo in zip(U, U_old)])
        self.U, self.core = U, decay * proj + (1 - decay) * core
        self._repair()
        return self

    def _core_expr(self) -> str:
        D = len(self.U)
        old = [oe.get_symbol(i) for i in range(D)]
        new = [oe.get_symbol(D + i) for i in range(D)]
        return "".join(old) + "," + ",".join(n + o for n, o in zip(new, old)) + "->" + "".join(new)

    def _mats(self):
        sizes = self.sin + self.sout
        return [u.reshape(x, x, -1) for u, x in zip(self.U, sizes)]

    def _format_mv(self, V):
        m, n = self.shape
        D = len(self.U)
        r = [oe.get_symbol(3 * l) for l in range(D)]
        c = [oe.get_symbol(3 * l + 1) for l in range(D)]
        p = [oe.get_symbol(3 * l + 2) for l in range(D)]
        expr = "".join(p) + "," + ",".join(r[l] + c[l] + p[l] for l in range(D)) + "," + "".join(c) + "->" + "".join(r)
        Vt, mats = as_tensor(V, self.sin, self.sout), self._mats()
        X = contract(expr, self.core, *mats, Vt)  # Ĉ V
        X = X + contract(expr, self.core, *[M.transpose(0, 1) for M in mats], Vt)  # + Ĉᵀ V (same cached path)
        return from_tensor(0.5 * X, m, n)

    def to_dense(self, raw: bool = False):
        """Dense ``½(Ĉ + Ĉᵀ) + μI`` (the represented operator); ``raw=True``: the fitted format ``Ĉ`` itself."""
        D = len(self.U)
        r = [oe.get_symbol(3 * l) for l in range(D)]
        c = [oe.get_symbol(3 * l + 1) for l in range(D)]
        p = [oe.get_symbol(3 * l + 2) for l in range(D)]
        expr = "".join(p) + "," + ",".join(r[l] + c[l] + p[l] for l in range(D)) + "->" + "".join(r) + "".join(c)
        dim = self.shape[0] * self.shape[1]
        M = oe.contract(expr, self.core, *self._mats()).reshape(dim, dim)
        if raw:
            return M
        return sym_shift(M, self.shift)

    def partial_traces(self) -> tuple[list[Tensor], Tensor]:
        """``P_l = Tr_{k≠l} Ĉ`` (x_l × x_l) and ``tr Ĉ``."""
        mats = self._mats()
        tr = [torch.diagonal(M, dim1=0, dim2=1).sum(-1) for M in mats]  # (p_l,)
        D = len(mats)
        P = []
        for l in range(D):
            w = self.core
            for k in reversed(range(D)):
                if k != l:
                    w = (
                        torch.tensordot(w, tr[k], dims=([k], [0]))
                        if k > l
                        else torch.tensordot(w, tr[k], dims=([k], [0]))
                    )
            P.append(torch.tensordot(mats[l], w, dims=([2], [0])))
        total = torch.trace(P[0])
        return P, total

    def tensors(self):
        if not self.fitted:
            return {}
        return {"core": self.core, **{f"U{l}": u for l, u in enumerate(self.U)}}

    def _load_tensors(self, t):
        self.core = t["core"].clone()
        self.U = [t[f"U{l}"].clone() for l in range(len(t) - 1)]

    def solve_flops(self):
        m, n = self.shape
        mv = 4 * self.core.numel() * m * n if self.fitted else 0  # Ĉ V and Ĉᵀ V
        return self.last_solve.get("iterations", 20) * (mv + 4 * m * n * (m + n))
