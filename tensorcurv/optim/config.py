"""Hyper-parameter dataclasses of every optimizer (one per factory name), validated on construction.

They double as Hydra structured configs: ``conf/optim/<name>.yaml`` holds ``name`` plus exactly
these fields. A bad value or an unknown key raises a one-line ``ValueError`` that names the key
and the valid choices. ``lr`` and ``damping`` may also be callables of the step counter
(``lr=lambda t: 0.1 / (1 + t)``); a torch LR scheduler is the other way to vary ``lr``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tensorcurv.core.capture import CurvatureKind
from tensorcurv.curvature import Fallback
from tensorcurv.optim.damping import DampingRule
from tensorcurv.optim.preconditioner import DecaySchedule

Number = float | Callable[[int], float]


def _positive(name: str, value: Any, allow_zero: bool = False, allow_callable: bool = False) -> None:
    if allow_callable and callable(value):
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def _in_unit(name: str, value: float, closed_right: bool = False) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value and (value <= 1.0 if closed_right else value < 1.0)):
        raise ValueError(f"{name} must be in [0, 1{']' if closed_right else ')'}, got {value!r}")


def _optional_positive(name: str, value: Any) -> None:
    if value is not None:
        _positive(name, value)


def _interval(name: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# ---------------------------------------------------------------------------- first order
@dataclass
class SGDConfig:
    """Plain SGD: ``θ ← θ − η ∇L``."""

    lr: Number = 0.1
    """Learning rate η (> 0; or a callable of the step)."""
    weight_decay: float = 0.0
    """L2 penalty added to the gradient (torch's coupled weight decay)."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value before the update (None: off)."""

    def __post_init__(self) -> None:
        _positive("lr", self.lr, allow_callable=True)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _optional_positive("grad_clip", self.grad_clip)


@dataclass
class MomentumConfig(SGDConfig):
    """Heavy ball (torch convention): ``b ← γ b + ∇L``, ``θ ← θ − η b``. This is the course's
    ``v ← γ v + (1−γ)∇L``, ``θ ← θ − η' v`` with ``η = η'(1−γ)``."""

    momentum: float = 0.9
    """Momentum γ in [0, 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _in_unit("momentum", self.momentum)


@dataclass
class NesterovConfig(MomentumConfig):
    """Nesterov (Sutskever form, torch): ``b ← γ b + ∇L(θ)``, ``θ ← θ − η (∇L(θ) + γ b)``; its
    iterates are the look-ahead points ``θ_t + γ(θ_t − θ_{t−1})`` of the course's recursion."""


@dataclass
class AdaGradConfig(SGDConfig):
    """AdaGrad (Duchi et al. 2011): ``s ← s + g²``, ``θ ← θ − η g / (√s + ε)``."""

    lr: Number = 0.01
    eps: float = 1e-10
    """ε added to √s."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("eps", self.eps)


@dataclass
class RMSPropConfig(SGDConfig):
    """RMSProp (Hinton 2012): ``s ← α s + (1−α) g²``, ``θ ← θ − η g / (√s + ε)``."""

    lr: Number = 0.01
    alpha: float = 0.99
    """Decay α of the squared-gradient average, in [0, 1)."""
    eps: float = 1e-8
    """ε added to √s."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _in_unit("alpha", self.alpha)
        _positive("eps", self.eps)


@dataclass
class AdamConfig(SGDConfig):
    """Adam (Kingma & Ba 2015), bias-corrected moments; ``weight_decay`` is coupled (L2)."""

    lr: Number = 1e-3
    beta1: float = 0.9
    """First-moment decay β1 in [0, 1)."""
    beta2: float = 0.999
    """Second-moment decay β2 in [0, 1)."""
    eps: float = 1e-8
    """ε added to √v̂."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _in_unit("beta1", self.beta1)
        _in_unit("beta2", self.beta2)
        _positive("eps", self.eps)


@dataclass
class AdamWConfig(AdamConfig):
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay ``θ ← θ(1 − η wd)``."""

    weight_decay: float = 0.01


@dataclass
class LionConfig(SGDConfig):
    """Lion (Chen et al. 2023): ``c = β1 m + (1−β1) g``, ``θ ← θ − η (sign(c) + wd θ)``,
    ``m ← β2 m + (1−β2) g``; ``weight_decay`` is decoupled."""

    lr: Number = 1e-4
    beta1: float = 0.9
    """Interpolation β1 in [0, 1) for the update direction."""
    beta2: float = 0.99
    """Momentum decay β2 in [0, 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _in_unit("beta1", self.beta1)
        _in_unit("beta2", self.beta2)


# ---------------------------------------------------------------------------- 2026 baselines
MUON_ADJUST_LR = ("original", "match_rms_adamw")
KRON_MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "all_diag")
KRON_PRECONDITION_DTYPES = ("float32", "float64", "param")


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


@dataclass
class MuonConfig:
    """Muon (Jordan et al. 2024) on the hidden weight matrices, AdamW on every other parameter, in one
    optimizer. Muon (torch's ``torch.optim.Muon``): ``B ← μ B + G``, ``B̃ = G + μ B`` (Nesterov) or ``B``,
    ``O = NS_k(B̃)`` (Newton–Schulz orthogonalization, ``O ≈ U Vᵀ`` of ``B̃ = U S Vᵀ``),
    ``W ← W(1 − η wd) − η √max(1, rows/cols) O``. Which parameters: see ``tensorcurv.optim.muon``."""

    lr: float = 0.02
    """Learning rate η of the Muon matrices (> 0; vary it with a torch LR scheduler on ``.optimizer``)."""
    momentum: float = 0.95
    """Momentum μ of the Muon matrices, in [0, 1)."""
    nesterov: bool = True
    """Orthogonalize ``G + μ B`` (Nesterov) rather than ``B``."""
    ns_steps: int = 5
    """Newton–Schulz iterations k (an integer in [1, 99])."""
    adjust_lr: str = "original"
    """Per-matrix scale of η: ``original`` (√max(1, rows/cols)) or ``match_rms_adamw`` (0.2 √max(rows, cols))."""
    weight_decay: float = 0.0
    """Decoupled weight decay of the Muon matrices: ``W ← W(1 − η wd)``."""
    adamw_lr: float = 1e-3
    """Learning rate of the AdamW parameters (biases, norms, embeddings, output layer, non-2-D weights)."""
    adamw_beta1: float = 0.9
    """AdamW first-moment decay β1 in [0, 1)."""
    adamw_beta2: float = 0.999
    """AdamW second-moment decay β2 in [0, 1)."""
    adamw_eps: float = 1e-8
    """AdamW ε added to √v̂."""
    adamw_weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adamw_first_layer: bool = False
    """Give the first weight matrix (the input layer) to AdamW too; Jordan et al. exclude input embeddings,
    which are always on AdamW, so a dense input layer stays on Muon by default."""
    adamw_last_layer: bool = True
    """Give the last weight matrix (the output layer) to AdamW, as Jordan et al. recommend."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value before the update (None: off)."""

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        _in_unit("momentum", self.momentum)
        _flag("nesterov", self.nesterov)
        if not (isinstance(self.ns_steps, int) and not isinstance(self.ns_steps, bool) and 1 <= self.ns_steps < 100):
            raise ValueError(f"ns_steps must be an integer in [1, 99], got {self.ns_steps!r}")
        if self.adjust_lr not in MUON_ADJUST_LR:
            raise ValueError(f"adjust_lr={self.adjust_lr!r} is not one of {list(MUON_ADJUST_LR)}")
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _positive("adamw_lr", self.adamw_lr)
        _in_unit("adamw_beta1", self.adamw_beta1)
        _in_unit("adamw_beta2", self.adamw_beta2)
        _positive("adamw_eps", self.adamw_eps)
        _positive("adamw_weight_decay", self.adamw_weight_decay, allow_zero=True)
        _flag("adamw_first_layer", self.adamw_first_layer)
        _flag("adamw_last_layer", self.adamw_last_layer)
        _optional_positive("grad_clip", self.grad_clip)


@dataclass
class SOAPConfig(SGDConfig):
    """SOAP (Vyas et al. 2024): Adam run in the eigenbasis of Shampoo's factors. Per matrix ``G``:
    ``L ← β_s L + (1−β_s) G Gᵀ``, ``R ← β_s R + (1−β_s) GᵀG``, eigenvectors ``Q_L, Q_R`` refreshed every
    ``precondition_frequency`` steps; Adam's moments of ``G' = Q_Lᵀ G Q_R``, the step mapped back by
    ``Q_L · Q_Rᵀ``; decoupled weight decay. The first step only initializes the factors (no update)."""

    lr: Number = 3e-3
    weight_decay: float = 0.01
    """Decoupled weight decay ``θ ← θ(1 − η wd)`` (after the step)."""
    beta1: float = 0.95
    """First-moment decay β1 in [0, 1)."""
    beta2: float = 0.95
    """Second-moment decay β2 in [0, 1) (and the factors' decay β_s when ``shampoo_beta`` is None)."""
    shampoo_beta: float | None = None
    """Decay β_s of the Shampoo factors L, R, in [0, 1) (None: β2)."""
    eps: float = 1e-8
    """ε added to √v."""
    precondition_frequency: int = 10
    """Refresh the eigenbases every k steps (an integer >= 1)."""
    max_precondition_dim: int = 10000
    """Dimensions larger than this are not rotated (identity basis)."""
    precondition_1d: bool = False
    """Rotate 1-D parameters (biases) too."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _in_unit("beta1", self.beta1)
        _in_unit("beta2", self.beta2)
        if self.shampoo_beta is not None:
            _in_unit("shampoo_beta", self.shampoo_beta)
        _positive("eps", self.eps)
        _interval("precondition_frequency", self.precondition_frequency)
        _interval("max_precondition_dim", self.max_precondition_dim)
        _flag("precondition_1d", self.precondition_1d)


@dataclass
class ShampooConfig(SGDConfig):
    """Shampoo (Gupta et al. 2018): per matrix ``G`` (m×n), ``L ← L + G Gᵀ``, ``R ← R + GᵀG`` from
    ``L₀ = εI``, ``R₀ = εI``; ``θ ← θ − η L^{-1/4} G R^{-1/4}`` (order-k tensors: the ``-1/(2k)`` root of
    each mode's factor). ``weight_decay`` is coupled (L2 added to the gradient)."""

    lr: Number = 1e-3
    momentum: float = 0.0
    """Momentum on the gradient, in [0, 1) (0: the paper's plain Shampoo)."""
    eps: float = 1e-6
    """ε of the initial factors ``εI`` (> 0)."""
    update_interval: int = 1
    """Recompute the inverse roots every k steps (an integer >= 1; the factors accumulate every step)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _in_unit("momentum", self.momentum)
        _positive("eps", self.eps)
        _interval("update_interval", self.update_interval)


@dataclass
class PSGDKronConfig(SGDConfig):
    """PSGD-Kron (Li 2015, 2018): preconditioner ``P = QᵀQ`` with Kronecker-factored ``Q`` (one triangular or
    diagonal factor per tensor mode), fitted online by descent on ``E[hᵀP h + vᵀP^{-1}v]`` with ``h`` the
    momentum and ``v ~ N(0, I)``, whose minimizer is ``P = E[h hᵀ]^{-1/2}`` (gradient whitening);
    ``θ ← θ − η c(P m̂)``, ``m̂`` the bias-corrected momentum, ``c`` capping the update's RMS at 1.1;
    decoupled weight decay on matrices only."""

    lr: Number = 1e-3
    weight_decay: float = 0.0
    """Decoupled weight decay of the matrices (2-D and up): ``θ ← θ − η wd θ``; none on biases."""
    momentum: float = 0.9
    """Momentum β of ``m ← β m + (1−β) g``, in [0, 1)."""
    precondition_update_probability: float | None = None
    """Probability of updating Q at a step, in (0, 1] (None: 1 for 500 steps, then decaying to 0.03)."""
    max_size_triangular: int = 8192
    """Modes larger than this get a diagonal factor."""
    memory_save_mode: str | None = None
    """None (triangular factors), one_diag, smart_one_diag or all_diag (diagonal factors for some/all modes)."""
    precondition_dtype: str = "float32"
    """dtype of Q: float32, float64, or param (the parameter's dtype)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _in_unit("momentum", self.momentum)
        p = self.precondition_update_probability
        if p is not None and not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 1):
            raise ValueError(f"precondition_update_probability must be in (0, 1] or None, got {p!r}")
        _interval("max_size_triangular", self.max_size_triangular)
        if self.memory_save_mode not in KRON_MEMORY_SAVE_MODES:
            raise ValueError(f"memory_save_mode={self.memory_save_mode!r} is not one of {list(KRON_MEMORY_SAVE_MODES)}")
        if self.precondition_dtype not in KRON_PRECONDITION_DTYPES:
            raise ValueError(
                f"precondition_dtype={self.precondition_dtype!r} is not one of {list(KRON_PRECONDITION_DTYPES)}"
            )


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

    def __post_init__(self) -> None:
        from tensorcurv import structures
        from tensorcurv.core.exact import Coupling
        from tensorcurv.optim.refine import RefineOperator

        _positive("lr", self.lr, allow_callable=True)
        _positive("damping", self.damping, allow_callable=True)
        if self.structure not in structures.names():
            raise ValueError(f"structure={self.structure!r} is not one of {structures.names()}")
        self.kind = CurvatureKind.parse(self.kind, "kind")
        _interval("mc_samples", self.mc_samples)
        if self.decay is not None:
            _in_unit("decay", self.decay)
        self.decay_schedule = DecaySchedule.parse(self.decay_schedule, "decay_schedule")
        _interval("stats_interval", self.stats_interval)
        _interval("inverse_interval", self.inverse_interval)
        _in_unit("momentum", self.momentum)
        _positive("weight_decay", self.weight_decay, allow_zero=True)
        _optional_positive("grad_clip", self.grad_clip)
        _optional_positive("kl_clip", self.kl_clip)
        self.damping_rule = DampingRule.parse(self.damping_rule, "damping_rule")
        if self.damping_rule == "lm" and callable(self.damping):
            raise ValueError("damping: a callable damping cannot be combined with damping_rule='lm'")
        _interval("lm_interval", self.lm_interval)
        if not (isinstance(self.lm_factor, (int, float)) and self.lm_factor > 1):
            raise ValueError(f"lm_factor must be > 1, got {self.lm_factor!r}")
        if not (
            isinstance(self.rho_low, (int, float))
            and isinstance(self.rho_high, (int, float))
            and self.rho_low < self.rho_high
        ):
            raise ValueError(f"rho_low must be < rho_high, got {self.rho_low!r} and {self.rho_high!r}")
        _positive("min_damping", self.min_damping)
        _positive("max_damping", self.max_damping)
        if self.min_damping > self.max_damping:
            raise ValueError(f"min_damping ({self.min_damping}) must be <= max_damping ({self.max_damping})")
        self.fallback = Fallback.parse(self.fallback, "fallback")
        if not (isinstance(self.refine, int) and not isinstance(self.refine, bool) and self.refine >= 0):
            raise ValueError(f"refine must be an integer >= 0 (PCG steps per step; 0: off), got {self.refine!r}")
        _positive("refine_tol", self.refine_tol)
        self.refine_coupling = Coupling.parse(self.refine_coupling, "refine_coupling")
        self.refine_operator = RefineOperator.parse(self.refine_operator, "refine_operator")
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


__all__ = [n for n in dir() if n.endswith("Config")] + [
    "CONFIGS",
    "make_config",
    "config_class",
    "field_names",
    "split_structure_hparams",
]
