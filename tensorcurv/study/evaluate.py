"""All metrics of every structure variant on one capture (one checkpoint, one curvature kind).

Per (variant, layer): Frobenius error (:mod:`.frobenius`), spectral error (:mod:`.spectral`), inverse
quality of the damped solve (:mod:`.directions`); per variant a model row with the block-diagonal and
the full (cross-layer) error and the whole-model solve; per layer the rank-r Kronecker floors; the
spectra of one layer; the direction study (:mod:`.direction_study`). The exact side comes from
:mod:`tensorcurv.core.exact`.

Frobenius and spectral errors describe the operator a structure solves with only when that operator
is block-diagonal (``ModelStructure.block_diagonal``): a coupled preconditioner (``two_level``, whose
``mv``/``to_dense`` and layer blocks are its base) gets no per-layer rows and NaN Frobenius errors in
its model row; its whole-model directions are measured like every other structure's.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from tensorcurv import structures
from tensorcurv.core.exact import ExactBlock, ExactModel
from tensorcurv.core.stats import LayerStats
from tensorcurv.study.direction_study import layer_direction_rows, model_direction_rows, reference_rows
from tensorcurv.study.directions import exact_directions, inverse_quality, model_direction_quality
from tensorcurv.study.frobenius import frobenius_error, kronecker_floor
from tensorcurv.study.spectral import spectral_error, structure_spectrum
from tensorcurv.study.variants import Variant, format_value


def _fit_variant(variant: Variant, stats: Mapping[str, LayerStats]):
    """Fit one variant's model-level structure to every layer; returns it and the fit time (seconds)."""
    hp = structures.make_hparams(variant.structure, **variant.hparams)
    t0 = time.perf_counter()
    ms = structures.get(variant.structure).for_model({k: st.shape for k, st in stats.items()}, hp).fit(dict(stats))
    return ms, time.perf_counter() - t0


@dataclass
class ExactReference:
    """The exact side of one capture, shared by every variant: per-layer blocks and ``‖C_ll‖²``, the
    model operator with ``‖C‖²`` and the off-diagonal share, and the exact damped directions."""

    blocks: dict[str, ExactBlock]
    model: ExactModel
    layer_frob_sq: dict[str, float]
    model_frob_sq: float
    offdiag_sq: float
    directions: dict[str, dict[float, tuple[float, Tensor, dict[str, Any]]]]
    model_directions: dict[float, tuple[float, dict[str, Tensor], dict[str, Any]]]


def exact_reference(
    stats: Mapping[str, LayerStats], grads: Mapping[str, Tensor], damping_rel: Sequence[float], chunk: int = 128
) -> ExactReference:
    """:class:`ExactReference` of ``stats``; the model directions use ``λ = ρ tr(C)/dim`` of the whole model."""
    blocks = {k: ExactBlock(st, chunk=chunk) for k, st in stats.items()}
    model = ExactModel(blocks)
    cc = {k: b.frobenius_sq() for k, b in blocks.items()}
    cc_model = model.frobenius_sq()
    offdiag_sq = max(cc_model - sum(cc.values()), 0.0)
    exact = {k: exact_directions(b, grads[k], damping_rel) for k, b in blocks.items()}
    base_model = model.trace() / model.dim
    exact_model = {float(r): (float(r) * base_model, *model.solve(grads, float(r) * base_model)) for r in damping_rel}
    return ExactReference(blocks, model, cc, cc_model, offdiag_sq, exact, exact_model)


def _subset(table: Mapping[float, Any], damping_rel: Sequence[float]) -> dict[float, Any]:
    return {float(r): table[float(r)] for r in damping_rel}


