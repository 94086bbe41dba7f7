"""Tutorial: how close is each structure to the exact curvature block of a layer?

Captures the GGN statistics of a small MLP on digits once, fits several structures to the same
statistics, and measures each one against the exact block, which is never formed:

* the relative Frobenius error ``‖C − Ĉ‖_F / ‖C‖_F``;
* the optimal rank-r Kronecker-sum error (the "floor", Eckart–Young on the rearranged block ``R(C)``);
* the quality of the damped direction ``(Ĉ + λI)⁻¹ g`` against the exact ``(C + λI)⁻¹ g``.

Run: ``python docs/examples/study.py`` (``--tiny`` for the quick version the tests run). The full study
harness, with training checkpoints, every kind and the figures, is ``scripts/study.py``.
"""

from __future__ import annotations

import sys

import torch
from sklearn.datasets import load_digits
from torch import nn

import tensorcurv
from tensorcurv.core.exact import ExactBlock
from tensorcurv.study.directions import inverse_quality
from tensorcurv.study.frobenius import frobenius_error, kronecker_floor

VARIANTS = {"diagonal": {}, "kfac": {}, "ekfac": {}, "kpsvd": {}, "kron_sum r=2": {"rank": 2}}


def main(tiny: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    n = 64 if tiny else 512
    X = torch.tensor(X[:n] / 16.0, dtype=torch.float64)
    y = torch.tensor(y[:n])
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()

    curv = tensorcurv.Curvature(model, structure="kfac", kind="ggn")
    res = curv.capture(X, y, nn.CrossEntropyLoss(), accumulate_grad=True)
    layer = "0"
    stats = res.stats[layer]  # per-sample factors a (N, T, n), g (N, K, T, m)
    block = ExactBlock(stats)  # the exact block C as an implicit operator
    grad = torch.cat([model[0].weight.grad, model[0].bias.grad[:, None]], dim=1)  # [W, b], shape (m, n)

    floors = kronecker_floor(block, ranks=[1, 2])
    print(
        f"layer {layer} ({stats.shape[0]}x{stats.shape[1]}): optimal Kronecker-sum error "
        f"rank 1 {floors[1]:.4f}, rank 2 {floors[2]:.4f}"
    )
    print(f"{'structure':>14} | {'rel. Frobenius error':>20} | {'cosine to exact direction':>25}")
    out = {}
    for label, hparams in VARIANTS.items():
        structure = tensorcurv.structures.create(label.split()[0], stats.shape, **hparams).fit(stats)
        fro = frobenius_error(structure, block)["fro_rel"]
        cos = inverse_quality(structure, block, grad, damping_rel=[1e-2], repeats=1)[0]["cos"]
        print(f"{label:>14} | {fro:20.4f} | {cos:25.3f}")
        out[label] = fro
    # Eckart–Young: no sum of r Kronecker products beats the floor, and kpsvd (rank 1) attains it
    assert out["kpsvd"] >= floors[1] - 1e-6 and out["kfac"] >= floors[1] - 1e-6
    return out


if __name__ == "__main__":
    main(tiny="--tiny" in sys.argv)
