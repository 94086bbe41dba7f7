"""The thesis's methods as named presets, with the thesis's protocol as their defaults (docs/methods/thesis.md).

Koroko et al., "Efficient approximations of the Fisher matrix in neural networks using Kronecker product
singular value decomposition" (ESAIM ProcS 2023, arXiv 2201.10285) and "Analysis and comparison of two-level
KFAC methods for training deep neural networks" (arXiv 2303.18083).

    from tensorcurv.experiments.thesis_methods import THESIS_METHODS, optimizer_kwargs
    kw = optimizer_kwargs("deflation", lr=3e-4)               # protocol + structure + its hyper-parameters
    opt = tensorcurv.optim.build("natural_gradient", model, loss_fn, **kw)

Each :class:`ThesisMethod` mirrors ``conf/curvature/<config>.yaml`` (``structure`` is its ``name``, ``hparams``
its other keys but ``kind`` and ``damping``; a test keeps the two equal). :data:`THESIS_PROTOCOL` mirrors the
optimizer keys of ``conf/optim/thesis_ng.yaml`` that differ from the ``natural_gradient`` defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KPSVD_PAPER = "Koroko et al. 2022 (arXiv 2201.10285)"
TWO_LEVEL_PAPER = "Koroko et al. 2023 (arXiv 2303.18083)"

#: the thesis's mini-batch size (its training scripts' default; statistics on a quarter of it)
THESIS_BATCH_SIZE = 128

#: the thesis's protocol: natural-gradient keys (``tensorcurv.optim.config.NaturalGradientConfig``)
THESIS_PROTOCOL: dict[str, Any] = {
    "kind": "mc",
    "stats_fraction": 0.25,
    "stats_interval": 100,
    "inverse_interval": 100,
    "decay": 0.95,
    "decay_schedule": "average",
    "kl_clip": 1e-2,
    "momentum": 0.9,
    "weight_decay": 1e-3,
    "lr": 1e-4,
    "damping": 1e-4,
}


@dataclass(frozen=True)
class ThesisMethod:
    """One method: its curvature preset and the optimizer keys it changes in the protocol."""

    label: str
    """The thesis's name for it (tables, figures)."""
    config: str
    """``conf/curvature/<config>.yaml``."""
    structure: str
    """Registered structure name."""
    hparams: dict[str, Any] = field(default_factory=dict)
    """Structure hyper-parameters (the preset's keys but ``name``, ``kind``, ``damping``)."""
    optim: dict[str, Any] = field(default_factory=dict)
    """Overrides of :data:`THESIS_PROTOCOL` for this method."""
    reference: str = KPSVD_PAPER


def _two_level(label: str, config: str, space: str, variant: str = "multiplicative", matrix: str = "exact"):
    hp = dict(base="kfac", base_hparams={}, coarse_space=space, coarse_vectors_per_layer=1, variant=variant)
    ref = "Tselepidis, Kohler & Orvieto 2020" if matrix == "kronecker" else TWO_LEVEL_PAPER
    return ThesisMethod(label, config, "two_level", {**hp, "coarse_matrix": matrix}, reference=ref)


_RANK2 = dict(tol=1e-6, max_iter=100, lanczos_steps=10, min_denominator=1e-3)

#: name -> method (the name is also the study's method key)
THESIS_METHODS: dict[str, ThesisMethod] = {
    "kfac": ThesisMethod(
        "K-FAC",
        "kfac",
        "kfac",
        {"damping_kind": "tikhonov", "weight_sharing": "expand"},
        reference="Martens & Grosse 2015",
    ),
    "kpsvd": ThesisMethod(
        "KPSVD",
        "kpsvd",
        "kpsvd",
        {
            "rank": 1,
            "psd": "shrink",
            "damping_kind": "tikhonov",
            "method": "auto",
            "tol": 1e-4,
            "max_iter": 50,
            "oversample": None,
            "warm_start": True,
            "pcg_tol": 1e-8,
            "pcg_max_iter": 200,
            "seed": 0,
        },
    ),
    "deflation": ThesisMethod(
        "Deflation", "deflation", "kron_rank2", {"leading": "kpsvd", "fit": "deflation", **_RANK2}
    ),
    "kfac_corrected": ThesisMethod(
        "K-FAC-corrected", "kfac_corrected", "kron_rank2", {"leading": "kfac", "fit": "deflation", **_RANK2}
    ),
    "lanczos": ThesisMethod("Lanczos", "lanczos", "kron_rank2", {"leading": "kpsvd", "fit": "lanczos", **_RANK2}),
    "two_level_nicolaides": _two_level("NICO", "two_level_nicolaides", "nicolaides"),
    "two_level_spectral": _two_level("SPECTRAL", "two_level_spectral", "spectral"),
    "two_level_residual": _two_level("RESIDU", "two_level_residual", "residual"),
    "two_level_tselepidis": _two_level("TPSELEPEDIS", "two_level_tselepidis", "nicolaides", "additive", "kronecker"),
    "two_level_krylov_nicolaides": _two_level("KRY-NICO", "two_level_krylov_nicolaides", "krylov_nicolaides"),
    "two_level_krylov_residual": _two_level("KRY-RESIDU", "two_level_krylov_residual", "krylov_residual"),
    "exact_ng_block": ThesisMethod(
        "Exact NG (block-diagonal)", "dense", "dense", {"max_dim": 8192}, optim={"kl_clip": None}
    ),
    "exact_ng_full": ThesisMethod(
        "Exact NG (full)", "dense_full", "dense_full", {"max_dim": 4096}, optim={"kl_clip": None}
    ),
}


def optimizer_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments of ``tensorcurv.optim.build("natural_gradient", model, loss_fn, **kw)`` for method
    ``name``: the protocol, the method's overrides, its structure and hyper-parameters, then ``overrides``."""
    try:
        m = THESIS_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown thesis method {name!r}; valid: {sorted(THESIS_METHODS)}") from None
    return {**THESIS_PROTOCOL, **m.optim, "structure": m.structure, **m.hparams, **overrides}


__all__ = ["THESIS_BATCH_SIZE", "THESIS_METHODS", "THESIS_PROTOCOL", "ThesisMethod", "optimizer_kwargs"]