def _floor_rows(ref: ExactReference, ranks: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for k, b in ref.blocks.items():
        try:
            floors = kronecker_floor(b, ranks, ref.layer_frob_sq[k])
        except ImportError:  # tensorcurv.linalg.rearrange not available
            floors = {}
        for r, f in floors.items():
            rows.append({"layer": k, "m": b.m, "n": b.n, "rank": r, "floor": f})
    return rows


def _variant_columns(var: Variant) -> dict[str, Any]:
    return {
        "structure": var.structure,
        "variant": var.label,
        "hparams": json.dumps(var.hparams, sort_keys=True),
        **_swept(var),
    }


def _layer_row(
    var: Variant,
    k: str,
    S,
    ref: ExactReference,
    grad: Tensor,
    fit_time: float,
    *,
    damping_rel: Sequence[float],
    spectral: bool,
    spectral_max_iter: int,
    spectral_tol: float,
    solve_repeats: int,
) -> dict[str, Any]:
    """One (variant, layer) row: Frobenius, spectral (optional) and inverse-quality columns."""
    b = ref.blocks[k]
    row = {
        "layer": k,
        "m": b.m,
        "n": b.n,
        "T": b.stats.T,
        **_variant_columns(var),
        "nbytes": S.nbytes,
        "fit_time": fit_time,
        "c_frob": math.sqrt(ref.layer_frob_sq[k]),
    }
    fe = frobenius_error(S, b, ref.layer_frob_sq[k])
    row.update(fro_rel=fe["fro_rel"], fro_abs=fe["fro_abs"])
    if spectral:
        se = spectral_error(S, b, max_iter=spectral_max_iter, tol=spectral_tol)
        row.update(spec_rel=se["spec_rel"], spec_abs=se["spec_abs"], asym=se["asym"])
    iq = inverse_quality(S, b, grad, damping_rel, exact=ref.directions[k], repeats=solve_repeats)
    row.update(_inverse_columns(iq))
    return row


def _model_row(
    var: Variant,
    ref: ExactReference,
    err_sq_total: float,
    ms,
    fit_total: float,
    grads: Mapping[str, Tensor],
    damping_rel: Sequence[float],
) -> dict[str, Any]:
    """The ``layer="(model)"`` row: block-diagonal and full errors (NaN for a structure that is not
    block-diagonal: its blocks are not what it solves with), and the whole-model solve."""
    cc_sum, offdiag_sq = sum(ref.layer_frob_sq.values()), ref.offdiag_sq
    nan = math.nan
    mrow = {
        "layer": "(model)",
        "m": None,
        "n": None,
        "T": None,
        **_variant_columns(var),
        "nbytes": ms.nbytes,
        "fit_time": fit_total,
        "c_frob": math.sqrt(cc_sum),
        "fro_rel": math.sqrt((err_sq_total - offdiag_sq) / cc_sum) if ms.block_diagonal else nan,
        "fro_abs": math.sqrt(err_sq_total - offdiag_sq) if ms.block_diagonal else nan,
        "fro_rel_full": math.sqrt(err_sq_total / ref.model_frob_sq) if ms.block_diagonal else nan,
        "offdiag_share": math.sqrt(offdiag_sq / ref.model_frob_sq),
    }
    iq = []
    for rho in damping_rel:
        lam, x, _ = ref.model_directions[float(rho)]
        t0 = time.perf_counter()
        xh = ms.solve(dict(grads), lam)
        iq.append({"damping_rel": float(rho), **model_direction_quality(x, xh), "solve_time": time.perf_counter() - t0})
    mrow.update(_inverse_columns(iq))
    return mrow


def evaluate(
    stats: Mapping[str, LayerStats],
    grads: Mapping[str, Tensor],
    variants: Sequence[Variant],
    *,
    damping_rel: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
    direction_damping_rel: Sequence[float] = (),
    refine_steps: Sequence[int] = (0,),
    floor_ranks: Sequence[int] = (1, 2, 3, 4),
    spectral: bool = True,
    spectral_max_iter: int = 60,
    spectral_tol: float = 1e-6,
    spectrum: bool = True,
    spectrum_layer: str | None = None,
    spectrum_k: int = 60,
    chunk: int = 128,
    solve_repeats: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """All metrics of every variant on one capture (one checkpoint, one curvature kind).

    Returns ``{"metrics": rows, "floor": rows, "spectra": rows, "directions": rows}``. ``metrics`` has
    one row per (variant, layer) plus one ``layer="(model)"`` row: ``fro_rel`` = the block-diagonal error
    ``sqrt(Σ_l ‖C_ll − Ĉ_l‖² / Σ_l ‖C_ll‖²)``, ``fro_rel_full`` = the error against the full
    covered-parameter curvature (cross-layer blocks included: ``‖C − Ĉ‖² = Σ_l ‖C_ll − Ĉ_l‖² +
    ‖C_offdiag‖²``, ``offdiag_share`` = ``‖C_offdiag‖/‖C‖``), and the inverse quality of the whole-model
    solve against the full ``(C + λI)⁻¹g`` at every ``damping_rel``. ``directions``: the rows of
    :mod:`tensorcurv.study.direction_study` at every ``direction_damping_rel`` and ``refine_steps``
    (none when ``direction_damping_rel`` is empty).
    """
    log = log or (lambda msg: None)
    grid = sorted({float(r) for r in (*damping_rel, *direction_damping_rel)})
    ref = exact_reference(stats, grads, grid, chunk)
    floor_rows = _floor_rows(ref, floor_ranks)
    spectrum_layer = spectrum_layer if spectrum_layer in ref.blocks else next(iter(ref.blocks))
    spectra = _exact_spectrum(ref, spectrum_layer, spectrum_k) if spectrum else []
    kw: dict[str, Any] = {
        "damping_rel": damping_rel,
        "spectral": spectral,
        "spectral_max_iter": spectral_max_iter,
        "spectral_tol": spectral_tol,
        "solve_repeats": solve_repeats,
        "direction_damping_rel": list(direction_damping_rel),
        "refine_steps": list(refine_steps),
    }
    model_exact = _subset(ref.model_directions, direction_damping_rel)
    directions = reference_rows(ref.model, ref.blocks, grads, model_exact, solve_repeats) if model_exact else []
    rows = []
    for var in variants:
        out = _variant_rows(var, stats, grads, ref, kw, (spectrum, spectrum_layer, spectrum_k), log)
        rows += out["metrics"]
        spectra += out["spectra"]
        directions += out["directions"]
    return {"metrics": rows, "floor": floor_rows, "spectra": spectra, "directions": directions}


def _exact_spectrum(ref: ExactReference, layer: str, k: int) -> list[dict[str, Any]]:
    """The ``spectra`` rows of the exact block of ``layer``: its ``k`` largest eigenvalues."""
    return [
        {"layer": layer, "structure": "exact", "index": i, "eigenvalue": float(v)}
        for i, v in enumerate(ref.blocks[layer].eigenvalues()[:k])
    ]


def _variant_rows(
    var: Variant,
    stats: Mapping[str, LayerStats],
    grads: Mapping[str, Tensor],
    ref: ExactReference,
    kw: dict[str, Any],
    spectrum: tuple[bool, str, int],
    log: Callable[[str], None],
) -> dict[str, list[dict[str, Any]]]:
    """One variant's ``metrics`` rows (one per layer of a block-diagonal structure, then the model row;
    only a ``skipped`` model row if it cannot be fitted), its ``spectra`` rows of the spectrum layer
    (``spectrum = (on, layer, k)``) and its ``directions`` rows."""
    out: dict[str, list[dict[str, Any]]] = {"metrics": [], "spectra": [], "directions": []}
    try:
        ms, fit_total = _fit_variant(var, stats)
    except (ValueError, RuntimeError, NotImplementedError) as err:
        log(f"  {var.label}: skipped ({err})")
        out["metrics"].append({"layer": "(model)", **_variant_columns(var), "skipped": str(err)})
        return out
    layer_kw = {k: kw[k] for k in ("damping_rel", "spectral", "spectral_max_iter", "spectral_tol", "solve_repeats")}
    fit_times, err_sq_total = ms.layer_fit_times(), ref.offdiag_sq
    on, spectrum_layer, spectrum_k = spectrum
    for k in ref.blocks if ms.block_diagonal else ():
        S = ms.blocks[k]
        row = _layer_row(var, k, S, ref, grads[k], fit_times[k], **layer_kw)
        err_sq_total += row["fro_abs"] ** 2
        out["metrics"].append(row)
        if on and k == spectrum_layer:
            out["spectra"] += [
                {"layer": k, "structure": var.label, "index": i, "eigenvalue": float(v)}
                for i, v in enumerate(structure_spectrum(S, spectrum_k))
            ]
    mrow = _model_row(var, ref, err_sq_total, ms, fit_total, grads, kw["damping_rel"])
    out["metrics"].append(mrow)
    out["directions"] = _direction_rows(var, ms, fit_total, ref, grads, kw)
    log(f"  {var.label:<28s} model fro_rel={mrow['fro_rel']:.4f} nbytes={ms.nbytes}")
    return out


def _direction_rows(
    var: Variant, ms, fit_total: float, ref: ExactReference, grads: Mapping[str, Tensor], kw: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The direction-study rows of one fitted variant: whole model at every refinement step, then every
    layer of a block-diagonal structure unrefined (the optimizers refine the whole model). Whole-model
    solves are timed cold (the state right after the fit restored first, solve caches dropped), layer
    solves warm; ``step_time = fit_time + solve_time + refine_time``."""
    rho, ks, reps = kw["direction_damping_rel"], kw["refine_steps"], kw["solve_repeats"]
    if not rho:
        return []
    cols = {**_variant_columns(var), "nbytes": ms.nbytes}
    snap = ms.snapshot()
    model_exact = _subset(ref.model_directions, rho)
    rows = [
        {**cols, **r, "fit_time": fit_total}
        for r in model_direction_rows(ms.solve, ref.model, grads, model_exact, ks, reps, lambda: ms.restore(snap))
    ]
    fit_times = ms.layer_fit_times()
    for k in ref.blocks if ms.block_diagonal else ():
        S, exact = ms.blocks[k], _subset(ref.directions[k], rho)
        for r in layer_direction_rows(S.solve, ref.blocks[k], grads[k], exact, [0], reps):
            rows.append({**cols, "nbytes": S.nbytes, **r, "layer": k, "fit_time": fit_times[k]})
    for r in rows:
        r["step_time"] = r["fit_time"] + r["solve_time"] + r["refine_time"]
    return rows


def _swept(var: Variant) -> dict[str, Any]:
    rank = var.hparams.get("rank", var.hparams.get("ranks", ""))
    return {
        "rank": format_value(rank) if rank != "" else "",
        "swept": json.dumps(var.swept, sort_keys=True) if var.swept else "",
    }


def _inverse_columns(iq: Sequence[Mapping[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in iq:
        tag = f"{r['damping_rel']:g}"
        out[f"cos@{tag}"] = r["cos"]
        out[f"relerr@{tag}"] = r["rel_err"]
    out["solve_time"] = statistics.median(r["solve_time"] for r in iq)
    return out
