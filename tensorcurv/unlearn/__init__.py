"""Machine unlearning by approximate retraining (Warnecke et al., NDSS 2023) with tensorcurv curvature.

obj = Objective(model, "cross_entropy", mu)                 # L(D; θ) = Σ ℓ_i + (μ/2)‖θ‖²
aff = AffectedSet.relabel(indices, y_correct)               # or AffectedSet.removal(indices)
res = second_order_update(model, X, y, aff, build_solver("kfac"), mu=mu)
res.status, res.theta, res.time                             # model updated only if res.ok
"""

from tensorcurv.unlearn.ihvp import CGSolver, ExactSolver, LiSSASolver, build_solver
from tensorcurv.unlearn.ihvp_base import IHVPResult, IHVPSolver
from tensorcurv.unlearn.objective import Objective
from tensorcurv.unlearn.structure_solver import StructureSolver
from tensorcurv.unlearn.training import TrainResult, train_lbfgs
from tensorcurv.unlearn.updates import (
    AffectedSet,
    UpdateResult,
    first_order_update,
    gradient_difference,
    second_order_update,
)

__all__ = [
    "AffectedSet",
    "CGSolver",
    "ExactSolver",
    "IHVPResult",
    "IHVPSolver",
    "LiSSASolver",
    "Objective",
    "StructureSolver",
    "TrainResult",
    "UpdateResult",
    "build_solver",
    "first_order_update",
    "gradient_difference",
    "second_order_update",
    "train_lbfgs",
]
