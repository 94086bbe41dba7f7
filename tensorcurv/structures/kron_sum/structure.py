"""``kron_sum`` (alias ``kpsvd``): ``Ĉ = Σ_{k=1..r} A_k ⊗ G_k``, the truncated SVD of ``R(C)``.

``A_k`` (n x n) and ``G_k`` (m x m) symmetric; column-major vec, so ``Ĉ vec(V) = vec(Σ_k G_k V A_k)``.
Rank r reaches the Eckart–Young optimum ``sqrt(Σ_{i>r} σ_i²)`` of the rearranged block ``R(C)``; rank 1
(``kpsvd``) is the Frobenius-nearest Kronecker product, never worse than K-FAC.

* fit: :func:`tensorcurv.linalg.rearrange.kronecker_svd` on the implicit ``R(C)``, warm-started;
* ``psd``: ``shrink`` (default; terms ``k ≥ 2`` scaled by a proven ``t ≤ 1``, proofs in
  :mod:`tensorcurv.structures.kron_sum.certificates`), ``factors`` (``A_k, G_k ⪰ 0``,
  :mod:`tensorcurv.structures.kron_sum.psd_factors`) or ``none`` (pure Eckart–Young);
* solve (``damping_kind``): ``tikhonov`` ``(Ĉ + λI)^{-1}`` (rank 1 exact, else PCG) or ``pi``
  (π-damping of the dominant term; exact for rank ≤ 2);
* ``update``: refit the batch, then re-truncate ``decay·Ĉ_old + (1−decay)·Ĉ_batch`` to rank r.

The mathematics (fit routes, stopping rule, PSD certificates, interval proofs): docs/structures/kron_sum.md.
"""

from __future__ import annotations

import time
from typing import Any, cast

import torch
from torch import Tensor

from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg.krylov import pcg_or_fallback
from tensorcurv.linalg.rearrange import antisymmetric, kronecker_svd
from tensorcurv.structures.base import Structure, register
from tensorcurv.structures.damping import factored_shifts, pi_ratio
from tensorcurv.structures.generic import batched_mv, per_sample_grad_chunks
from tensorcurv.structures.inverse_fit import apply_fit_target, fit_kronecker_inverse
from tensorcurv.structures.kron_sum.certificates import (
    DENSE_PROOF_MAX_DIM,
    SPECTRAL_MAX_DIM,
    gen_eig,
    interval_part,
    interval_scale,
    make_psd,
    mixed_intervals,
    negative_mass,
    recompress,
    regularize,
    relative_to_leading,
    sample_intervals,
    sample_part,
    sample_psd_scale,
    scale_tail,
    spectral_psd,
)
from tensorcurv.structures.kron_sum.hparams import KronSumHparams
from tensorcurv.structures.kron_sum.near_psd import shifted_truncation, shifted_update
from tensorcurv.structures.kron_sum.psd_factors import fit_factors, fit_samples, psd_part, recompress_psd

INTERVAL_PROOF = "interval certificate (old state's intervals, batch sample weights)"
#: ``update``: the free interval certificate is used when its t is at least this fraction of the current t
INTERVAL_ACCEPT = 0.5


