"""Hyper-parameter dataclasses of every optimizer (one per factory name), validated on construction.

They double as Hydra structured configs: ``conf/optim/<name>.yaml`` holds ``name`` plus exactly
these fields. A bad value or an unknown key raises a one-line ``ValueError`` that names the key
and the valid choices. ``lr`` and ``damping`` may also be callables of the step counter
(``lr=lambda t: 0.1 / (1 + t)``); a torch LR scheduler is the other way to vary ``lr``.

This module holds the second-order configs and the registry ``CONFIGS`` of every optimizer; the
first-order ones are defined in ``tensorcurv.optim.config_first_order`` and re-exported here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tensorcurv.core.capture import CurvatureKind
from tensorcurv.curvature import Fallback
from tensorcurv.optim.config_checks import (
    check_in_unit,
    check_interval,
    check_l1,
    check_optional_positive,
    check_positive,
)
from tensorcurv.optim.config_first_order import (
    AdaGradConfig,
    AdamConfig,
    AdamWConfig,
    LionConfig,
    MomentumConfig,
    MuonConfig,
    NesterovConfig,
    Number,
    PSGDKronConfig,
    RMSPropConfig,
    SGDConfig,
    ShampooConfig,
    SOAPConfig,
)
from tensorcurv.optim.damping import DampingRule
from tensorcurv.optim.preconditioner import DecaySchedule

# ---------------------------------------------------------------------------- second order


@dataclass
class SecondOrderConfig:
    """Natural gradient / Gauss-Newton: ``θ ← θ − η ν (Ĉ + λI)^{-1} ∇L`` per covered layer.

    Damping ↔ ridge: for a linear model with a single output and ``nn.MSELoss()`` (mean over the
    ``N`` samples), ``L = (1/N)‖Xθ − y‖²``, the GGN is ``(2/N)XᵀX`` and one step from 0 with
    ``lr = 1`` is the ridge solution ``(XᵀX + μI)^{-1}Xᵀy`` with ``μ = Nλ/2``.
    """

    lr: Number = 1.0
    """Learning rate η (> 0; or a callable of the step)."""
    damping: Number = 1e-3
    """Tikhonov damping λ > 0 of ``(Ĉ + λI)`` (initial value under ``damping_rule=lm``; or a callable)."""
    structure: str = "kfac"
    """Curvature structure: any name in ``tensorcurv.structures.names()``."""
    kind: str = CurvatureKind.GGN
    """Curvature kind: ggn (Gauss-Newton), mc or empirical (Fisher)."""
    mc_samples: int = 1
    """Label samples per input for ``kind=mc``."""
    stats_fraction: float = 1.0
    """Capture the curvature statistics on the first ``⌈f N⌉`` samples of the batch (the thesis: 0.25)."""
    decay: float | None = 0.95
    """Running-average decay of the curvature statistics (None: refit from each batch)."""
    decay_schedule: str = DecaySchedule.CONSTANT
    """``constant`` (``decay`` from the 2nd update) or ``average`` (``min(1 − 1/k, decay)`` at the k-th update)."""
    stats_interval: int = 1
    """Capture statistics every k steps (other steps: one plain backward)."""
    inverse_interval: int = 1
    """Refresh the preconditioner used by the solves every k steps (decompositions recomputed lazily)."""
    momentum: float = 0.0
    """Heavy-ball momentum on the preconditioned direction (torch SGD convention), in [0, 1)."""
    weight_decay: float = 0.0
    """Decoupled weight decay: ``θ ← θ(1 − η wd)`` before the step (not preconditioned)."""
    grad_clip: float | None = None
    """Clip the global norm of the raw gradient before preconditioning (None: off)."""
    kl_clip: float | None = None
    """KL / trust-region clip κ: scale the step by ``min(1, sqrt(κ / (η² Σ gᵀ P g)))`` (None: off)."""
    damping_rule: str = DampingRule.FIXED
    """``fixed`` (λ, or λ(step)) or ``lm`` (Levenberg–Marquardt from the reduction ratio ρ)."""
    lm_interval: int = 1
    """Under ``lm``: adapt λ every k steps (one extra forward pass on the same batch)."""
    lm_factor: float = 1.5
    """Under ``lm``: λ ← λ·factor if ρ < rho_low, λ ← λ/factor if ρ > rho_high (factor > 1)."""
    rho_low: float = 0.25
    """Under ``lm``: reduction ratio below which λ grows."""
    rho_high: float = 0.75
    """Under ``lm``: reduction ratio above which λ shrinks."""
    min_damping: float = 1e-8
    """Under ``lm``: lower bound of λ (> 0)."""
    max_damping: float = 1e4
    """Under ``lm``: upper bound of λ."""
    fallback: str = Fallback.IDENTITY
    """Parameters without a Kronecker adapter: identity (raw gradient) or diagonal (exact diagonal block)."""
    seed: int | None = None
    """Seed of the MC label sampler (None: ``torch.initial_seed()``); saved in ``state_dict``."""
    refine: int = 0
    """Krylov refinement: at most k PCG steps on the exact batch ``(C + λI) d = g``, preconditioner ``Ĉ`` (0: off)."""
    refine_tol: float = 1e-6
    """Under ``refine``: stop early when ``‖g − (C + λI) d‖ ≤ refine_tol ‖g‖``."""
    refine_coupling: str = "full"
    """Under ``refine``: ``full`` (C with its cross-layer blocks) or ``block`` (its block diagonal)."""
    refine_operator: str = "stats"
    """Under ``refine``: ``C v`` from the captured per-sample factors (``stats``) or the GGN by torch.func."""
    l1: float = 0.0
    """L1 penalty α of ``α‖θ‖₁``: proximal Gauss-Newton, prox in the metric ``(Ĉ + λI)/η`` (0: off)."""
    l1_fista: bool = False
    """Under ``l1``: FISTA (Nesterov extrapolation of the proximal iterates)."""
    l1_prox_steps: int = 10
    """Under ``l1``: FISTA iterations computing the metric prox (an integer >= 1)."""

    def __post_init__(self) -> None:
        from tensorcurv import structures
        from tensorcurv.core.exact import Coupling
        from tensorcurv.optim.refine import RefineOperator

        check_positive("lr", self.lr, allow_callable=True)
        check_positive("damping", self.damping, allow_callable=True)
        if self.structure not in structures.names():
            raise ValueError(f"structure={self.structure!r} is not one of {structures.names()}")
        self.kind = CurvatureKind.parse(self.kind, "kind")
        check_interval("mc_samples", self.mc_samples)
        if not (isinstance(self.stats_fraction, (int, float)) and 0 < self.stats_fraction <= 1):
            raise ValueError(f"stats_fraction must be in (0, 1], got {self.stats_fraction!r}")
        if self.stats_fraction < 1 and self.refine and self.refine_operator == "stats":
            raise ValueError("refine_operator='stats' needs the whole batch's statistics (stats_fraction=1)")
        if self.decay is not None:
            check_in_unit("decay", self.decay)
        self.decay_schedule = DecaySchedule.parse(self.decay_schedule, "decay_schedule")
        check_interval("stats_interval", self.stats_interval)
        check_interval("inverse_interval", self.inverse_interval)
        check_in_unit("momentum", self.momentum)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_optional_positive("grad_clip", self.grad_clip)
        check_optional_positive("kl_clip", self.kl_clip)
        self.damping_rule = DampingRule.parse(self.damping_rule, "damping_rule")
        if self.damping_rule == "lm" and callable(self.damping):
            raise ValueError("damping: a callable damping cannot be combined with damping_rule='lm'")
        check_interval("lm_interval", self.lm_interval)
        if not (isinstance(self.lm_factor, (int, float)) and self.lm_factor > 1):
            raise ValueError(f"lm_factor must be > 1, got {self.lm_factor!r}")
        if not (
            isinstance(self.rho_low, (int, float))
            and isinstance(self.rho_high, (int, float))
            and self.rho_low < self.rho_high
        ):
            raise ValueError(f"rho_low must be < rho_high, got {self.rho_low!r} and {self.rho_high!r}")
        check_positive("min_damping", self.min_damping)
        check_positive("max_damping", self.max_damping)
        if self.min_damping > self.max_damping:
            raise ValueError(f"min_damping ({self.min_damping}) must be <= max_damping ({self.max_damping})")
        self.fallback = Fallback.parse(self.fallback, "fallback")
        if not (isinstance(self.refine, int) and not isinstance(self.refine, bool) and self.refine >= 0):
            raise ValueError(f"refine must be an integer >= 0 (PCG steps per step; 0: off), got {self.refine!r}")
        check_positive("refine_tol", self.refine_tol)
        self.refine_coupling = Coupling.parse(self.refine_coupling, "refine_coupling")
        self.refine_operator = RefineOperator.parse(self.refine_operator, "refine_operator")
        check_l1(self.l1, self.l1_fista)
        check_interval("l1_prox_steps", self.l1_prox_steps)
        if self.refine and self.refine_operator == "stats" and self.stats_interval != 1:
            raise ValueError(
                f"refine_operator='stats' needs the statistics of every step (stats_interval=1, got "
                f"{self.stats_interval}); use refine_operator='func'"
            )
        if self.refine and self.refine_operator == "func" and self.kind == "empirical":
            raise ValueError(
                "refine_operator='func' products are the GGN (the true Fisher), not the empirical "
                "Fisher of kind='empirical'; use refine_operator='stats'"
            )


@dataclass
class NaturalGradientConfig(SecondOrderConfig):
    """Natural gradient: the Fisher (``mc`` by default, or ``empirical``) as curvature."""

    kind: str = CurvatureKind.MC
    """Fisher kind: mc (sampled labels, the true Fisher) or empirical (true labels); ggn is accepted."""


@dataclass
class GaussNewtonConfig(SecondOrderConfig):
    """Gauss-Newton: the GGN ``c Σ_s J_sᵀ H_s J_s`` as curvature (exact Tikhonov damping)."""


CONFIGS: dict[str, type] = {
    "natural_gradient": NaturalGradientConfig,
    "gauss_newton": GaussNewtonConfig,
    "sgd": SGDConfig,
    "momentum": MomentumConfig,
    "nesterov": NesterovConfig,
    "adagrad": AdaGradConfig,
    "rmsprop": RMSPropConfig,
    "adam": AdamConfig,
    "adamw": AdamWConfig,
    "lion": LionConfig,
    "muon": MuonConfig,
    "soap": SOAPConfig,
    "shampoo": ShampooConfig,
    "psgd_kron": PSGDKronConfig,
}


def field_names(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(config_class(name))]


def config_class(name: str) -> type:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; valid: {sorted(CONFIGS)}") from None


def make_config(name: str, **kwargs: Any) -> Any:
    """Validated config of optimizer ``name``; unknown keys raise a ``ValueError`` naming the valid ones."""
    cls = config_class(name)
    valid = field_names(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"optimizer {name!r} does not take {unknown}; valid keys: {valid}")
    return cls(**kwargs)


def split_structure_hparams(name: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Second-order optimizers: split kwargs into (optimizer fields, structure hyper-parameters)."""
    valid = set(field_names(name))
    return ({k: v for k, v in kwargs.items() if k in valid}, {k: v for k, v in kwargs.items() if k not in valid})


def make_second_order_config(name: str, opt_kw: dict[str, Any], struct_kw: dict[str, Any]) -> Any:
    """The config of second-order optimizer ``name`` from ``opt_kw``, with ``struct_kw`` checked as its
    structure's hyper-parameters; a key neither takes raises a ``ValueError`` naming both key lists."""
    from tensorcurv import structures

    config = make_config(name, **opt_kw)
    taken = {f.name for f in dataclasses.fields(structures.get(config.structure).Hparams)}
    unknown = sorted(set(struct_kw) - taken)
    if unknown:
        raise ValueError(
            f"{name} does not take {unknown}: not an optimizer key nor a hyper-parameter of structure "
            f"{config.structure!r}; optimizer keys: {field_names(name)}; {config.structure} hyper-parameters: "
            f"{sorted(taken) or 'none'}"
        )
    structures.make_hparams(config.structure, **struct_kw)
    return config


__all__ = [n for n in dir() if n.endswith("Config")] + [
    "make_second_order_config",
    "CONFIGS",
    "make_config",
    "config_class",
    "field_names",
    "split_structure_hparams",
]
