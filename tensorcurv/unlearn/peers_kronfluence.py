"""kronfluence's EK-FAC influence (Grosse et al. 2023) as a peer second-order unlearning update.

kronfluence (an optional ``bench`` extra) fits, per ``nn.Linear`` / ``nn.Conv2d`` module with output
gradient ``g`` and input activation ``a`` (a 1 appended for the bias), on the *mean* over the ``N``
fitting points:

    A = E[a aᵀ] = Q_A diag(·) Q_Aᵀ,   G = E[g gᵀ] = Q_G diag(·) Q_Gᵀ,   Λ = E[(Q_Gᵀ ∇_W ℓ Q_A)²]  (per sample)

and preconditions a gradient ``V`` (shape ``(out, in + 1)``, bias last column) by

    P(V) = Q_G [(Q_Gᵀ V Q_A) / (Λ + d)] Q_Aᵀ,    d = damping factor.

``F̂ = N · (Q_A ⊗ Q_G) diag(Λ) (Q_A ⊗ Q_G)ᵀ`` approximates the curvature of the *sum* loss, so with
``Δg = Σ_Z̃ ∇ℓ − Σ_Z ∇ℓ`` (:func:`~tensorcurv.unlearn.updates.gradient_difference`) the update is

    θ = θ* − τ Δ,   Δ = P(Δg) / N = (F̂ + N d I)^{-1} Δg,

the second-order update of :mod:`.updates` with kronfluence's EK-FAC in place of ``H + μI``. ``d``:

* ``"heuristic"`` (one of the benchmark's two entries): kronfluence's ``damping_factor=None``, ``d = 0.1 · mean(Λ)``
  per module; the objective's ``μ`` is then not used (kronfluence's own default is ``d = 1e-8``, which
  leaves ``F̂`` nearly singular in the directions the data do not reach);
* ``"objective"``: ``d = μ / N``, i.e. exactly the objective's ``μI``: ``Δ = (F̂ + μI)^{-1} Δg``, the
  quantity of tensorcurv's ``ekfac`` structure solve;
* a number: ``d`` itself (kronfluence's ``damping_factor``, on the mean-loss scale).

Which Fisher is fitted (``labels``): ``"sampled"``, kronfluence's true Fisher: one label per point drawn
from the model's predictive distribution at ``θ*`` (seeded, drawn once here so that the covariance and
``Λ`` passes see the same draw; kronfluence then fits on the labels it is given), ``E`` over the draw is
the GGN; ``"all"``: every class ``k`` of every point, weighted ``√(K p_k)``, so that ``A``, ``G`` and ``Λ``
are those of the exact GGN (``K`` times the fitting cost); ``"true"``: the training labels (empirical
Fisher). Only the cross-entropy loss is supported, and every trainable parameter must sit in a
Linear / Conv2d module (kronfluence tracks no other layer).

The one-off cost (:class:`KronfluenceEKFAC`) is kronfluence's ``Analyzer.fit_all_factors`` (covariances,
eigendecompositions, ``Λ``) on ``D`` at ``θ*``, in a temporary directory. A request (:meth:`update`) runs
kronfluence's query-gradient aggregation on the ``|Z| + |Z̃|`` affected rows, each weighted ``±1`` so that
the summed gradient is ``Δg``, lets kronfluence precondition the sum, and reads the preconditioned matrix
each tracked module stores (``ACCUMULATED_PRECONDITIONED_GRADIENT``) back into the flat ``θ`` layout.
The factors are fitted on ``D``, not on ``D̃`` (a label flip leaves the sampled and exact Fisher
unchanged; a removal differs by the ``|Z|`` removed rows). kronfluence keeps one process-wide device state,
set by its first ``Analyzer`` (CPU when the model is on the CPU).
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import warnings
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from tensorcurv.unlearn.ihvp_base import IHVPResult
from tensorcurv.unlearn.objective import Objective
from tensorcurv.unlearn.updates import AffectedSet, UpdateResult, finish_update

LABELS = ("sampled", "all", "true")
TRACKED = (nn.Linear, nn.Conv2d)


def kronfluence_api() -> SimpleNamespace:
    """kronfluence's entry points, imported on first use (seconds; the bench extra may be absent): ``ImportError``
    if it is missing. Warnings filters its import adds (its dependencies add some) are undone."""
    with warnings.catch_warnings():
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.module import utils
        from kronfluence.module.tracked_module import ModuleMode, TrackedModule
        from kronfluence.task import Task
        from kronfluence.utils.constants import ACCUMULATED_PRECONDITIONED_GRADIENT_NAME

    class WeightedCrossEntropyTask(Task):
        """kronfluence task on batches ``(x, label, w)``: ``Σ_i w_i CE(f(x_i), label_i)``, for the fit (labels
        and weights chosen by :func:`fisher_rows`) and for the measurement (``w = ±1``: the summed gradient
        is ``Δg``). It never samples: the fit runs with kronfluence's ``use_empirical_fisher=True``."""

        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            x, label, w = batch
            return (w * F.cross_entropy(model(x), label, reduction="none")).sum()

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            return self.compute_train_loss(batch, model)

    return SimpleNamespace(
        Analyzer=Analyzer,
        prepare_model=prepare_model,
        FactorArguments=FactorArguments,
        ScoreArguments=ScoreArguments,
        utils=utils,
        ModuleMode=ModuleMode,
        TrackedModule=TrackedModule,
        Task=WeightedCrossEntropyTask,
        PRECONDITIONED=ACCUMULATED_PRECONDITIONED_GRADIENT_NAME,
    )


