"""Inverse-targeted fits: adapt a Kronecker-sum block to the action of the damped inverse.

Optimizers apply ``(Ĉ + λI)⁻¹ g``, not ``Ĉ``. With probes ``z_j`` (``(m, n)`` each, ``j = 1..p``) and the exact
damped solutions ``y_j = (C + λI)⁻¹ z_j`` (one batched :func:`~tensorcurv.linalg.krylov.pcg` on ``C``'s action
from the per-sample factors, preconditioned by the current fit's own damped solve), the inverse fit minimizes
the probe estimate of ``‖(Ĉ + λI)(C + λI)⁻¹ − I‖_F²``,

    f(Ĉ) = Σ_j ‖(Ĉ + λI) y_j − z_j‖² = Σ_j ‖Ĉ y_j − t_j‖²,   t_j = z_j − λ y_j (= C y_j),

i.e. ``‖(Ĉ − C)(C + λI)⁻¹ S‖_F²`` with ``E[z zᵀ] = S S ᵀ``: the Frobenius error seen through the damped inverse.
``f`` is linear in ``Ĉ``; for ``Ĉ = Σ_k A_k ⊗ G_k`` (column-major vec, ``Ĉ vec(V) = vec(Σ_k G_k V A_k)``) the
``A``'s given the ``G``'s (and back) solve a least-squares problem over *symmetric* factors, by CG on its
normal equations (alternating least squares, from the Frobenius fit). Probes: ``gaussian`` (``S = I``) or
``gradients`` (``z = √c Σ_j ε_j G_j``, Rademacher ``ε``: ``S Sᵀ = C``, the span where gradients live).

PSD: ``project=True`` (K-FAC, ``kron_sum`` with ``psd="factors"``) clips every factor to PSD after each step;
otherwise the structure's own repair runs once at the end (``set_kronecker_terms``). The result is the
repaired ALS fit, or the starting (Frobenius) fit when that has the lower probe objective.
Objective, cost and measurements: docs/structures/inverse_fit.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tensorcurv.core.exact import GRAM_MAX_TERMS, ExactBlock
from tensorcurv.core.options import Option
from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg.krylov import pcg
from tensorcurv.structures.base import sym_eig
from tensorcurv.structures.generic import batched_mv

#: most CG steps of the exact damped solves of the probes, and of one factor's normal equations
PROBE_CG_MAX_ITER = 500
FACTOR_CG_MAX_ITER = 200


class FitTarget(Option):
    """What a structure's fit approximates: ``C`` in Frobenius norm, or the action of ``(C + λI)⁻¹``."""

    FROBENIUS = "frobenius"
    INVERSE = "inverse"


class ProbeKind(Option):
    """Probes of the inverse fit: standard Gaussian, or random signed sums of the per-sample gradients."""

    GAUSSIAN = "gaussian"
    GRADIENTS = "gradients"


