"""Hyper-parameter dataclasses of the first-order optimizers: SGD … Lion and the 2026 baselines
(Muon, SOAP, Shampoo, PSGD-Kron), validated on construction.

The registry of every optimizer's config (``CONFIGS``, ``make_config``) is ``tensorcurv.optim.config``;
``lr`` may be a callable of the step counter where its type says ``Number``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tensorcurv.optim.config_checks import (
    check_flag,
    check_in_unit,
    check_interval,
    check_l1,
    check_optional_positive,
    check_positive,
)

Number = float | Callable[[int], float]


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
    l1: float = 0.0
    """L1 penalty α of ``α‖θ‖₁``: a soft-thresholding step ``prox_{ηα}`` after each update (0: off)."""
    l1_fista: bool = False
    """Under ``l1``: FISTA (Nesterov extrapolation of the proximal iterates) instead of ISTA."""

    def __post_init__(self) -> None:
        check_positive("lr", self.lr, allow_callable=True)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_optional_positive("grad_clip", self.grad_clip)
        check_l1(self.l1, self.l1_fista)


@dataclass
class MomentumConfig(SGDConfig):
    """Heavy ball (torch convention): ``b ← γ b + ∇L``, ``θ ← θ − η b``. This is the course's
    ``v ← γ v + (1−γ)∇L``, ``θ ← θ − η' v`` with ``η = η'(1−γ)``."""

    momentum: float = 0.9
    """Momentum γ in [0, 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_in_unit("momentum", self.momentum)


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
        check_positive("eps", self.eps)


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
        check_in_unit("alpha", self.alpha)
        check_positive("eps", self.eps)


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
        check_in_unit("beta1", self.beta1)
        check_in_unit("beta2", self.beta2)
        check_positive("eps", self.eps)


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
        check_in_unit("beta1", self.beta1)
        check_in_unit("beta2", self.beta2)


# ---------------------------------------------------------------------------- 2026 baselines
MUON_ADJUST_LR = ("original", "match_rms_adamw")
KRON_MEMORY_SAVE_MODES = (None, "one_diag", "smart_one_diag", "all_diag")
KRON_PRECONDITION_DTYPES = ("float32", "float64", "param")


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
    l1: float = 0.0
    """L1 penalty α of ``α‖θ‖₁``: a soft-thresholding step ``prox_{ηα}`` after each update (0: off)."""
    l1_fista: bool = False
    """Under ``l1``: FISTA (Nesterov extrapolation of the proximal iterates) instead of ISTA."""

    def __post_init__(self) -> None:
        check_positive("lr", self.lr)
        check_in_unit("momentum", self.momentum)
        check_flag("nesterov", self.nesterov)
        if not (isinstance(self.ns_steps, int) and not isinstance(self.ns_steps, bool) and 1 <= self.ns_steps < 100):
            raise ValueError(f"ns_steps must be an integer in [1, 99], got {self.ns_steps!r}")
        if self.adjust_lr not in MUON_ADJUST_LR:
            raise ValueError(f"adjust_lr={self.adjust_lr!r} is not one of {list(MUON_ADJUST_LR)}")
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("adamw_lr", self.adamw_lr)
        check_in_unit("adamw_beta1", self.adamw_beta1)
        check_in_unit("adamw_beta2", self.adamw_beta2)
        check_positive("adamw_eps", self.adamw_eps)
        check_positive("adamw_weight_decay", self.adamw_weight_decay, allow_zero=True)
        check_flag("adamw_first_layer", self.adamw_first_layer)
        check_flag("adamw_last_layer", self.adamw_last_layer)
        check_optional_positive("grad_clip", self.grad_clip)
        check_l1(self.l1, self.l1_fista)


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
        check_in_unit("beta1", self.beta1)
        check_in_unit("beta2", self.beta2)
        if self.shampoo_beta is not None:
            check_in_unit("shampoo_beta", self.shampoo_beta)
        check_positive("eps", self.eps)
        check_interval("precondition_frequency", self.precondition_frequency)
        check_interval("max_precondition_dim", self.max_precondition_dim)
        check_flag("precondition_1d", self.precondition_1d)


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
        check_in_unit("momentum", self.momentum)
        check_positive("eps", self.eps)
        check_interval("update_interval", self.update_interval)


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
        check_in_unit("momentum", self.momentum)
        p = self.precondition_update_probability
        if p is not None and not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 1):
            raise ValueError(f"precondition_update_probability must be in (0, 1] or None, got {p!r}")
        check_interval("max_size_triangular", self.max_size_triangular)
        if self.memory_save_mode not in KRON_MEMORY_SAVE_MODES:
            raise ValueError(f"memory_save_mode={self.memory_save_mode!r} is not one of {list(KRON_MEMORY_SAVE_MODES)}")
        if self.precondition_dtype not in KRON_PRECONDITION_DTYPES:
            raise ValueError(
                f"precondition_dtype={self.precondition_dtype!r} is not one of {list(KRON_PRECONDITION_DTYPES)}"
            )
