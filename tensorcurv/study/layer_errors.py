"""The thesis's two accuracy measures of a structure on one layer, at one model state.

On a fixed batch, the exact block ``C`` of one layer (:class:`~tensorcurv.core.exact.ExactBlock`, never
formed) and the structure ``Ĉ`` fitted to the same captured statistics:

* Error 1 = ``‖C − Ĉ‖_F / ‖C‖_F`` (:func:`tensorcurv.study.frobenius.frobenius_error`);
* Error 2 = ``‖C − Ĉ‖_2 / ‖C‖_2``, the spectral-norm error (:func:`tensorcurv.study.spectral.spectral_error`).

A model-scope structure (``two_level``) is represented on one layer by its base block: its coarse
correction couples layers and has no single-layer matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from tensorcurv import structures
from tensorcurv.core.exact import ExactBlock
from tensorcurv.curvature import Curvature
from tensorcurv.study.frobenius import frobenius_error
from tensorcurv.study.spectral import spectral_error


def layer_errors(
    model: nn.Module,
    X: Tensor,
    Y: Tensor,
    loss: Any,
    structure: str,
    hparams: Mapping[str, Any],
    layer: int,
    kind: str = "mc",
    seed: int = 0,
) -> dict[str, Any]:
    """Error 1 and Error 2 of ``structure`` (``hparams``) on the ``layer``-th covered layer, from the
    statistics of ``kind`` captured on ``(X, Y)`` (MC labels drawn from ``seed``)."""
    stats = Curvature(model, "diagonal", kind, seed=seed).capture(X, Y, loss).stats
    name = list(stats)[layer]
    st = stats[name]
    hp = structures.make_hparams(structure, **dict(hparams))
    approx = structures.get(structure).for_model({name: st.shape}, hp).fit({name: st}).blocks[name]
    block = ExactBlock(st)
    fro = frobenius_error(approx, block)
    spec = spectral_error(approx, block)
    return {"layer": f"{name} ({st.m}x{st.n})", "error1": fro["fro_rel"], "error2": spec["spec_rel"]}