@dataclass
class InverseFitHparams:
    """Hyper-parameters of the fit target, shared by the structures that offer ``fit_inverse``."""

    fit_target: str = FitTarget.FROBENIUS
    """``frobenius``: the structure's own fit of ``C``; ``inverse``: then adapt it to ``(C + λ_fit I)⁻¹``."""
    fit_damping: float | None = None
    """``λ_fit`` (absolute, as the solve's damping); required by ``fit_target=inverse``."""
    inverse_probes: int = 16
    """Number ``p`` of probes ``z_j``."""
    inverse_probe_kind: str = ProbeKind.GAUSSIAN
    """``gaussian`` or ``gradients`` (random signed sums of per-sample gradients)."""
    inverse_sweeps: int = 4
    """Alternating sweeps (one ``A`` and one ``G`` least-squares step each)."""
    inverse_seed: int = 0
    """Seed of the probes (the same probes every fit)."""

    def check_inverse_fit(self, name: str, damping_kind: str) -> None:
        """One-line ``ValueError`` naming the key of the first invalid field."""
        self.fit_target = FitTarget.parse(self.fit_target, f"{name}.fit_target")
        self.inverse_probe_kind = ProbeKind.parse(self.inverse_probe_kind, f"{name}.inverse_probe_kind")
        lam = self.fit_damping
        if lam is not None and not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and 0 < lam < math.inf):
            raise ValueError(f"{name}.fit_damping must be None or a finite number > 0, got {lam!r}")
        for key in ("inverse_probes", "inverse_sweeps"):
            value = getattr(self, key)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise ValueError(f"{name}.{key} must be an integer >= 1, got {value!r}")
        if self.fit_target == FitTarget.INVERSE:
            if lam is None:
                raise ValueError(f"{name}.fit_target='inverse' needs {name}.fit_damping (the solve's λ > 0)")
            if damping_kind != "tikhonov":
                raise ValueError(f"{name}.fit_target='inverse' fits Ĉ + λI: it needs {name}.damping_kind='tikhonov'")

    def inverse_options(self) -> dict[str, Any]:
        """Keyword arguments of ``fit_inverse`` from these hyper-parameters."""
        return {
            "probes": self.inverse_probes,
            "probe_kind": self.inverse_probe_kind,
            "sweeps": self.inverse_sweeps,
            "seed": self.inverse_seed,
        }


def apply_fit_target(structure: Any, stats: LayerStats) -> None:
    """After a structure's own fit or update: ``fit_target=inverse`` runs ``structure.fit_inverse``."""
    hp = structure.hparams
    if getattr(hp, "fit_target", FitTarget.FROBENIUS) == FitTarget.INVERSE:
        structure.fit_inverse(stats, hp.fit_damping, **hp.inverse_options())


# ---------------------------------------------------------------------- probes and exact damped solves
def draw_probes(stats: LayerStats, p: int, kind: str, generator: torch.Generator) -> Tensor:
    """``p`` probes ``(p, m, n)``: ``gaussian`` (``E zzᵀ = I``) or ``gradients`` (``E zzᵀ = C``)."""
    m, n = stats.shape
    dtype, device = stats.a.dtype, stats.a.device
    if ProbeKind.parse(kind, "inverse_probe_kind") == ProbeKind.GAUSSIAN:
        return torch.randn(p, m, n, generator=generator, dtype=dtype).to(device)
    block = ExactBlock(stats)
    signs = torch.randint(0, 2, (p, stats.N, stats.K), generator=generator).to(device=device, dtype=dtype) * 2 - 1
    return torch.stack([block.combine(s) for s in signs]) / math.sqrt(float(stats.scale))


