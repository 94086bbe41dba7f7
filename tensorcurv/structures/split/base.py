"""What the split formats ``tucker`` and ``tt`` share: the split tensor of a layer block and its fit scaffolding.

With the indices split ``n = n_1⋯n_d`` (``splits_in``) and ``m = m_1⋯m_e`` (``splits_out``), the block
becomes a tensor ``𝒯`` with one mode of size ``x_l²`` per index factor (``torch.kron`` ordering of the
column-major vec). ``SplitTensor`` contracts ``𝒯`` implicitly from the per-sample factors (``C`` is never
formed). A format ``Ĉ`` fitted to ``𝒯`` represents the symmetric part ``½(Ĉ + Ĉᵀ)``; ``psd="shift"``
(default) adds ``μI``, ``μ = max(0, −λ_min)`` (``λ_min`` exact where the format gives it, else a Lanczos
lower bound). ``solve``: PCG on ``Ĉ + (λ + μ)I`` preconditioned by the Kronecker product of the partial
traces (exact Tikhonov damping).

The mathematics (fit, symmetry, PSD shift, running average): docs/structures/tucker.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import opt_einsum as oe
import torch
from torch import Tensor

from tensorcurv.core.options import Option
from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg import unvec, vec
from tensorcurv.linalg.krylov import kron_eig_solve, pcg_or_fallback
from tensorcurv.linalg.lanczos import lanczos
from tensorcurv.structures.base import Structure
from tensorcurv.structures.split import dense_fit as dtf


# ---------------------------------------------------------------------- splits
def auto_split(size: int, parts: int) -> list[int]:
    """Split ``size`` into at most ``parts`` factors, as balanced as its prime factors allow."""
    primes, x, p = [], size, 2
    while p * p <= x:
        while x % p == 0:
            primes.append(p)
            x //= p
        p += 1
    if x > 1:
        primes.append(x)
    out = [1] * parts
    for q in sorted(primes, reverse=True):
        out[out.index(min(out))] *= q
    return sorted([f for f in out if f > 1] or [1], reverse=True)


def resolve_splits(name: str, key: str, split: list[int] | None, size: int, parts: int) -> list[int]:
    if split is None:
        return auto_split(size, parts)
    split = [int(s) for s in split]
    if any(s < 1 for s in split) or math.prod(split) != size:
        raise ValueError(f"{name}.{key}={split} does not multiply to the layer size {size}")
    return split


class SplitPsd(Option):
    """tucker / tt PSD mode: ``shift`` (``½(Ĉ + Ĉᵀ) + μI``, PSD) or ``none`` (the unconstrained fit)."""

    SHIFT = "shift"
    NONE = "none"


LANCZOS_STEPS = 60


def lanczos_lower_bound(
    apply, shape: tuple[int, int], like: Tensor, generator: torch.Generator, steps: int = LANCZOS_STEPS
) -> float:
    """A lower estimate of ``λ_min`` of the symmetric operator ``apply`` on ``(m, n)`` matrices: Lanczos
    (:func:`tensorcurv.linalg.lanczos.lanczos`, ``min(steps, mn)`` steps, random start from ``generator``),
    the smallest Ritz value ``θ`` minus its residual norm ``β_k |s_k|`` (an eigenvalue lies within it of
    ``θ``; once the extreme Ritz pair has converged the bound is ``λ_min`` itself). Exact when the steps
    reach ``mn``."""
    m, n = shape
    d = m * n
    start = torch.randn(d, generator=generator, dtype=torch.float64).to(like)
    res = lanczos(lambda v: vec(apply(unvec(v, m, n))), start, max_iter=steps, breakdown_tol=1e-12)
    return float(res.ritz_values[0]) - (float(res.residuals[0]) if res.steps < d else 0.0)


@dataclass
class SplitHparams:
    splits_in: list[int] | None = None
    """Factors of n (input side, bias column included); None: automatic (``num_factors`` balanced)."""
    splits_out: list[int] | None = None
    """Factors of m (output side); None: automatic."""
    num_factors: int = 2
    """Number of factors per side for the automatic split."""
    tol: float = 1e-4
    """Relative change of the captured energy ‖𝒢‖² that stops the alternating fit."""
    max_iter: int = 30
    """Maximum alternating sweeps."""
    warm_max_iter: int | None = 2
    """Maximum sweeps of a warm-started fit (``update`` after the first fit): the running average
    refines the factors across steps, so a few sweeps per batch suffice; None: ``max_iter``."""
    pcg_tol: float = 1e-8
    pcg_max_iter: int = 300
    seed: int = 0
    chunk: int = 256
    """Samples per chunk in the implicit contractions (and in forming ``𝒯`` for ``method="tensorly"``)."""
    method: str = "auto"
    """``"implicit"``: alternating fit through implicit contractions of the per-sample factors (never forms
    ``C``); ``"tensorly"``: form ``𝒯`` (``(mn)²`` entries, at most ``dense_tensor_fit.MAX_ENTRIES``) and fit it
    with tensorly (``tucker``: HOOI from the truncated HOSVD; ``tt``: TT-SVD); ``"auto"``: ``"tensorly"`` up to
    ``dense_tensor_fit.AUTO_ENTRIES[name]`` entries (measured break-even: 2**21 for tucker, 2**23 for tt),
    ``"implicit"`` above."""
    psd: str = "shift"
    """``shift`` (default): represent ``½(Ĉ + Ĉᵀ) + μI`` with ``μ = max(0, −λ_min)``, PSD, so that the solve
    is a damped inverse; ``none``: the unconstrained fit (indefinite in general; ``solve`` may fall back)."""

    def _check_common(self, name: str) -> None:
        dtf.check_method(name, self.method)
        if self.psd not in SplitPsd.values():
            raise ValueError(f"{name}.psd={self.psd!r} is not one of {SplitPsd.values()}")
        if (
            self.num_factors < 1
            or self.max_iter < 1
            or self.pcg_max_iter < 1
            or self.chunk < 1
            or (self.warm_max_iter is not None and self.warm_max_iter < 1)
        ):
            raise ValueError(f"{name}: num_factors, max_iter, warm_max_iter, pcg_max_iter and chunk must be >= 1")
        if not (self.tol > 0 and self.pcg_tol > 0):
            raise ValueError(f"{name}: tol and pcg_tol must be > 0")
        ranks = getattr(self, "ranks", 1)
        rs = ranks if isinstance(ranks, (list, tuple)) else [ranks]
        if not all(isinstance(r, int) and r >= 1 for r in rs):
            raise ValueError(f"{name}.ranks must be a positive int or a list of positive ints, got {ranks!r}")


_EXPRESSIONS: dict[tuple, Any] = {}


def contract(expr: str, *operands: Tensor) -> Tensor:
    """``opt_einsum.contract`` with the path (``dp`` optimizer, minimal flops) computed once per
    ``(expr, shapes)`` and cached as a ``contract_expression``."""
    key = (expr, tuple(tuple(t.shape) for t in operands))
    fn = _EXPRESSIONS.get(key)
    if fn is None:
        fn = _EXPRESSIONS[key] = oe.contract_expression(expr, *[tuple(t.shape) for t in operands], optimize="dp")
        if len(_EXPRESSIONS) > 4096:
            _EXPRESSIONS.pop(next(iter(_EXPRESSIONS)))
    return fn(*operands)


def sweep_budget(hp: SplitHparams, warm: bool) -> int:
    """Sweep budget: ``max_iter`` cold, ``min(max_iter, warm_max_iter)`` warm-started."""
    return hp.max_iter if not warm or hp.warm_max_iter is None else min(hp.max_iter, hp.warm_max_iter)


class SplitTensor:
    """Implicit contractions of ``𝒯`` (modes ``n_1..n_d, m_1..m_e``; each a row/column pair)."""

    def __init__(self, stats: LayerStats, sin: list[int], sout: list[int], chunk: int) -> None:
        self.stats, self.sin, self.sout, self.chunk = stats, sin, sout, chunk
        self.sizes = sin + sout
        self.D = len(self.sizes)
        self.rows = [oe.get_symbol(2 * l) for l in range(self.D)]
        self.cols = [oe.get_symbol(2 * l + 1) for l in range(self.D)]
        self._next = 2 * self.D

    def symbol(self) -> str:
        s = oe.get_symbol(self._next)
        self._next += 1
        return s

    def release(self, count: int) -> None:
        """Give back the last ``count`` symbols taken by :meth:`symbol`."""
        self._next -= count

    def contract(self, operands: list[tuple[Tensor, str]], out: str) -> Tensor:
        """``scale Σ_q (Γ_q ⊗ Γ_q) · operands`` summed over everything not in ``out``."""
        st, d = self.stats, len(self.sin)
        ra, ca, rg, cg = self.rows[:d], self.cols[:d], self.rows[d:], self.cols[d:]
        s, k = self.symbol(), self.symbol()
        res = None
        for i in range(0, st.N, self.chunk):
            if st.T == 1:
                a = st.a[i : i + self.chunk, 0].reshape(-1, *self.sin)
                g = st.g[i : i + self.chunk, :, 0].reshape(a.shape[0], st.K, *self.sout)
                data = [(a, s + "".join(ra)), (a, s + "".join(ca)), (g, s + k + "".join(rg)), (g, s + k + "".join(cg))]
            else:
                sub = LayerStats(st.a[i : i + self.chunk], st.g[i : i + self.chunk], st.scale)
                G = sub.per_sample_grads()  # (q, m, n)
                G = G.reshape(-1, *self.sout, *self.sin)
                data = [(G, s + "".join(rg) + "".join(ra)), (G, s + "".join(cg) + "".join(ca))]
            ops = data + operands
            expr = ",".join(sub_ for _, sub_ in ops) + "->" + out
            part = contract(expr, *[t for t, _ in ops])
            res = part if res is None else res + part
        self.release(2)
        assert res is not None  # N >= 1 samples: the loop ran at least once
        return res * st.scale


def mode_factors_precond(P: list[Tensor], total: Tensor):
    """Eigen data of the Kronecker preconditioner ``⊗_l P_l / tr(Ĉ)^{D-1}`` (symmetrized)."""
    evals, evecs = [], []
    for l, F in enumerate(P):
        e, Q = torch.linalg.eigh(0.5 * (F + F.T))
        if l == 0:
            e = e / total ** (len(P) - 1) if float(total) != 0 else e
        evals.append(e)
        evecs.append(Q)
    return evals, evecs


def sym_shift(M: Tensor, shift: float) -> Tensor:
    """``½(M + Mᵀ) + shift·I`` (a new tensor)."""
    S = 0.5 * (M + M.T)
    S.diagonal().add_(shift)
    return S


def as_tensor(V: Tensor, sin: list[int], sout: list[int]) -> Tensor:
    """``V`` (m, n) as the tensor ``(n_1..n_d, m_1..m_e)`` of its column-major vec."""
    return V.T.reshape(*sin, *sout)


def from_tensor(X: Tensor, m: int, n: int) -> Tensor:
    return X.reshape(n, m).T


class SplitFormat(Structure):
    """What ``tucker`` and ``tt`` share: the index splits, the random start, the threaded solve,
    the PCG preconditioned by the Kronecker product of partial traces, and generator-aware state.

    Subclasses implement ``partial_traces()``, ``_load_tensors(tensors)`` and may override ``_solve``.
    """

    exact_solve = False

    def __init__(self, shape, hparams=None):
        super().__init__(shape, hparams)
        m, n = self.shape
        hp = self.hparams
        self.sin = resolve_splits(self.name, "splits_in", hp.splits_in, n, hp.num_factors)
        self.sout = resolve_splits(self.name, "splits_out", hp.splits_out, m, hp.num_factors)
        if hp.method == "tensorly":
            dtf.check_formable(self.name, self.shape)
        self.generator = torch.Generator().manual_seed(hp.seed)
        self.last_fit: dict[str, Any] = {}
        self._pre = None
        self.shift = 0.0  # μ of psd="shift"

    def solve(self, V, damping):
        self._check(V, damping)
        return self._pcg_solve(V, damping)

    def mv(self, V):
        """``(½(Ĉ + Ĉᵀ) + μI) V``: the format's symmetric part plus the PSD shift ``μ``."""
        self._check(V)
        X = self._format_mv(V)
        return X if self.shift == 0 else X + self.shift * V

    def _format_mv(self, V: Tensor) -> Tensor:
        raise NotImplementedError

    def _repair(self) -> None:
        """After every fit / update: the shift ``μ`` of ``psd="shift"`` (0 for ``"none"``), see the module doc."""
        self.shift, self._pre = 0.0, None
        if self.hparams.psd == "none":
            self.last_fit["psd_shift"] = 0.0
            return
        exact = self._exact_min_eigenvalue()
        if exact is not None:
            lo, how = exact, "exact"
        else:
            like = self.tensors_like()
            gen = torch.Generator().manual_seed(self.hparams.seed)
            lo, how = lanczos_lower_bound(self._format_mv, self.shape, like, gen), "lanczos"
        self.shift = max(0.0, -lo)
        self.last_fit.update(psd_shift=self.shift, psd_method=how)

    def _exact_min_eigenvalue(self) -> float | None:
        """The smallest eigenvalue where the format gives it exactly (else None: Lanczos)."""
        return None

    def tensors_like(self) -> Tensor:
        return next(iter(self.tensors().values()))

    def _precond(self, damping):
        """``V ↦ (⊗_l P_l + λI)^{-1} V`` with ``P_l`` the partial traces (PSD, cached per fit)."""
        if self._pre is None:
            self._pre = mode_factors_precond(*self.partial_traces())
        evals, evecs = self._pre
        return lambda R: from_tensor(
            kron_eig_solve(evals, evecs, as_tensor(R, self.sin, self.sout), damping), *self.shape
        )

    def _pcg_solve(self, V, damping):
        """PCG on ``Ĉ + μI + λI`` preconditioned by :meth:`_precond` at damping ``λ + μ``."""
        lam = damping + self.shift
        X, info = pcg_or_fallback(
            lambda Z: self._format_mv(Z) + lam * Z,
            V,
            self._precond(lam),
            self.hparams.pcg_tol,
            self.hparams.pcg_max_iter,
            lam,
        )
        self.last_solve = {
            "method": "pcg",
            "damping": "tikhonov",
            "exact": False,
            "preconditioner": "Kronecker product of partial traces",
            **info,
        }
        return X

    def _load_tensors(self, tensors: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def load_state_dict(self, state):
        self._load_tensors(state["tensors"])
        self.fitted, self._pre = state["fitted"], None
        self.shift = float(state.get("psd_shift", 0.0))
        if "generator" in state:
            self.generator.set_state(state["generator"])

    def state_dict(self):
        """Format tensors plus the random-start generator's state (exact resume)."""
        return {**super().state_dict(), "generator": self.generator.get_state(), "psd_shift": self.shift}