def unavailable_reason() -> str | None:
    """None if kronfluence imports, else a one-line reason."""
    try:
        kronfluence_api()
    except ImportError as err:
        return f"kronfluence is not importable ({err}); install the bench extra (make bench-setup)"
    return None


def fisher_rows(model: nn.Module, X: Tensor, y: Tensor, labels: str, seed: int) -> TensorDataset:
    """The rows ``(x, label, w)`` the factors are fitted on (see the module docstring for ``labels``)."""
    if labels not in LABELS:
        raise ValueError(f"kronfluence: labels must be one of {LABELS}, got {labels!r}")
    ones = torch.ones(len(y), dtype=X.dtype, device=X.device)
    if labels == "true":
        return TensorDataset(X, y, ones)
    with torch.no_grad():
        p = torch.softmax(model(X).flatten(1).double(), dim=1)
    if labels == "sampled":
        gen = torch.Generator(device="cpu").manual_seed(seed)
        draw = torch.multinomial(p.cpu(), 1, generator=gen).reshape(-1).to(y.device)
        return TensorDataset(X, draw, ones)
    N, K = p.shape
    classes = torch.arange(K, device=y.device).repeat(N)
    w = (K * p).sqrt().reshape(-1).to(X.dtype)  # Σ_k (√(K p_k))² (e_k − p)(e_k − p)ᵀ / K = diag(p) − ppᵀ
    return TensorDataset(X.repeat_interleave(K, dim=0), classes, w)


def tracked_parameters(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """``{parameter name: (module name, module)}`` for the trainable parameters kronfluence tracks;
    ``ValueError`` naming any trainable parameter outside a Linear / Conv2d module."""
    owner: dict[str, tuple[str, nn.Module]] = {}
    for mname, m in model.named_modules():
        if isinstance(m, TRACKED):
            for pname, _ in m.named_parameters(recurse=False):
                owner[f"{mname}.{pname}" if mname else pname] = (mname, m)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in owner]
    if missing:
        raise ValueError(f"kronfluence tracks Linear and Conv2d modules only; untracked parameters: {missing}")
    return owner