def damped_solutions(
    stats: LayerStats, Z: Tensor, damping: float, precond: Any, exact: ExactBlock | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """``Y = (C + λI)⁻¹ Z`` for a stack ``Z`` ``(p, m, n)``, exact.

    Up to :data:`~tensorcurv.core.exact.GRAM_MAX_TERMS` per-sample gradients ``J``: Woodbury on the ``J x J``
    Gram matrix (``exact``'s cached eigendecomposition when the caller passes the layer's
    :class:`~tensorcurv.core.exact.ExactBlock`). Above: one :func:`pcg` on the stacked system (``C``'s
    action from the per-sample factors), preconditioned by ``precond`` (an approximate damped solve of one
    ``(m, n)`` matrix, e.g. the Frobenius fit's), to ``100 ε`` of the dtype (at least ``1e-10``) relative."""
    block = exact if exact is not None else ExactBlock(stats)
    if block.J <= GRAM_MAX_TERMS:
        Y = torch.stack([block.solve(z, damping, method="woodbury")[0] for z in Z])
        return Y, {"method": "woodbury", "iterations": 0, "residual": 0.0}
    tol = max(1e-10, 100 * torch.finfo(Z.dtype).eps)
    Y, info = pcg(
        lambda V: batched_mv(block, V) + damping * V,
        Z,
        lambda R: torch.stack([precond(r) for r in R]),
        tol=tol,
        max_iter=PROBE_CG_MAX_ITER,
    )
    return Y, {"method": "pcg", **info}


def probe_objective(structure: Any, Y: Tensor, Z: Tensor, damping: float) -> float:
    """``Σ_j ‖(Ĉ + λI) y_j − z_j‖² / Σ_j ‖z_j‖²`` (0 when ``Ĉ = C``; 1 when ``Ĉ + λI = 0``)."""
    R = batched_mv(structure, Y) + damping * Y - Z
    return float(R.pow(2).sum() / Z.pow(2).sum())


# ---------------------------------------------------------------------- symmetric least squares
def _sym(X: Tensor) -> Tensor:
    return 0.5 * (X + X.transpose(-1, -2))


def symmetric_least_squares(B: Tensor, T: Tensor, X0: Tensor) -> tuple[Tensor, dict[str, Any]]:
    """``argmin Σ_j ‖Σ_k B_jk X_k − T_j‖² + ε Σ_k ‖X_k − X0_k‖²`` over symmetric ``X_k`` (``(r, c, c)``).

    ``B``: ``(p, r, R, c)``, ``T``: ``(p, R, c)``. Normal equations on the symmetric matrices,
    ``sym(Σ_l M_kl X_l) + ε X_k = sym(Σ_j B_jkᵀ T_j) + ε X0_k`` with ``M_kl = Σ_j B_jkᵀ B_jl``, solved by
    :func:`pcg` from ``X0`` preconditioned by the Lyapunov solve of the diagonal blocks ``M_kk``;
    ``ε = √eps · mean diag M`` keeps them definite when the probes do not determine every factor entry."""
    p, r, R, c = B.shape
    M = torch.einsum("pkai,plaj->kilj", B, B).reshape(r * c, r * c)
    eps = math.sqrt(torch.finfo(B.dtype).eps) * float(M.diagonal().mean().clamp_min(1e-300))
    rhs = _sym(torch.einsum("pkai,paj->kij", B, T)) + eps * X0
    mu, Q = torch.linalg.eigh(torch.stack([M[k * c : (k + 1) * c, k * c : (k + 1) * c] for k in range(r)]))
    den = 0.5 * (mu[:, :, None] + mu[:, None, :]) + eps

    def normal(X: Tensor) -> Tensor:
        return _sym((M @ X.reshape(r * c, c)).reshape(r, c, c)) + eps * X

    def lyapunov(S: Tensor) -> Tensor:
        return Q @ ((Q.transpose(1, 2) @ S @ Q) / den) @ Q.transpose(1, 2)

    tol = max(1e-10, 100 * torch.finfo(B.dtype).eps)
    return pcg(normal, rhs, lyapunov, tol=tol, max_iter=FACTOR_CG_MAX_ITER, x0=_sym(X0))


def _psd(X: Tensor) -> Tensor:
    """Every ``X_k`` clipped to its PSD part (eigenvalues of its symmetric part at ≥ 0)."""
    out = []
    for M in X:
        evals, Q = sym_eig(M)
        out.append((Q * evals) @ Q.T)
    return torch.stack(out)


def _balance(A: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """Same Frobenius norm for ``A_k`` and ``G_k`` (``A_k ⊗ G_k`` unchanged), and ``tr A_k ≥ 0``."""
    na, ng = A.flatten(1).norm(dim=1), G.flatten(1).norm(dim=1)
    c = torch.where((na > 0) & (ng > 0), (ng / na.clamp_min(1e-300)).sqrt(), torch.ones_like(na))
    sign = torch.where(A.diagonal(dim1=1, dim2=2).sum(1) < 0, -1.0, 1.0).to(A.dtype)
    return A * (c * sign)[:, None, None], G * (sign / c)[:, None, None]


def als_sweep(A: Tensor, G: Tensor, Y: Tensor, T: Tensor, project: bool) -> tuple[Tensor, Tensor, int]:
    """One sweep on ``Σ_j ‖Σ_k G_k Y_j A_k − T_j‖²``: the ``A``'s given the ``G``'s, then the ``G``'s
    given the ``A``'s (through the transposes ``Σ_k A_k Y_jᵀ G_k = T_jᵀ``). Returns the factors (balanced,
    the largest term ``‖A_k‖‖G_k‖`` first, ``tr A_k ≥ 0``) and the CG steps of both normal equations."""
    B = torch.einsum("kab,pbn->pkan", G, Y)  # B_jk = G_k Y_j  (p, r, m, n)
    A, info_a = symmetric_least_squares(B, T, A)
    if project:
        A = _psd(A)
    B = torch.einsum("kab,pmb->pkam", A, Y)  # (Y_j A_k)ᵀ = A_k Y_jᵀ  (p, r, n, m)
    G, info_g = symmetric_least_squares(B, T.transpose(1, 2), G)
    if project:
        G = _psd(G)
    A, G = _balance(A, G)
    order = torch.argsort(A.flatten(1).norm(dim=1) * G.flatten(1).norm(dim=1), descending=True)
    return A[order], G[order], info_a["iterations"] + info_g["iterations"]


# ---------------------------------------------------------------------- the fit
def fit_kronecker_inverse(
    structure: Any,
    stats: LayerStats,
    damping: float,
    probes: int = 16,
    probe_kind: str = ProbeKind.GAUSSIAN,
    sweeps: int = 4,
    seed: int = 0,
    project: bool = False,
    exact: ExactBlock | None = None,
) -> dict[str, Any]:
    """Adapt a fitted Kronecker-sum ``structure`` (``kronecker_terms()``/``set_kronecker_terms(A, G)``, the
    latter applying its PSD repair) to the damped inverse of ``stats``' block at ``damping`` (module doc).
    ``exact``: the block's :class:`~tensorcurv.core.exact.ExactBlock` when the caller has one (its Gram
    eigendecomposition is reused across calls).

    Returns the report: ``objective_start`` (the Frobenius fit's), ``objectives`` (after every sweep,
    before the repair), ``objective`` (the kept fit's), ``kept`` (``inverse`` or ``frobenius``),
    ``probe_cg_iterations``, ``factor_cg_iterations``, ``time``."""
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(int(seed))
    Z = draw_probes(stats, probes, probe_kind, generator)
    Y, probe_info = damped_solutions(stats, Z, damping, lambda V: structure.solve(V, damping), exact)
    T = Z - damping * Y
    start = structure.snapshot()
    f0 = probe_objective(structure, Y, Z, damping)
    A, G = (X.clone() for X in structure.kronecker_terms())
    history, cg_steps = [], 0
    for _ in range(sweeps):
        A, G, steps = als_sweep(A, G, Y, T, project)
        cg_steps += steps
        history.append(float((torch.einsum("kab,pbn,knc->pac", G, Y, A) - T).pow(2).sum() / Z.pow(2).sum()))
    structure.set_kronecker_terms(A, G)
    f = probe_objective(structure, Y, Z, damping)
    kept = FitTarget.INVERSE
    if not f <= f0:  # (also when f is NaN) the repaired ALS fit lost to its start: keep the start
        structure.restore(start)
        f, kept = f0, FitTarget.FROBENIUS
    return {
        "objective_start": f0,
        "objectives": history,
        "objective": f,
        "kept": str(kept),
        "probe_solve": probe_info["method"],
        "probe_cg_iterations": probe_info["iterations"],
        "probe_cg_residual": probe_info["residual"],
        "factor_cg_iterations": cg_steps,
        "time": time.perf_counter() - t0,
    }


__all__ = [
    "FitTarget",
    "InverseFitHparams",
    "ProbeKind",
    "als_sweep",
    "apply_fit_target",
    "damped_solutions",
    "draw_probes",
    "fit_kronecker_inverse",
    "probe_objective",
    "symmetric_least_squares",
]
