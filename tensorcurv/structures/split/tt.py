"""``tt``: the split rearranged block (see ``base.py``) in tensor-train / MPO form.

    Ĉ[(r_1..r_D), (c_1..c_D)] = Σ_b Π_l core_l[b_{l-1}, r_l, c_l, b_l],   core_l: (ρ_{l-1}, x_l, x_l, ρ_l)

with modes ``(n_1..n_d, m_1..m_e)`` (``torch.kron`` ordering of the column-major vec), fitted by one-site
ALS sweeps on implicit contractions (small blocks: tensorly's TT-SVD). Two cores with TT-rank r is
``kron_sum(r)`` with ``psd="none"``; all TT-ranks 1 give ``F_1 ⊗ ⋯ ⊗ F_D``, solved exactly by eigen-
decompositions. Otherwise ``solve`` is PCG on the symmetric part plus ``(λ + μ)I`` (``psd`` as ``tucker``).

The mathematics: docs/structures/tt.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import opt_einsum as oe
import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg.krylov import kron_eig_solve
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
class TTHparams(SplitHparams):
    ranks: Any = 2
    """TT-ranks: an int (capped per bond at its maximum) or a list with one rank per bond (D − 1)."""

    def __post_init__(self) -> None:
        self._check_common("tt")


@register("tt")
class TensorTrain(SplitFormat):
    """Tensor-train (MPO) approximation of the split rearranged block; ALS fit."""

    Hparams = TTHparams
    cores: list[Tensor]

    def __init__(self, shape, hparams=None):
        super().__init__(shape, hparams)
        hp = self.hparams
        sq = [x * x for x in self.sin + self.sout]
        D = len(sq)
        caps = [min(math.prod(sq[: l + 1]), math.prod(sq[l + 1 :])) for l in range(D - 1)]
        if isinstance(hp.ranks, (list, tuple)):
            if len(hp.ranks) != D - 1:
                raise ValueError(
                    f"tt.ranks has {len(hp.ranks)} entries for {D - 1} bonds of modes {self.sin + self.sout}"
                )
            if any(r > c for r, c in zip(hp.ranks, caps)):
                raise ValueError(f"tt.ranks {list(hp.ranks)} exceed the maximal TT-ranks {caps}")
            self.ranks = list(hp.ranks)
        else:
            self.ranks = [min(hp.ranks, c) for c in caps]
        self.exact_solve = all(r == 1 for r in self.ranks)

    # ------------------------------------------------------------------ fitting
    def _bonds(self):
        return [1] + self.ranks + [1]

    def _als(self, target, init):
        """ALS on ``target(operands, out)``: an implicit contraction of the tensor to fit."""
        hp = self.hparams
        sizes = self.sin + self.sout
        D, rho = len(sizes), self._bonds()
        if init is None:
            cores = [
                torch.randn(rho[l], x, x, rho[l + 1], generator=self.generator, dtype=torch.float64)
                for l, x in enumerate(sizes)
            ]
            if self.exact_solve:  # ranks all 1: start from symmetric factors (kept by ALS, see module doc)
                cores = [_sym(c) for c in cores]
        else:
            cores = [c.clone() for c in init]
        dt, dev = target.dtype, target.device
        cores = [c.to(dt).to(dev) for c in cores]
        for l in range(D - 1, 0, -1):  # right-orthonormalize cores 1..D-1
            cores[l], cores[l - 1] = _orth_right(cores[l], cores[l - 1])
        energy_prev, it, change = None, 0, math.inf
        while True:
            it += 1
            for l in range(D - 1):  # left-to-right: update, then move the norm right
                cores[l], cores[l + 1] = _orth_left(target.core_update(cores, l), cores[l + 1])
            core = target.core_update(cores, D - 1)
            energy = float(core.pow(2).sum())  # ‖Ĉ‖_F² (all other cores orthonormal)
            cores[D - 1], cores[D - 2] = _orth_right(core, cores[D - 2])
            for l in range(D - 2, 0, -1):  # right-to-left
                cores[l], cores[l - 1] = _orth_right(target.core_update(cores, l), cores[l - 1])
            if energy_prev is not None:
                change = abs(energy - energy_prev) / max(energy, 1e-300)
            energy_prev = energy
            if change <= hp.tol or it >= sweep_budget(hp, init is not None):
                break
        if self.exact_solve:  # remove the rounding-level asymmetry: Ĉ = ⊗F_l is then exactly symmetric
            cores = [_sym(c) for c in cores]
        return cores, {"iterations": it, "converged": change <= hp.tol, "energy_change": change}

    def fit(self, stats: LayerStats):
        self._fit(stats)
        self._repair()
        return self

    def _fit(self, stats: LayerStats):
        self._check_stats(stats)
        fallback = None
        if dtf.use_tensorly(self.name, self.hparams.method, self.shape):
            fallback = self._fit_formed(stats)
            if fallback is None:
                return self
        target = _StatsTarget(SplitTensor(stats, self.sin, self.sout, self.hparams.chunk), stats.a)
        self.cores, info = self._als(target, self.cores if self.fitted else None)
        self.last_fit = {
            "method": "implicit",
            **info,
            "splits_in": self.sin,
            "splits_out": self.sout,
            "ranks": self.ranks,
            **({"fallback": fallback} if fallback else {}),
        }
        self.fitted, self._pre = True, None
        return self

    def _fit_formed(self, stats: LayerStats) -> str | None:
        """TT-SVD of the formed ``𝒯`` (tensorly; ``‖𝒯 − TT‖² ≤ Σ_k ε_k²``, ``ε_k`` the truncation errors of
        the unfoldings, so within ``sqrt(D−1)`` of the best TT of these ranks). ALS sweeps from it were
        measured not to lower the error on the digits blocks (and cost 10-30x the TT-SVD), so none are run.
        TT-ranks all 1: each step is the nearest Kronecker product of a symmetric PSD matrix, whose factors are
        symmetric (Van Loan & Pitsianis) when the leading singular value is simple; the factors are then
        replaced by their symmetric parts (rounding). If one is not symmetric (a tie), nothing is loaded and the
        reason is returned: the caller falls back to the implicit symmetric ALS (``last_fit["fallback"]`` says so)."""
        hp, sizes = self.hparams, self.sin + self.sout
        cores = dtf.tt_svd(dtf.split_tensor(stats, self.sin, self.sout, hp.chunk), self.ranks, sizes)
        if self.exact_solve:
            asym = max(float((c - _sym(c)).norm() / c.norm()) for c in cores)
            if asym > 1e-8:
                return f"tt-svd Kronecker factors not symmetric ({asym:.1e})"
            cores = [_sym(c) for c in cores]
        self.cores = cores
        self.last_fit = {
            "method": "tensorly",
            "iterations": 0,
            "converged": True,
            "splits_in": self.sin,
            "splits_out": self.sout,
            "ranks": self.ranks,
            "tt_ranks": [c.shape[-1] for c in cores[:-1]],
        }
        self.fitted, self._pre = True, None
        return None

    def _update(self, stats, decay):
        self._check_stats(stats)
        old = [c.clone() for c in self.cores]
        self._fit(stats)
        batch = self.cores
        target = _SumTarget([(decay, old), (1 - decay, batch)])
        self.cores, info = self._als(target, batch)
        self.last_fit["update_sweeps"] = info["iterations"]
        self._repair()
        return self

    # ------------------------------------------------------------------ operator
    def _letters(self):
        D = len(self.cores)
        r = [oe.get_symbol(l) for l in range(D)]
        c = [oe.get_symbol(D + l) for l in range(D)]
        b = [oe.get_symbol(2 * D + l) for l in range(D + 1)]
        return r, c, b

    def _format_mv(self, V):
        r, c, b = self._letters()
        D = len(self.cores)
        expr = ",".join(b[l] + r[l] + c[l] + b[l + 1] for l in range(D)) + "," + "".join(c) + "->" + "".join(r)
        Vt = as_tensor(V, self.sin, self.sout)
        X = contract(expr, *self.cores, Vt)  # Ĉ V
        if not self.exact_solve:  # ranks all 1: the factors are symmetric, Ĉ = Ĉᵀ
            X = 0.5 * (X + contract(expr, *[c.transpose(1, 2) for c in self.cores], Vt))  # ½(Ĉ + Ĉᵀ) V
        return from_tensor(X, *self.shape)

    def to_dense(self, raw: bool = False):
        """Dense ``½(Ĉ + Ĉᵀ) + μI`` (the represented operator); ``raw=True``: the fitted format ``Ĉ`` itself."""
        r, c, b = self._letters()
        D = len(self.cores)
        expr = ",".join(b[l] + r[l] + c[l] + b[l + 1] for l in range(D)) + "->" + "".join(r) + "".join(c)
        dim = self.shape[0] * self.shape[1]
        M = oe.contract(expr, *self.cores).reshape(dim, dim)
        return M if raw else sym_shift(M, self.shift)

    def kron_factors(self) -> list[torch.Tensor]:
        """For TT-ranks all 1: the factors ``F_l`` with ``Ĉ = F_1 ⊗ ⋯ ⊗ F_D``."""
        if not self.exact_solve:
            raise ValueError("tt: Kronecker factors exist only for TT-ranks all 1")
        return [c[0, :, :, 0] for c in self.cores]

    def partial_traces(self):
        tr = [torch.diagonal(c, dim1=1, dim2=2).sum(-1) for c in self.cores]  # (ρ, ρ')
        P = []
        for l in range(len(self.cores)):
            left = torch.ones(1, 1, dtype=tr[0].dtype, device=tr[0].device)
            for k in range(l):
                left = left @ tr[k]
            right = torch.ones(1, 1, dtype=tr[0].dtype, device=tr[0].device)
            for k in range(len(self.cores) - 1, l, -1):
                right = tr[k] @ right
            P.append(torch.einsum("a,axyb,b->xy", left[0], self.cores[l], right[:, 0]))
        return P, torch.trace(P[0])

    def _factor_eigh(self):
        """TT-ranks all 1: eigendecompositions of the (symmetric) factors ``F_l``, cached per fit."""
        if self._pre is None:
            eig = [torch.linalg.eigh(0.5 * (F + F.T)) for F in self.kron_factors()]
            self._pre = ([e for e, _ in eig], [q for _, q in eig])
        return self._pre

    def _exact_min_eigenvalue(self):
        """TT-ranks all 1: ``λ_min(⊗F_l)``, the least product of one extreme eigenvalue per factor."""
        if not self.exact_solve:
            return None
        lo = torch.ones((), dtype=torch.float64)
        hi = lo.clone()
        for e in self._factor_eigh()[0]:
            ends = torch.stack([e[0], e[-1]]).double()
            cand = torch.cat([lo * ends, hi * ends])
            lo, hi = cand.min(), cand.max()
        return float(lo)

    def solve(self, V, damping):
        self._check(V, damping)
        if not self.exact_solve:
            return self._pcg_solve(V, damping)
        X = kron_eig_solve(*self._factor_eigh(), as_tensor(V, self.sin, self.sout), damping + self.shift, floor=None)
        self.last_solve = {"method": "kron-eigh", "damping": "tikhonov", "exact": True}
        return from_tensor(X, *self.shape)

    def tensors(self):
        return {f"core{l}": c for l, c in enumerate(self.cores)} if self.fitted else {}

    def _load_tensors(self, t):
        self.cores = [t[f"core{l}"].clone() for l in range(len(t))]

    def solve_flops(self):
        m, n = self.shape
        if self.exact_solve:
            return 4 * m * n * (m + n)
        mv = 4 * sum(c.numel() for c in self.cores) * m * n if self.fitted else 0  # Ĉ V and Ĉᵀ V
        return self.last_solve.get("iterations", 20) * (mv + 4 * m * n * (m + n))


# ---------------------------------------------------------------------- ALS helpers
def _sym(core):
    """Every ``x x x`` slice of a core ``(ρ, x, x, ρ')`` replaced by its symmetric part."""
    return 0.5 * (core + core.transpose(1, 2))


def _orth_left(core, nxt):
    """QR of ``core`` as ``(ρ x x, ρ')``; the R factor is pushed into ``nxt``."""
    a, x, y, b = core.shape
    Q, R = torch.linalg.qr(core.reshape(a * x * y, b))
    k = Q.shape[1]
    return Q.reshape(a, x, y, k), torch.einsum("kb,bxyc->kxyc", R, nxt)


def _orth_right(core, prev):
    """LQ of ``core`` as ``(ρ, x x ρ')``; the L factor is pushed into ``prev``."""
    a, x, y, b = core.shape
    Q, R = torch.linalg.qr(core.reshape(a, x * y * b).T)
    k = Q.shape[1]
    return Q.T.reshape(k, x, y, b), torch.einsum("axyb,kb->axyk", prev, R)


class _StatsTarget:
    """Contraction of the implicit data tensor ``𝒯`` with all cores but one."""

    def __init__(self, T: SplitTensor, like):
        self.T, self.dtype, self.device = T, like.dtype, like.device

    def core_update(self, cores, l):
        T = self.T
        D = T.D
        b = [T.symbol() for _ in range(D + 1)]
        ops = [(c, b[k] + T.rows[k] + T.cols[k] + b[k + 1]) for k, c in enumerate(cores) if k != l]
        ops += [
            (torch.ones(1, dtype=self.dtype, device=self.device), b[0]),
            (torch.ones(1, dtype=self.dtype, device=self.device), b[D]),
        ]
        out = T.contract(ops, b[l] + T.rows[l] + T.cols[l] + b[l + 1])
        T.release(D + 1)
        return out


class _SumTarget:
    """Contraction of ``Σ_i w_i TT_i`` (explicit TTs) with all cores but one."""

    def __init__(self, terms):
        self.terms = terms
        self.dtype, self.device = terms[0][1][0].dtype, terms[0][1][0].device

    def core_update(self, cores, l):
        D = len(cores)
        out = 0
        for w, tt in self.terms:
            r = [oe.get_symbol(k) for k in range(D)]
            c = [oe.get_symbol(D + k) for k in range(D)]
            b = [oe.get_symbol(2 * D + k) for k in range(D + 1)]
            e = [oe.get_symbol(3 * D + 1 + k) for k in range(D + 1)]
            ops = [(t, b[k] + r[k] + c[k] + b[k + 1]) for k, t in enumerate(tt)]
            ops += [(cc, e[k] + r[k] + c[k] + e[k + 1]) for k, cc in enumerate(cores) if k != l]
            one = torch.ones(1, dtype=self.dtype, device=self.device)
            ops += [(one, b[0]), (one, b[D]), (one, e[0]), (one, e[D])]
            expr = ",".join(s for _, s in ops) + "->" + e[l] + r[l] + c[l] + e[l + 1]
            out = out + w * contract(expr, *[t for t, _ in ops])
        return out