class KronfluenceEKFAC:
    """kronfluence's EK-FAC factors of ``D`` at the model's current ``θ*`` (one-off), serving requests.

    Args:
        model: the trained model at ``θ*`` (copied: kronfluence wraps the modules of its own copy).
        X: the training inputs ``D``.
        y: the training labels of ``D``.
        mu: the objective's L2 weight (used by ``damping="objective"`` only).
        damping: ``"heuristic"``, ``"objective"`` or a number ``d ≥ 0`` (module docstring).
        labels: ``"sampled"``, ``"all"`` or ``"true"`` (module docstring).
        batch_size: rows per kronfluence batch.
        seed: the seed of the sampled labels.
    """

    def __init__(
        self,
        model: nn.Module,
        X: Tensor,
        y: Tensor,
        *,
        mu: float = 0.0,
        damping: float | str = "heuristic",
        labels: str = "sampled",
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        kf = self.kf = kronfluence_api()
        self.N = X.shape[0]
        self.damping_factor = self._damping_factor(damping, mu, self.N)
        self.damping, self.labels, self.batch_size = damping, labels, int(batch_size)
        self.obj = Objective(model, "cross_entropy", mu)
        self.owner = tracked_parameters(model)
        self.theta_star = self.obj.theta()
        self.X, self.y = X, y
        dtype = X.dtype
        self.factor_args = kf.FactorArguments(
            strategy="ekfac",
            use_empirical_fisher=True,  # the labels of the rows are the Fisher's labels (fisher_rows)
            covariance_max_examples=None,
            lambda_max_examples=None,
            activation_covariance_dtype=dtype,
            gradient_covariance_dtype=dtype,
            per_sample_gradient_dtype=dtype,
            lambda_dtype=dtype,
        )
        self.score_args = kf.ScoreArguments(
            damping_factor=self.damping_factor,
            aggregate_query_gradients=True,
            per_sample_gradient_dtype=dtype,
            precondition_dtype=dtype,
            score_dtype=dtype,
        )
        self.task = kf.Task()
        rows = fisher_rows(model, X, y, labels, seed)
        # wrapped, so that a model that is itself a Linear / Conv2d has a parent kronfluence can replace it in
        self.model = kf.prepare_model(nn.Sequential(OrderedDict(model=copy.deepcopy(model))), self.task)
        cpu = next(model.parameters()).device.type == "cpu"
        with tempfile.TemporaryDirectory(prefix="kronfluence-") as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.GradScaler", category=FutureWarning)
            analyzer = kf.Analyzer("unlearn", self.model, self.task, cpu=cpu, disable_tqdm=True, output_dir=tmp)
            analyzer.fit_all_factors(
                "ekfac", rows, per_device_batch_size=self.batch_size, factor_args=self.factor_args,
                overwrite_output_dir=True,
            )  # fmt: skip
            self.factors = analyzer.load_all_factors("ekfac")
        self.device = next(self.model.parameters()).device
        self.oneoff_time = time.perf_counter() - t0
        self.oneoff_cpu_time = time.process_time() - c0

    @staticmethod
    def _damping_factor(damping: float | str, mu: float, N: int) -> float | None:
        if damping == "heuristic":
            return None
        if damping == "objective":
            return float(mu) / N
        if isinstance(damping, (int, float)) and math.isfinite(damping) and damping >= 0:
            return float(damping)
        raise ValueError(f"kronfluence: damping must be 'heuristic', 'objective' or a number >= 0, got {damping!r}")

    # ------------------------------------------------------------------ the preconditioned vector
    def precondition(self, rows: TensorDataset) -> Tensor:
        """``P(Σ_rows w ∇ℓ)`` as a flat vector in the order of ``θ`` (kronfluence's mean-scale damping ``d``)."""
        kf, modules = self.kf, self._module_names()
        kf.utils.update_factor_args(self.model, self.factor_args)
        kf.utils.update_score_args(self.model, self.score_args)
        kf.utils.set_mode(self.model, kf.ModuleMode.GRADIENT_AGGREGATION, release_memory=True)
        for name, factor in self.factors.items():
            kf.utils.set_factors(self.model, name, factor, clone=True)
        kf.utils.prepare_modules(self.model, modules, self.device)  # Λ ← 1 / (Λ + d)
        for start in range(0, len(rows), self.batch_size):
            batch = [t[start : start + self.batch_size].to(self.device) for t in rows.tensors]
            self.model.zero_grad(set_to_none=True)
            self.task.compute_measurement(batch, self.model).backward()
        kf.utils.set_mode(self.model, kf.ModuleMode.PRECONDITION_GRADIENT)
        kf.utils.finalize_all_iterations(self.model, modules)  # preconditions the summed gradient
        mats = {
            m.name: m.get_factor(kf.PRECONDITIONED)[0] for m in self.model.modules() if isinstance(m, kf.TrackedModule)
        }
        kf.utils.set_mode(self.model, kf.ModuleMode.DEFAULT, release_memory=True)
        return self._to_flat(mats)

    def _module_names(self) -> list[str]:
        return [m.name for m in self.model.modules() if isinstance(m, self.kf.TrackedModule)]

    def _to_flat(self, mats: dict[str, Tensor]) -> Tensor:
        """Module matrices ``(out, in·k·k [+ 1])`` (bias last column) to the flat ``θ`` of the objective."""
        parts = []
        for pname, shape in zip(self.obj.names, self.obj.shapes):
            mname, module = self.owner[pname]
            M = mats[f"model.{mname}" if mname else "model"]
            has_bias = getattr(module, "bias", None) is not None
            part = M[:, -1] if pname.endswith("bias") else (M[:, :-1] if has_bias else M)
            parts.append(part.reshape(shape))
        return self.obj.flatten(parts).to(self.theta_star.dtype)

    # ------------------------------------------------------------------ the request
    def delta_rows(self, affected: AffectedSet) -> TensorDataset:
        """``Z̃`` with weight ``+1`` and ``Z`` with weight ``−1``: their summed gradient is ``Δg``."""
        Zx, Zy = affected.original(self.X, self.y)
        Zx_new, Zy_new = affected.corrected(self.X, self.y)
        w = torch.cat([torch.ones(len(Zy_new)), -torch.ones(len(Zy))]).to(self.X)
        return TensorDataset(torch.cat([Zx_new, Zx]), torch.cat([Zy_new, Zy]), w)

    def update(self, affected: AffectedSet, *, tau: float = 1.0) -> UpdateResult:
        """``θ = θ* − τ P(Δg) / N``; the model given to the constructor is never written."""
        if not (isinstance(tau, (int, float)) and math.isfinite(tau)):
            raise ValueError(f"tau must be a finite number, got {tau!r}")
        t0 = time.perf_counter()
        affected.check(self.X, self.y)
        rows = self.delta_rows(affected)
        t1 = time.perf_counter()
        x = self.precondition(rows) / self.N
        t2 = time.perf_counter()
        r = IHVPResult(x, bool(torch.isfinite(x).all()), "kronfluence:ekfac", time=t2 - t1)
        res = UpdateResult(
            r.method,
            "ok" if r.converged else "non-finite update",
            self.theta_star - tau * x if r.converged else self.theta_star.clone(),
            self.theta_star,
            tau=tau,
            times={"grad_diff": t1 - t0, "prepare": 0.0, "solve": t2 - t1},
            ihvp=[r],
            info={
                "oneoff_time": self.oneoff_time,
                "oneoff_cpu_time": self.oneoff_cpu_time,
                "damping": self.damping,
                "labels": self.labels,
            },
        )
        return finish_update(self.obj, res, False, t0)


def kronfluence_update(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    affected: AffectedSet,
    *,
    loss="cross_entropy",
    mu: float = 0.0,
    tau: float = 1.0,
    **kwargs: Any,
) -> UpdateResult:
    """Fit :class:`KronfluenceEKFAC` on ``D`` at the model's ``θ*`` and answer one request; never writes the model.

    ``info["oneoff_time"]`` (``"oneoff_cpu_time"``: its process CPU time): the fit and kronfluence's first
    import. Without kronfluence: status
    ``"unavailable: <reason>"`` and ``θ*``. ``kwargs``: the constructor's ``damping``, ``labels``,
    ``batch_size``, ``seed``."""
    t0, c0 = time.perf_counter(), time.process_time()
    reason = unavailable_reason()  # the first call imports kronfluence: part of the one-off cost
    if reason is not None:
        theta = Objective(model, loss, mu).theta()
        return UpdateResult("kronfluence:ekfac", f"unavailable: {reason}", theta.clone(), theta)
    name = getattr(loss, "name", loss)
    if name != "cross_entropy":
        raise ValueError(f"kronfluence peer: only the cross-entropy loss is supported, got {loss!r}")
    import_time, import_cpu = time.perf_counter() - t0, time.process_time() - c0
    res = KronfluenceEKFAC(model, X, y, mu=mu, **kwargs).update(affected, tau=tau)
    res.info["oneoff_time"] += import_time
    res.info["oneoff_cpu_time"] += import_cpu
    return res