@register("kron_sum", "kpsvd")
class KronSum(Structure):
    """Sum of r Kronecker products fitted as the truncated SVD of the rearranged block."""

    Hparams = KronSumHparams  # tensorcurv.structures.kron_sum.hparams
    exact_solve = False  # overridden per instance (depends on rank and damping_kind)

    def __init__(self, shape, hparams=None):
        super().__init__(shape, hparams)
        m, n = self.shape
        r = self.hparams.rank
        if r > min(n * n, m * m):
            raise ValueError(
                f"kron_sum.rank={r} exceeds min(n², m²) = {min(n * n, m * m)} for a block of weight shape {self.shape}"
            )
        self.exact_solve = r == 1 or (r == 2 and self.hparams.damping_kind == "pi")
        self.generator = torch.Generator().manual_seed(self.hparams.seed)
        self.last_fit: dict[str, Any] = {}
        self._cache: dict[Any, Any] = {}
        self._bounds: tuple[Tensor, Tensor] | None = None  # certified intervals of A_k, G_k (k ≥ 2) vs A_1, G_1
        self._psd_scale = 1.0  # the PSD scale t of the current factors

    # ------------------------------------------------------------------ fitting
    def _svd(self, stats: LayerStats, warm: bool, capped: bool = False) -> tuple[Tensor, Tensor, Any]:
        """``capped`` (running-average update): a warm-started fit runs at most ``warm_max_iter``
        iterations; a one-shot :meth:`fit` always runs to the stopping rule (``max_iter``)."""
        hp = self.hparams
        info: dict[str, Any] = {}
        init = (self.A, self.G) if (warm and hp.warm_start and self.fitted) else None  # both routes' warm start
        t0 = time.perf_counter()
        capped = capped and init is not None and hp.warm_max_iter is not None
        max_iter = min(hp.max_iter, hp.warm_max_iter) if capped else hp.max_iter
        sigma, A, G = kronecker_svd(
            stats,
            hp.rank,
            method=hp.method,
            tol=hp.tol,
            max_iter=max_iter,
            oversample=hp.oversample,
            init=init,
            generator=self.generator,
            info=info,
        )
        info["svd_time"] = time.perf_counter() - t0
        info["warm_start"] = init is not None
        coefficients = info.pop("sample_coefficients", None)
        factors = info.pop("factor_coefficients", None)
        if factors is not None:  # A is multiplied by sigma below: so are its sample weights
            factors = (factors[0] * sigma.to(factors[0].dtype), factors[1])
        self.last_fit = info
        return A.mul_(sigma[:, None, None]), G, (coefficients, factors)  # A: a fresh tensor of kronecker_svd

    def _fit_kw(self) -> dict[str, Any]:
        hp = self.hparams
        return dict(
            method=hp.method, tol=hp.tol, max_iter=hp.max_iter, oversample=hp.oversample, generator=self.generator
        )

    def _fit_psd_factors(self, stats: LayerStats, near_psd: bool = True) -> tuple[Tensor, Tensor]:
        """``psd="factors"``: the rank-1 fit (PSD leading pair), then the PSD-factor fit of rank r; with
        ``near_psd``, the shifted unconstrained truncation instead where it is more accurate (:mod:`near_psd`)."""
        hp = self.hparams
        info: dict[str, Any] = {}
        t0 = time.perf_counter()
        max_iter = hp.max_iter if hp.psd_svd_max_iter is None else min(hp.max_iter, hp.psd_svd_max_iter)
        sigma, A1, G1 = kronecker_svd(
            stats, 1, method=hp.method, tol=hp.tol, max_iter=max_iter, generator=self.generator, info=info
        )
        info["svd_time"] = time.perf_counter() - t0
        A1, G1 = A1[0] * sigma[0], G1[0]
        if hp.rank == 1:  # the leading pair is PSD (Perron–Frobenius); clip only if the fit could not certify it
            A, G = (A1[None], G1[None]) if info.get("psd_certificate") else (psd_part(A1)[None], psd_part(G1)[None])
        elif stats.T == 1:  # nonnegative combinations of A1, G1 and sample atoms: no eigendecompositions
            A, G = fit_samples(stats, A1, G1, hp.rank, hp.psd_atoms, hp.psd_tol, hp.psd_max_iter, self.generator, info)
        else:
            A, G = fit_factors(stats, A1, G1, hp.rank, hp.psd_tol, hp.psd_max_iter, self.generator, info)
        shifted = shifted_truncation(stats, A, G, hp.rank, self._fit_kw(), info) if near_psd else None
        if shifted is not None:
            A, G = shifted
        info.update(psd=hp.psd, psd_time=time.perf_counter() - t0 - info["svd_time"], near_psd=shifted is not None)
        self.last_fit = info
        return A, G

    def fit(self, stats: LayerStats) -> KronSum:
        self._fit_frobenius(stats)
        apply_fit_target(self, stats)
        return self

    def _fit_frobenius(self, stats: LayerStats) -> None:
        self._check_stats(stats)
        if self.hparams.resolved_psd() == "factors":
            self._store(*self._fit_psd_factors(stats), None)
            return
        A, G, (coefficients, factors) = self._svd(stats, warm=True)
        self._set(
            A, G, certified=bool(self.last_fit.get("psd_certificate")), coefficients=coefficients, factors=factors
        )

    # ------------------------------------------------------------------ inverse-targeted fit
    def kronecker_terms(self) -> tuple[Tensor, Tensor]:
        return self.A, self.G

    def set_kronecker_terms(self, A: Tensor, G: Tensor) -> None:
        """Set ``Σ_k A_k ⊗ G_k`` with this structure's PSD repair (``factors``: already PSD factors)."""
        if self.hparams.resolved_psd() == "factors":
            self._store(A, G, None)
        else:
            self._set(A, G)

    def fit_inverse(self, stats: LayerStats, damping: float, **options) -> dict:
        """The terms adapted to ``(C + λI)⁻¹`` (:func:`~tensorcurv.structures.inverse_fit.fit_kronecker_inverse`;
        PSD factors after every step with ``psd="factors"``, else the ``psd`` repair once at the end)."""
        self._check_stats(stats)
        project = self.hparams.resolved_psd() == "factors"
        self.last_inverse_fit = fit_kronecker_inverse(self, stats, damping, project=project, **options)
        return self.last_inverse_fit

    def _interval_proof_applies(self) -> bool:
        """Running averages try the free interval certificate (rank ≥ 3 samples/auto, rank 2 samples) —
        except where the exact dense scale applies (``dense``, or ``auto`` on blocks with n·m ≤ 1024)."""
        hp = self.hparams
        m, n = self.shape
        exact = hp.psd_proof == "dense" or (hp.psd_proof == "auto" and m * n <= DENSE_PROOF_MAX_DIM)
        return (
            hp.resolved_psd() == "shrink"
            and not exact
            and ((hp.rank >= 3 and hp.psd_proof != "spectral") or (hp.rank == 2 and hp.psd_proof == "samples"))
        )

    def _update(self, stats, decay):
        self._update_frobenius(stats, decay)
        apply_fit_target(self, stats)  # fit_target=inverse: from the averaged terms, on this batch
        return self

    def _update_frobenius(self, stats, decay):
        self._check_stats(stats)
        r = self.hparams.rank
        if self.hparams.resolved_psd() == "factors" and self.A.shape[0] > r:  # a shifted truncation stays one
            self._store(*shifted_update(self.A, self.G, stats, decay, r, self._fit_kw()), None)
            self.last_fit = {"psd": "factors", "near_psd": True, "recompressed": True}
            return self
        if self.hparams.resolved_psd() == "factors":  # PSD batch fit, then the PSD refit of the mix on its 2r atoms
            A_b, G_b = self._fit_psd_factors(stats, near_psd=False)
            w = torch.tensor([decay] * r + [1 - decay] * r, dtype=torch.float64)
            eye = torch.cat([torch.eye(r, dtype=torch.float64), torch.zeros(r, r, dtype=torch.float64)])
            A, G = recompress_psd(
                torch.cat([self.A, A_b]),
                torch.cat([self.G, G_b]),
                w,
                r,
                (eye, decay * eye),
                self.hparams.psd_tol,
                self.hparams.psd_max_iter,
            )
            self._store(A, G, None)
            self.last_fit["recompressed"] = True
            return self
        A_b, G_b, (coefficients, factors) = self._svd(stats, warm=True, capped=True)
        batch_psd = bool(self.last_fit.get("psd_certificate"))
        t_b = None
        if self._interval_proof_applies() and self._bounds is not None and factors is not None:
            t_b = sample_psd_scale(*coefficients)  # the batch fit made PSD first (cheap): then the mix is PSD
            if t_b is not None and t_b < 1.0:
                A_b[1:] *= t_b
                factors = (torch.cat([factors[0][:, :1], factors[0][:, 1:] * t_b], 1), factors[1])
        info: dict[str, Any] = {}
        A, G = recompress(
            torch.cat([decay * self.A, (1 - decay) * A_b]), torch.cat([self.G, G_b]), self.hparams.rank, info
        )
        self.last_fit["recompressed"] = True
        if t_b is not None:
            t0 = time.perf_counter()
            new = self._mixed_bounds(info["coefficients"], factors)
            t = None
            if new is not None:
                r = self.hparams.rank
                (ia, ig), (da, dg) = [x[: r - 1] for x in new], [x[r - 1 :] for x in new]
                t = max(interval_scale(ia, ig), 1.0 / (1.0 + negative_mass(da, dg)))
            self.last_fit["interval_scale"] = t
            if t is not None and t >= INTERVAL_ACCEPT * self._psd_scale:  # else too loose: spectral below
                how = INTERVAL_PROOF
                if self.hparams.psd_proof == "auto" and t < 1.0 and max(self.shape) <= SPECTRAL_MAX_DIM:
                    spec_bounds: dict = {}
                    spec = spectral_psd(A, G, bounds=spec_bounds)  # small factors: keep the larger t
                    if spec[2] > t and "A" in spec_bounds:
                        A, G, t, how = spec
                        self._store(A, G, (spec_bounds["A"], spec_bounds["G"]), t)
                        self.last_fit.update(
                            psd=self.hparams.psd, psd_scale=t, psd_method=how, psd_time=time.perf_counter() - t0
                        )
                        return self
                self._store(
                    scale_tail(A, t, True), G, (relative_to_leading(ia) * min(t, 1.0), relative_to_leading(ig)), t
                )
                self.last_fit.update(
                    psd=self.hparams.psd, psd_scale=t, psd_method=how, psd_time=time.perf_counter() - t0
                )
                return self
        # rank 1: old (PSD after _set) and certified batch terms mixed with one-signed coefficients stay PSD
        self._set(A, G, certified=batch_psd and info["one_signed"])
        return self

    def _mixed_bounds(self, coefficients, factors):
        """Intervals of the recompressed factors (kept terms 2..r, then the discarded ones) relative to
        PSD references below the new leading pair: the old state's part by interval arithmetic on its
        certified intervals, the batch part exactly from its sample weights (:func:`mixed_intervals`);
        None where a part's leading weight is not positive."""
        out, r = [], self.hparams.rank
        for c, old, weights in zip(coefficients, self._bounds, factors):
            batch = sample_part(c[r:], weights)
            if batch is None:  # the combined leading weights change sign: interval arithmetic on the batch too
                iv = sample_intervals(weights)
                if iv is None:
                    return None
                batch = interval_part(c[r:], torch.cat([iv.new_ones(1, 2), iv]))
            iv = mixed_intervals([interval_part(c[:r], torch.cat([old.new_ones(1, 2), old])), batch])
            if iv is None:
                return None
            out.append(iv)
        return out

    def _store(self, A: Tensor, G: Tensor, bounds, t: float = 1.0) -> None:
        self.A, self.G, self._bounds, self._psd_scale = A, G, bounds, t
        self.fitted, self._cache = True, {}
        skew = bool(A.shape[0] > 1 and antisymmetric(A[1:2]).any())
        terms = A.shape[0]  # rank, or rank + 1 with a near-PSD shift term
        self.exact_solve = terms == 1 or (terms == 2 and self.hparams.damping_kind == "pi" and not skew)

    def _set(self, A: Tensor, G: Tensor, certified: bool = False, coefficients=None, factors=None) -> None:
        t0 = time.perf_counter()
        t = 1.0
        bounds: dict = {}
        if self.hparams.resolved_psd() == "shrink":
            A, G, t, how = make_psd(
                A,
                G,
                certified and self.hparams.psd_certificate,
                coefficients,
                self.hparams.psd_proof,
                inplace=True,
                factor_coefficients=factors,
                bounds=bounds,
            )
            self.last_fit["psd_method"] = how
        self._store(A, G, (bounds["A"], bounds["G"]) if "A" in bounds else None, t)
        self.last_fit.update(psd=self.hparams.psd, psd_scale=t, psd_time=time.perf_counter() - t0)

    # ------------------------------------------------------------------ operator
    def mv(self, V: Tensor) -> Tensor:
        self._check(V)
        return torch.einsum("kij,jl,knl->in", self.G, V, self.A)

    def _factored_terms(self, damping: float) -> tuple[Tensor, Tensor]:
        """``(A_1 + π√λ I, G_1 + √λ/π I)``; for ``λ = 0`` the ε-regularized ``A_1, G_1``."""
        A1, G1 = self.A[0], self.G[0]
        m, n = self.shape
        if damping == 0:
            return regularize(A1), regularize(G1)
        shift_A, shift_G = factored_shifts(pi_ratio(float(torch.trace(A1)), float(torch.trace(G1)), (m, n)), damping)
        return (
            A1 + shift_A * torch.eye(n, dtype=A1.dtype, device=A1.device),
            G1 + shift_G * torch.eye(m, dtype=G1.dtype, device=G1.device),
        )

    def _rank1_solver(self, damping: float, kind: str):
        key = ("r1", damping, kind)
        if key not in self._cache:
            if kind == "pi":
                Ba, Bg = self._factored_terms(damping)
                la, Qa = torch.linalg.eigh(Ba)
                lg, Qg = torch.linalg.eigh(Bg)
                shift = 0.0
            else:
                la, Qa = torch.linalg.eigh(self.A[0])
                lg, Qg = torch.linalg.eigh(self.G[0])
                if self.hparams.resolved_psd() != "none":
                    la, lg = la.clamp_min(0), lg.clamp_min(0)
                shift = damping
            den = lg[:, None] * la[None, :] + shift
            self._cache[key] = lambda V: Qg @ ((Qg.T @ V @ Qa) / den) @ Qa.T
        return self._cache[key]

    def _rank2_solver(self, damping: float):
        """Exact ``[(A_1+π√λ)⊗(G_1+√λ/π) + A_2⊗G_2]^{-1}`` by simultaneous diagonalization."""
        key = ("r2", damping)
        if key not in self._cache:
            Ba, Bg = self._factored_terms(damping)
            da, Xa = gen_eig(Ba, self.A[1])
            dg, Xg = gen_eig(Bg, self.G[1])
            den = 1.0 + dg[:, None] * da[None, :]
            self._cache[key] = (lambda V: Xg @ ((Xg.T @ V @ Xa) / den) @ Xa.T, float(den.min()))
        return self._cache[key]

    def _damped_mv(self, damping: float, kind: str):
        if kind == "tikhonov":
            return lambda V: self.mv(V) + damping * V
        Ba, Bg = self._factored_terms(damping)
        return lambda V: Bg @ V @ Ba + torch.einsum("kij,jl,knl->in", self.G[1:], V, self.A[1:])

    def solve(self, V: Tensor, damping: float) -> Tensor:
        self._check(V, damping)
        r, kind = self.hparams.rank, self.hparams.damping_kind
        if r == 1:
            self.last_solve = {"method": "kron-eigh", "damping": kind, "exact": True}
            return self._rank1_solver(damping, kind)(V)
        if r == 2 and kind == "pi" and self.exact_solve:
            f, dmin = self._rank2_solver(damping)
            self.last_solve = {
                "method": "simultaneous-diagonalization",
                "damping": kind,
                "exact": True,
                "min_eigen_denominator": dmin,
            }
            return f(V)
        if r == 2 and self.exact_solve is False and not antisymmetric(self.A[1:2]).any():
            precond, pname = self._rank2_solver(damping)[0], "rank-2 factored (simultaneous diagonalization)"
        else:
            precond, pname = self._rank1_solver(damping, "tikhonov"), "dominant term A_1⊗G_1 + λI"
        X, info = pcg_or_fallback(
            self._damped_mv(damping, kind), V, precond, self.hparams.pcg_tol, self.hparams.pcg_max_iter, damping
        )
        self.last_solve = {"method": "pcg", "damping": kind, "exact": False, "preconditioner": pname, **info}
        return X

    def to_dense(self) -> Tensor:
        return cast(Tensor, sum(torch.kron(a, g) for a, g in zip(self.A, self.G)))

    def tensors(self):
        return {"A": self.A, "G": self.G} if self.fitted else {}

    def inner_with_exact(self, stats: LayerStats, chunk: int = 128) -> float:
        """``⟨C, Σ_r A_r ⊗ G_r⟩``; ``T = 1``: ``scale Σ_r Σ_sk (a_sᵀ A_r a_s)(g_skᵀ G_r g_sk)``."""
        scale = float(stats.scale)
        if stats.T != 1:
            return scale * sum(float((G * batched_mv(self, G)).sum()) for G in per_sample_grad_chunks(stats, chunk))
        a, g = stats.a[:, 0], stats.g[:, :, 0]
        qa = torch.einsum("sn,rnl,sl->rs", a, self.A, a)
        qg = torch.einsum("skm,rmi,ski->rsk", g, self.G, g)
        return scale * float((qa[:, :, None] * qg).sum())

    def frobenius_sq(self, dense_max_dim: int = 0) -> float:
        """``Σ_{r,q} ⟨A_r, A_q⟩ ⟨G_r, G_q⟩``."""
        A, G = self.A.flatten(1), self.G.flatten(1)
        return float(((A @ A.T) * (G @ G.T)).sum())

    def solve_flops(self) -> int:
        m, n = self.shape
        r = self.hparams.rank
        base = 4 * (m * m * n + m * n * n)
        if self.exact_solve:
            return base
        iters = self.last_solve.get("iterations", 20) if self.last_solve.get("method") == "pcg" else 20
        return iters * (2 * r * (m * m * n + m * n * n) + base)

    def state_dict(self) -> dict[str, Any]:
        """Factors ``A, G`` (the next fit's warm start) plus the start-column generator's state,
        so that a resumed run refits bitwise like the uninterrupted one."""
        return {
            **super().state_dict(),
            "generator": self.generator.get_state(),
            "psd_bounds": None if self._bounds is None else tuple(b.clone() for b in self._bounds),
            "psd_scale": self._psd_scale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "generator" in state:
            self.generator.set_state(state["generator"])
        bounds = state.get("psd_bounds")
        self._bounds = None if bounds is None else tuple(b.clone() for b in bounds)
        self._psd_scale = state.get("psd_scale", 1.0)

    def _after_load(self):
        self._cache = {}
        if self.fitted:
            skew = bool(self.A.shape[0] > 1 and antisymmetric(self.A[1:2]).any())
            terms = self.A.shape[0]
            self.exact_solve = terms == 1 or (terms == 2 and self.hparams.damping_kind == "pi" and not skew)


# ---------------------------------------------------------------------- interval certificates (running averages)
