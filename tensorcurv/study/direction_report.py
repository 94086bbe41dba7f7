"""The Markdown tables of the direction study (rows of :mod:`tensorcurv.study.direction_study`): the
whole-model cosine per variant and refinement step with its wall-clock, the cosine-vs-time Pareto front,
the per-layer cosines, and the cosine at every checkpoint."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from tensorcurv.study.tables import as_float, cosine_front, focus_damping, model_directions, steps_of

#: how a direction row's cost and quality are described under the tables
DIRECTION_NOTE = (
    "Direction study: `d = (Ĉ+λI)⁻¹g` (or `k` steps of preconditioned CG on the exact `(C+λI)d = g` "
    "from 0 with that solve as preconditioner, `tensorcurv.linalg.krylov.preconditioned_refinement`, the "
    "refinement of the optimizers) against the exact `(C+λI)⁻¹g` of the whole model (cross-layer blocks "
    "included, Woodbury), `λ = ρ·tr(C)/D`. `ms/step` = fit + solve + refinement (the capture, common "
    "to all, left out; timings on a shared machine, single thread). Reference rows: the exact full solve "
    "and the exact block-diagonal solve `diag(C_ll+λI)⁻¹g` (the best any block-diagonal structure can do "
    "without refinement). `two_level` has no Frobenius error in this report: its `mv`/`to_dense` and "
    "layer blocks are its base's (K-FAC by default), not the operator its solve applies, so it is left out of the "
    "Frobenius tables and figures and measured by its directions only."
)


def _cell(v: Any, digits: int = 3) -> str:
    x = as_float(v)
    return f"{x:.{digits}f}" if math.isfinite(x) else "–"


def _ms(v: Any) -> str:
    x = as_float(v)
    return f"{1e3 * x:.2f}" if math.isfinite(x) else "–"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _kib(v: Any) -> str:
    x = as_float(v)
    return f"{x / 1024:.1f}" if math.isfinite(x) else "–"


def direction_table(directions, kind: str, step: int, rho: float) -> str:
    """Whole model at ``λ = ρ·tr/D``: per variant (bold: on the cosine-vs-time front at some ``k``) the
    memory, the cosine and ms/step at every ``k``, the relative error at the smallest and largest ``k``."""
    rows = model_directions(directions, kind=kind, step=step, damping_rel=rho)
    ks = sorted({r["refine_steps"] for r in rows})
    front = {(rows[i]["variant"], rows[i]["refine_steps"]) for i in cosine_front(rows, "step_time")}
    by_variant: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_variant.setdefault(r["variant"], {})[r["refine_steps"]] = r
    out = []
    for v, per_k in by_variant.items():
        first = per_k[min(per_k)]
        name = f"**{v}**" if any((v, k) in front for k in per_k) else v
        cos = [_cell(per_k.get(k, {}).get("cos")) for k in ks]
        ms = [_ms(per_k.get(k, {}).get("step_time")) for k in ks]
        err = [_cell(per_k[min(per_k)]["rel_err"]), _cell(per_k[max(per_k)]["rel_err"])]
        out.append((as_float(first["cos"]), [name, _kib(first.get("nbytes")), *cos, *err, *ms]))
    out.sort(key=lambda t: -t[0] if math.isfinite(t[0]) else math.inf)
    header = ["variant (bold: on the front)", "KiB", *[f"cos k={k}" for k in ks]]
    header += [f"rel. err k={ks[0]}", f"rel. err k={ks[-1]}", *[f"ms/step k={k}" for k in ks]] if ks else []
    return _table(header, [r for _, r in out])


def front_table(directions, kind: str, step: int, rho: float) -> str:
    """The cosine-vs-time Pareto front at ``λ = ρ·tr/D``, by increasing time."""
    rows = model_directions(directions, kind=kind, step=step, damping_rel=rho)
    front = sorted(cosine_front(rows, "step_time"), key=lambda i: as_float(rows[i]["step_time"]))
    body = [
        [
            rows[i]["variant"],
            rows[i]["refine_steps"],
            _cell(rows[i]["cos"]),
            _cell(rows[i]["rel_err"]),
            _ms(rows[i]["step_time"]),
        ]
        for i in front
    ]
    return _table(["variant", "k", "cosine", "rel. error", "ms/step"], body)


def layer_cosine_table(directions, kind: str, step: int, rho: float) -> str:
    """Per layer (its own block, ``λ_l = ρ·tr(C_ll)/(mn)``): the cosine of every block-diagonal
    variant, unrefined and at the largest ``k``."""
    rows = [
        r
        for r in directions
        if r.get("scope") == "layer"
        and r["kind"] == kind
        and r["step"] == step
        and math.isclose(float(r["damping_rel"]), rho, rel_tol=1e-9)
    ]
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    kmax = max((r["refine_steps"] for r in rows), default=0)
    out = []
    for v in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for lay in layers:
            got = {r["refine_steps"]: r["cos"] for r in rows if r["variant"] == v and r["layer"] == lay}
            cells.append(f"{_cell(got.get(0))} / {_cell(got.get(kmax))}")
        out.append([v, *cells])
    return _table(["variant", *[f"layer {lay}: k=0 / k={kmax}" for lay in layers]], out)


def cosine_over_training_table(directions, kind: str, rho: float) -> str:
    """Whole-model cosine (unrefined) of every variant at every checkpoint."""
    rows = model_directions(directions, kind=kind, damping_rel=rho, refine_steps=0)
    steps = steps_of(rows)
    out = []
    for v in dict.fromkeys(r["variant"] for r in rows):
        got = {r["step"]: r["cos"] for r in rows if r["variant"] == v}
        out.append([v, *[_cell(got.get(s)) for s in steps]])
    return _table(["variant", *[f"step {s}" for s in steps]], out)


def direction_sections(directions, kinds: Sequence[str], step: int) -> list[str]:
    """The report's direction-study sections (empty without direction rows)."""
    if not directions:
        return []
    rho = focus_damping(directions)
    damps = sorted({float(r["damping_rel"]) for r in directions})
    md = ["## Direction study", "", DIRECTION_NOTE, ""]
    for kind in kinds:
        for d in damps:
            md += [
                f"### {kind}, λ = {d:g}·tr(C)/D, step {step}: whole model",
                "",
                direction_table(directions, kind, step, d),
                "",
            ]
        md += [
            f"### {kind}, λ = {rho:g}·tr(C)/D, step {step}: Pareto front (cosine vs ms/step)",
            "",
            front_table(directions, kind, step, rho),
            "",
        ]
        md += [
            f"### {kind}, λ = {rho:g}·tr(C)/D, step {step}: per layer (cosine to the layer's exact solve)",
            "",
            layer_cosine_table(directions, kind, step, rho),
            "",
        ]
        md += [
            f"### {kind}, λ = {rho:g}·tr(C)/D: whole-model cosine (k=0) over training",
            "",
            cosine_over_training_table(directions, kind, rho),
            "",
        ]
    return md
