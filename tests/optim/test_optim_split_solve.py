"""Facts about the copy-free K-FAC solve (``KFAC.solve_split``, used by ``Curvature.solve``): it reads
``W``/``b`` and writes the result without forming ``[W, b]``; float64, against the dense Kronecker
inverse and against the concatenated path (``Curvature.split_solve = False``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tensorcurv
import tensorcurv.optim as O
from tensorcurv.linalg import unvec, vec

pytestmark = pytest.mark.usefixtures("float64_default")

PATHS = {
    "tikhonov+eigh": {},
    "pi+eigh": {"damping_kind": "pi"},
    "pi+cholesky": {"damping_kind": "pi", "inverse": "cholesky"},
}
LAM = 1e-2


def model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "conv":  # conv weight (C_out, C_in, kh, kw) seen as a (C_out, C_in kh kw) view; bias and none
        return nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(3, 2, 2, bias=False),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(2 * 3 * 3, 3),
        )
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6, bias=False), nn.Tanh(), nn.Linear(6, 3))


def batch(kind: str, seed: int = 0, N: int = 12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 2, 4, 4, generator=g) if kind == "conv" else torch.randn(N, 4, generator=g)
    return x, torch.randint(0, 3, (N,), generator=g)


def fitted(kind: str, hp: dict) -> tensorcurv.Curvature:
    curv = tensorcurv.Curvature(model(kind), "kfac", "ggn", **hp)
    curv.update(*batch(kind), nn.CrossEntropyLoss())
    return curv


def dense_inverse(block, hp: dict) -> torch.Tensor:
    """Independent reference: ``(A ⊗ G + λI)^{-1}`` or ``(A + π√λI)^{-1} ⊗ (G + √λ/π I)^{-1}``."""
    A, G = block.A, block.G
    if hp.get("damping_kind") != "pi":
        return torch.linalg.inv(torch.kron(A, G) + LAM * torch.eye(A.shape[0] * G.shape[0]))
    m, n = block.shape
    pi = math.sqrt((torch.trace(A) / n) / (torch.trace(G) / m))
    sq = math.sqrt(LAM)
    return torch.kron(torch.linalg.inv(A + pi * sq * torch.eye(n)), torch.linalg.inv(G + sq / pi * torch.eye(m)))


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("path", PATHS)
def test_copy_free_solve_equals_the_dense_kronecker_inverse_per_layer(kind, path):
    curv = fitted(kind, PATHS[path])
    g = [torch.randn_like(p) for p in curv.params]
    out = curv.solve(g, LAM)
    for name, ad, idx in curv.routing.layout()[0]:
        b = curv.blocks[name]
        V = ad.to_matrix([g[i] for i in idx])
        want = unvec(dense_inverse(b, PATHS[path]) @ vec(V), *b.shape)
        assert rel(ad.to_matrix([out[i] for i in idx]), want) < 1e-12


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("path", PATHS)
def test_copy_free_solve_equals_the_concatenated_path(kind, path):
    curv = fitted(kind, PATHS[path])
    assert len(curv.routing.split_plan()[0]) == 3  # every layer (bias and no bias) takes the copy-free path
    g = [torch.randn_like(p) for p in curv.params]
    fast = curv.solve(g, LAM)
    curv.split_solve = False
    slow = curv.solve(g, LAM)
    for a, b in zip(fast, slow):
        assert a.shape == b.shape and a.is_contiguous()
        assert rel(a, b) < 1e-13


@pytest.mark.parametrize("path", PATHS)
def test_solve_into_the_gradient_tensors_overwrites_them_with_the_solution(path):
    curv = fitted("mlp", PATHS[path])
    g = [torch.randn_like(p) for p in curv.params]
    want = curv.solve(g, LAM)
    buf = [t.clone() for t in g]
    got = curv.solve(buf, LAM, out=buf)
    assert all(a is b for a, b in zip(got, buf))
    assert all(rel(a, b) == 0.0 for a, b in zip(got, want))


def test_solve_split_rejects_a_matrix_that_does_not_split_the_block():
    curv = fitted("mlp", {})
    b = curv.blocks["0"]  # Linear(4, 5): block (5, 5) = [W (5, 4), b (5,)]
    W, bias = torch.randn(5, 4), torch.randn(5)
    with pytest.raises(ValueError, match="do not split"):
        b.solve_split(W, None, LAM, torch.empty(5, 4), None)
    with pytest.raises(ValueError, match="damping"):
        b.solve_split(W, bias, -1.0, torch.empty(5, 4), torch.empty(5))


@pytest.mark.parametrize("kl_clip", [None, 1e-3])
@pytest.mark.parametrize("path", PATHS)
def test_training_steps_match_the_concatenated_path_to_1e_12(path, kl_clip):
    runs = []
    for split in (True, False):
        m = model("mlp")
        opt = O.NaturalGradient(
            m,
            nn.CrossEntropyLoss(),
            structure="kfac",
            lr=0.3,
            damping=LAM,
            momentum=0.9,
            kl_clip=kl_clip,
            stats_interval=2,
            inverse_interval=2,
            seed=0,
            **PATHS[path],
        )
        opt.preconditioner.solver.split_solve = opt.preconditioner.curvature.split_solve = split
        for s in range(5):
            opt.step(*batch("mlp", seed=s))
        runs.append([p.detach().clone() for p in m.parameters()])
    init = [p.detach() for p in model("mlp").parameters()]
    for a, b, p0 in zip(*runs, init):
        assert float((a - b).abs().max()) <= 1e-12 * max(1.0, float((b - p0).abs().max()))
        assert not torch.equal(b, p0)  # the parameters moved
