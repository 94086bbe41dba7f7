"""A model's trainable parameters: which is handled by what (the layer adapters of the covered modules and
the coverage rows: structure block or fallback, and why), the checks a model must pass first, and
gradients aligned with the parameters.

A parameter is covered when its module has a Kronecker adapter (:func:`~tensorcurv.core.layers.adapter_for`),
is not excluded, and is not shared by several modules (tied weights, or one module registered twice: each use
would get its own block and the curvature would count it twice). Every other trainable parameter goes to
the fallback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from tensorcurv.core.layers import LayerAdapter, adapter_for
from tensorcurv.core.stats import SUPPORTED_DTYPES


def check_model(model: nn.Module) -> None:
    """A model the curvature can be computed for: real data (not ``meta``), float32/float64 parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(
            f"the model is on the 'meta' device ({meta[0]!r} has no data); materialize it first, "
            "e.g. model.to_empty(device='cpu') and initialize its parameters"
        )
    check_dtypes(model.named_parameters())


def check_dtypes(named_params) -> None:
    for n, p in named_params:
        if p.requires_grad and p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"parameter {n!r} is {p.dtype}; supported dtypes are float32 and float64 "
                "(convert with model.float() or model.double())"
            )


def shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """``id(p) -> [every name of p]`` for parameters reachable under more than one module name
    (one ``nn.Parameter`` assigned to two modules, or one module registered twice)."""
    names: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pn, p in module.named_parameters(recurse=False):
            names.setdefault(id(p), []).append(f"{mname}.{pn}" if mname else pn)
    return {k: v for k, v in names.items() if len(v) > 1}


def assign_parameters(
    model: nn.Module, structure: str, fallback: str, exclude: Sequence[str]
) -> tuple[dict[str, LayerAdapter], list[dict[str, str]], set[int]]:
    """The adapters of the covered modules (by module name), one coverage row per trainable parameter
    (under its first name: ``param``, ``module``, ``handled_by``, ``why``) and the ids of the covered
    parameters."""
    with_params = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    unknown = sorted(set(exclude) - set(with_params))
    if isinstance(exclude, str) or unknown:
        raise ValueError(
            f"exclude must be a list of module names with parameters; unknown: "
            f"{[exclude] if isinstance(exclude, str) else unknown}; valid: {with_params}"
        )
    shared = shared_parameters(model)
    adapters: dict[str, LayerAdapter] = {}
    rows: list[dict[str, str]] = []
    covered: set[int] = set()
    listed: set[int] = set()  # one coverage row per parameter, under its first name
    for name, module in model.named_modules():
        own = [(pn, p) for pn, p in module.named_parameters(recurse=False) if p.requires_grad and id(p) not in listed]
        listed.update(id(p) for _, p in own)
        if not own:
            continue
        cov = adapter_for(name, module)
        if name in exclude:
            cov.adapter, cov.reason = None, "excluded by the user"
        tied = [] if cov.adapter is None else [shared[id(p)] for _, p in cov.adapter.params() if id(p) in shared]
        if tied:
            cov.adapter, cov.reason = None, f"shared parameter {tied[0]} (tied/shared parameters are not covered)"
        if cov.adapter is not None:
            adapters[name] = cov.adapter
            covered.update(id(p) for _, p in cov.adapter.params())
        for pn, p in own:
            full = f"{name}.{pn}" if name else pn
            if id(p) in covered:
                row = {"param": full, "module": cov.module_type, "handled_by": f"{structure} block", "why": cov.reason}
            else:
                why = cov.reason if cov.adapter is None else f"{pn} of {cov.module_type} cannot be folded"
                if id(p) in shared:
                    why = f"shared parameter {shared[id(p)]} (tied/shared parameters are not covered)"
                row = {"param": full, "module": cov.module_type, "handled_by": f"fallback: {fallback}", "why": why}
            rows.append(row)
    return adapters, rows, covered


def coverage_table(rows: Sequence[dict[str, str]]) -> str:
    """The coverage rows as an aligned text table."""
    w = [
        max(len(h), *(len(r[k]) for r in rows)) if rows else len(h)
        for h, k in (("parameter", "param"), ("module", "module"), ("handled by", "handled_by"))
    ]
    lines = [f"{'parameter':<{w[0]}}  {'module':<{w[1]}}  {'handled by':<{w[2]}}  why"]
    lines += [f"{r['param']:<{w[0]}}  {r['module']:<{w[1]}}  {r['handled_by']:<{w[2]}}  {r['why']}" for r in rows]
    return "\n".join(lines)


def gradient_list(named_params: Sequence[tuple[str, Tensor]], grads) -> list[Tensor]:
    """Gradients aligned with the trainable parameters ``named_params``: from their ``.grad`` (``grads=None``),
    a dict by parameter name, or a sequence in parameter order; one-line errors for what is missing, unknown,
    or of the wrong shape or dtype."""
    if grads is None:
        missing = [n for n, p in named_params if p.grad is None]
        if missing:
            raise ValueError(f"no .grad for {missing}; run backward first or pass grads")
        return [p.grad for _, p in named_params if p.grad is not None]  # all of them (checked above)
    if isinstance(grads, Mapping):
        names = [n for n, _ in named_params]
        missing, unknown = [n for n in names if n not in grads], sorted(set(grads) - set(names))
        if missing or unknown:
            raise ValueError(
                f"gradient dict: missing {missing}, unknown {unknown}; keys must be the "
                f"trainable parameter names {names}"
            )
        grads = [grads[n] for n in names]
    grads = list(grads)
    if len(grads) != len(named_params):
        raise ValueError(
            f"expected {len(named_params)} gradient tensors (one per trainable parameter), got {len(grads)}"
        )
    for (n, p), g in zip(named_params, grads):
        if not isinstance(g, Tensor):
            raise TypeError(f"gradient for {n} must be a tensor, got {type(g).__name__}")
        if g.shape != p.shape:
            raise ValueError(f"gradient for {n} has shape {tuple(g.shape)}, parameter has {tuple(p.shape)}")
        if g.dtype != p.dtype:
            raise ValueError(f"gradient for {n} is {g.dtype}, parameter is {p.dtype}")
    return grads
