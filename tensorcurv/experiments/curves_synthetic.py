"""``curves_synthetic``: a regenerated CURVES-like image set (splines through 3 random points).

``make_curves_synthetic(n, seed)`` draws ``n`` images ``(n, side, side)`` in [0, 1]: three control points
uniform in the image, the natural cubic spline through them (:func:`natural_spline_through_3_points`),
drawn as an anti-aliased stroke (:func:`draw_curves`). What follows the published construction and what
is guessed: ``docs/guide/data.md``. The cached dataset is loaded by ``tensorcurv.experiments.data.load``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: the generator seed of ``curves_synthetic`` (fixed: the dataset plays the role of a file; ``load``'s
#: ``seed`` only shuffles and splits it)
CURVES_SYNTHETIC_SEED = 0


def natural_spline_through_3_points(points: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The parametric natural cubic spline through 3 points, evaluated at ``t`` ∈ [0, 1].

    ``points`` (B, 3, 2); knots at cumulative chord length (normalized to [0, 1]); natural end
    conditions ``x''(0) = x''(1) = 0`` leave one unknown second derivative ``M₁`` at the middle knot:
    ``M₁ = 3 (Δ₁/h₁ − Δ₀/h₀)/(h₀ + h₁)``. Returns (B, len(t), 2).
    """
    p0, p1, p2 = points[:, 0], points[:, 1], points[:, 2]
    h0 = np.linalg.norm(p1 - p0, axis=1, keepdims=True) + 1e-6
    h1 = np.linalg.norm(p2 - p1, axis=1, keepdims=True) + 1e-6
    m1 = 3.0 * ((p2 - p1) / h1 - (p1 - p0) / h0) / (h0 + h1)  # (B, 2)
    s = t[None, :, None] * (h0 + h1)[:, None, :]  # arc parameter in [0, h0 + h1], (B, T, 1)
    first = s <= h0[:, None, :]
    # segment 0 on [0, h0] (M0 = 0), segment 1 on [h0, h0 + h1] (M2 = 0); standard cubic-spline form
    u0 = s
    seg0 = (
        m1[:, None] * u0**3 / (6 * h0[:, None])
        + (p0[:, None] / h0[:, None]) * (h0[:, None] - u0)
        + (p1[:, None] / h0[:, None] - m1[:, None] * h0[:, None] / 6) * u0
    )
    u1 = s - h0[:, None]
    seg1 = (
        m1[:, None] * (h1[:, None] - u1) ** 3 / (6 * h1[:, None])
        + (p1[:, None] / h1[:, None] - m1[:, None] * h1[:, None] / 6) * (h1[:, None] - u1)
        + (p2[:, None] / h1[:, None]) * u1
    )
    return np.where(first, seg0, seg1)


def draw_curves(
    ctrl: np.ndarray, side: int = 28, line_width: float = 1.5, curve_samples: int = 320, chunk: int = 1024
) -> np.ndarray:
    """Images ``(B, side, side)`` (float32 in [0, 1]) of the splines through ``ctrl`` (B, 3, 2) ``(x, y)``.

    A stroke of width ``w = line_width`` pixels, anti-aliased by its box-filter coverage
    ``clip(w/2 + 1/2 − d, 0, 1)``, ``d`` the distance from the pixel centre (integer coordinates) to
    the nearest of ``curve_samples`` points on :func:`natural_spline_through_3_points`, equally
    spaced in the spline parameter. Over the 30,000 curves of ``curves_synthetic`` the spacing is at
    most 0.29 pixel (measured), so ``d`` is overestimated by at most 0.15 pixel on the curve, where the
    coverage is 1 anyway, and by at most ``0.011/d`` pixel at distance ``d``. Float32 arithmetic on
    the CPU; chunking does not change the result.
    """
    t = np.linspace(0.0, 1.0, curve_samples)
    reach = line_width / 2 + 0.5  # beyond this distance a pixel gets nothing
    # pixels within ``reach`` of a point x lie between ceil(x − reach) and floor(x + reach), i.e. at
    # offsets −floor(reach) … floor(reach) + 1 from floor(x)
    offsets = torch.arange(-math.floor(reach), math.floor(reach) + 2, dtype=torch.float32)
    oy, ox = torch.meshgrid(offsets, offsets, indexing="ij")
    window = torch.stack([ox.reshape(-1), oy.reshape(-1)], dim=1)  # (K, 2) pixel offsets
    n = len(ctrl)
    out = torch.zeros(n, side * side, dtype=torch.float32)
    for lo in range(0, n, chunk):
        pts = torch.as_tensor(natural_spline_through_3_points(ctrl[lo : lo + chunk], t), dtype=torch.float32)
        pix = torch.floor(pts)[:, :, None, :] + window  # (B, T, K, 2) candidate pixel centres
        value = (reach - (pix - pts[:, :, None, :]).norm(dim=-1)).clamp(0.0, 1.0)
        inside = ((pix >= 0) & (pix <= side - 1)).all(-1)
        index = (pix[..., 1] * side + pix[..., 0]).clamp(0, side * side - 1).long()
        value = torch.where(inside, value, torch.zeros(()))
        out[lo : lo + chunk].scatter_reduce_(1, index.reshape(len(pts), -1), value.reshape(len(pts), -1), "amax")
    return out.reshape(n, side, side).numpy()


def make_curves_synthetic(
    n: int,
    seed: int = CURVES_SYNTHETIC_SEED,
    side: int = 28,
    line_width: float = 1.5,
    margin: float = 2.0,
    chunk: int = 1024,
) -> np.ndarray:
    """``n`` CURVES-like images ``(n, side, side)`` (float32 in [0, 1]), deterministic in ``seed``.

    Three control points uniform in ``[margin, side − 1 − margin]²`` (NumPy's PCG64), so that each
    image has exactly 6 degrees of freedom, the code size of the CURVES autoencoder, drawn by
    :func:`draw_curves`. What follows the published construction and what is a guess:
    ``docs/guide/data.md``.
    """
    rng = np.random.default_rng(seed)
    ctrl = rng.uniform(margin, side - 1 - margin, size=(n, 3, 2))
    return draw_curves(ctrl, side, line_width, chunk=chunk)
