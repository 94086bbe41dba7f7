"""``kron_sum`` hyper-parameters: rank, PSD mode and proof, damping kind, fit route and its stopping rule,
warm starts, PCG settings and the PSD-factor fit's settings (validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass

from tensorcurv.linalg.rearrange import METHODS
from tensorcurv.structures.damping import DampingKind
from tensorcurv.structures.inverse_fit import InverseFitHparams

PSD_MODES = ("auto", "shrink", "factors", "none")
PSD_PROOFS = ("auto", "samples", "spectral", "dense")


@dataclass
class KronSumHparams(InverseFitHparams):
    rank: int = 1
    """Number of Kronecker terms r (1 = KPSVD)."""
    psd: str = "auto"
    """``auto`` (default): ``shrink`` at rank 1 (the exact KPSVD, whose factors are PSD, so nothing is scaled) and
    ``factors`` at rank ≥ 2; ``factors``: every A_k, G_k ⪰ 0 (:mod:`tensorcurv.structures.kron_sum.psd_factors`:
    T = 1 nonnegative combinations of sample atoms, else projected HALS; from the rank-1 fit, monotone in r; on
    small blocks the shifted truncation when it is closer, :mod:`~tensorcurv.structures.kron_sum.near_psd`);
    ``shrink``: scale terms k ≥ 2 so that Ĉ is provably PSD (cheap, but its error stays near rank 1's);
    ``none``: pure truncated SVD (indefinite in general)."""
    damping_kind: str = DampingKind.TIKHONOV
    """``tikhonov``: (Ĉ + λI)^{-1}; ``pi``: π-damping on the dominant term (exact for r ≤ 2)."""
    method: str = "auto"
    """Fit: ``power`` (implicit block subspace iteration), ``gram`` (sample space, T = 1) or ``auto``."""
    tol: float = 1e-4
    """Per-pair stopping tolerance: Σ_{k≤r} |Δσ_k²| between iterations ≤ tol · σ_{r+1}² (a lower bound
    of the Eckart–Young floor², :func:`tensorcurv.linalg.rearrange.pair_change`)."""
    max_iter: int = 50
    """Maximum subspace iterations per fit."""
    oversample: int | None = None
    """Extra block columns (None: power route 0 for rank 1, 2 otherwise; gram route block width
    max(16, rank + 8))."""
    warm_start: bool = True
    """Start each fit from the previous factors: the power route from the ``G_k`` themselves, the gram
    route from ``A_k`` or ``G_k`` mapped into the new batch's sample space, whichever side is cheap
    (:func:`tensorcurv.linalg.rearrange.gram_warm_side`; cold when both factors are wide)."""
    warm_max_iter: int | None = 1
    """Iterations of a warm-started running-average ``update`` (power method): a fixed budget, so that
    across steps the fit is a power iteration spread over the batches (1: one ALS sweep, two products,
    per step; ``tol`` still stops it earlier); None: ``max_iter``. A one-shot ``fit`` is never capped."""
    pcg_tol: float = 1e-8
    """Relative residual tolerance of the PCG solves."""
    pcg_max_iter: int = 200
    """Maximum PCG iterations."""
    seed: int = 0
    """Seed of the random start columns."""
    psd_certificate: bool = True
    """Rank 1: trust the fit's one-signed-weights certificate of PSD factors (else Cholesky check)."""
    psd_atoms: int = 256
    """``psd="factors"``, T = 1: number of (evenly spaced) samples whose ``a aᵀ``, ``Λ`` are the atoms."""
    psd_tol: float = 1e-3
    """``psd="factors"``: a stage stops when an iteration changes the fitted energy by at most ``psd_tol``
    times the stage's gain (the new term's energy)."""
    psd_max_iter: int = 8
    """``psd="factors"``: maximum alternating iterations per added term."""
    psd_svd_max_iter: int | None = 1
    """``psd="factors"``: power iterations of its rank-1 fit (started from K-FAC's ``G``; ``None``: ``max_iter``)."""
    psd_proof: str = "auto"
    """Rank ≥ 2 shrink: ``samples`` (sample-space certificate, O(N² r), needs a ``gram`` fit),
    ``spectral`` (Cholesky + certified Lanczos bounds), ``dense`` (the exact largest t by one dense
    eigenvalue problem, blocks with n·m ≤ 4096) or ``auto`` (dense on such small blocks; else rank ≥ 3
    with sample coefficients: samples, plus spectral when both factors are ≤ 256 wide, the larger t
    wins; otherwise spectral; see the module docstring)."""

    def resolved_psd(self) -> str:
        """The PSD mode this rank uses (``auto`` resolved: ``shrink`` at rank 1, ``factors`` above)."""
        if self.psd != "auto":
            return self.psd
        return "shrink" if self.rank == 1 else "factors"

    def __post_init__(self) -> None:
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"kron_sum.rank must be an integer >= 1, got {self.rank!r}")
        if self.psd not in PSD_MODES:
            raise ValueError(f"kron_sum.psd={self.psd!r} is not one of {list(PSD_MODES)}")
        if self.psd_proof not in PSD_PROOFS:
            raise ValueError(f"kron_sum.psd_proof={self.psd_proof!r} is not one of {list(PSD_PROOFS)}")
        self.damping_kind = DampingKind.parse(self.damping_kind, "kron_sum.damping_kind")
        if self.method not in METHODS:
            raise ValueError(f"kron_sum.method={self.method!r} is not one of {list(METHODS)}")
        if not self.tol > 0 or not self.pcg_tol > 0:
            raise ValueError(f"kron_sum.tol and kron_sum.pcg_tol must be > 0, got {self.tol}, {self.pcg_tol}")
        if self.max_iter < 1 or self.pcg_max_iter < 1 or (self.warm_max_iter is not None and self.warm_max_iter < 1):
            raise ValueError("kron_sum.max_iter, kron_sum.pcg_max_iter and kron_sum.warm_max_iter must be >= 1")
        if self.psd_svd_max_iter is not None and not (
            isinstance(self.psd_svd_max_iter, int) and self.psd_svd_max_iter >= 1
        ):
            raise ValueError(
                f"kron_sum.psd_svd_max_iter must be None or an integer >= 1, got {self.psd_svd_max_iter!r}"
            )
        if (
            not (isinstance(self.psd_atoms, int) and self.psd_atoms >= 1)
            or self.psd_max_iter < 1
            or not self.psd_tol > 0
        ):
            raise ValueError(
                "kron_sum.psd_atoms and kron_sum.psd_max_iter must be integers >= 1 and kron_sum.psd_tol > 0, "
                f"got {self.psd_atoms!r}, {self.psd_max_iter!r}, {self.psd_tol!r}"
            )
        if self.oversample is not None and self.oversample < 0:
            raise ValueError(f"kron_sum.oversample must be >= 0 or None, got {self.oversample}")
        self.check_inverse_fit("kron_sum", self.damping_kind)
