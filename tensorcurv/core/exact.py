"""The exact curvature of the covered layers as an implicit operator over the captured per-sample factors.

One layer's :class:`~tensorcurv.core.stats.LayerStats` holds ``a`` (N, T, n), ``g`` (N, K, T, m) and the
scale ``c`` (``1/N`` for a mean-reduced loss, 1 for a sum). With ``j = (s, k)`` (J = N K terms)

    G_j = Σ_t g_jt a_stᵀ   (m x n),        C = c Σ_j vec(G_j) vec(G_j)ᵀ   (mn x mn, column-major vec).

``C`` is never formed (:class:`ExactBlock`): ``C vec(V) = c Σ_j w_j vec(G_j)`` with the coefficients
``w_j = ⟨G_j, V⟩ = Σ_t g_jtᵀ V a_st`` (two products with ``a`` and two with ``g``). The ``J x J`` Gram
matrix ``⟨G_j, G_j'⟩`` gives ``‖C‖_F² = c² ‖Gram‖_F²``, the nonzero spectrum (that of ``c·Gram``) and,
by Woodbury, ``(C + λI)⁻¹`` exactly.

The capture kind decides what ``C`` is: ``ggn`` (``g`` = the columns of ``J_sᵀ S_s`` with
``S_s S_sᵀ = ∇²_z ℓ_s``) the generalized Gauss-Newton matrix, ``empirical`` (K = 1, ``g = ∇_z ℓ_s``)
the empirical Fisher, ``mc`` its Monte-Carlo estimate.

Over several layers of one capture (:class:`ExactModel`) the same ``j`` runs through every layer, and
the stacked ``u_j = (vec G_j^{(l)})_l`` give the curvature of all covered parameters,
``C = c Σ_j u_j u_jᵀ``, cross-layer blocks included (``coupling="full"``: the coefficients ``w_j`` add
up over layers); ``coupling="block"`` keeps each layer's own ``w`` (the block diagonal a per-layer
structure approximates).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

import torch
from torch import Tensor

from tensorcurv.core.options import Option
from tensorcurv.core.stats import LayerStats
from tensorcurv.linalg import summed_outer_products, unvec, vec
from tensorcurv.linalg.krylov import pcg

#: Blocks with ``m n`` up to this size may be formed as dense ``(mn, mn)`` matrices (automatic choices).
DENSE_MAX_DIM = 2048
#: Automatic choices form and eigendecompose the ``J x J`` Gram matrix up to this ``J`` (Woodbury solve, spectrum).
GRAM_MAX_TERMS = 4096


class Coupling(Option):
    """The exact operator's layer coupling: ``full`` (cross-layer blocks kept) or ``block`` (block diagonal)."""

    FULL = "full"
    BLOCK = "block"


def check_coupling(coupling: str) -> None:
    Coupling.parse(coupling, "coupling")


def weighted_gradient_sum(stats: LayerStats, w: Tensor) -> Tensor:
    """``Σ_{s,k} w_sk G_sk`` (``(m, n)``, no scale) for coefficients ``w`` of shape ``(N, K)``."""
    h = torch.einsum("sk,sktm->stm", w, stats.g).reshape(-1, stats.m)
    return h.T @ stats.a.reshape(-1, stats.n)


def damped_gram_cholesky(gram: Tensor, scale: float, damping: float) -> Tensor:
    """Lower Cholesky factor ``L`` of ``λ/c I + Gram`` (``J x J``), the system matrix of :func:`woodbury_solve`.

    One factorization (``J³/3`` flops) serves every solve at this damping; ``eigh`` (several times
    slower) is only worth it for many dampings. Its smallest eigenvalue is ``λ/c > 0``; where rounding
    breaks the factorization in float32 (``cond ≈ c‖Gram‖/λ`` near ``1/ε``) it is redone in float64."""
    system = gram + (damping / scale) * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    L, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0 and system.dtype != torch.float64:
        L, info = torch.linalg.cholesky_ex(system.double())
    if int(info) != 0:
        raise torch.linalg.LinAlgError(
            f"the damped Gram matrix (J = {gram.shape[0]}, λ/c = {damping / scale:.3g}) is not positive definite "
            f"(leading minor {int(info)}): non-finite or overflowing per-sample gradients"
        )
    return L


def woodbury_solve(
    gram: Tensor,
    scale: float,
    coefficients: Callable[[Any], Tensor],
    combine: Callable[[Tensor], Any],
    V,
    damping: float,
    eig=None,
    chol: Tensor | None = None,
):
    """``(c PᵀP + λI)⁻¹ v = (v − Pᵀ (λ/c I + P Pᵀ)⁻¹ P v) / λ`` with ``P`` the stacked per-sample
    gradients (never formed): ``P Pᵀ`` is the ``(J, J)`` Gram matrix, ``P v`` = ``coefficients(V)``,
    ``Pᵀ w`` = ``combine(w) / c``. ``V``: a matrix or a dict of layer matrices. The ``J x J`` system is
    solved by ``chol`` (:func:`damped_gram_cholesky` at this ``damping``) when given, else by ``eig`` (a
    cached ``eigh(gram)``, any damping) or a fresh ``eigh``."""
    w = coefficients(V)
    shape = w.shape
    if chol is not None:
        z = torch.cholesky_solve(w.reshape(-1, 1).to(chol.dtype), chol)[:, 0].to(w.dtype)
    else:
        e, U = eig if eig is not None else torch.linalg.eigh(gram)
        z = U @ ((U.T @ w.reshape(-1)) / (damping / scale + e.clamp_min(0)))
    back = combine(z.reshape(shape))
    if isinstance(V, Mapping):
        return {k: (V[k] - back[k] / scale) / damping for k in V}
    return (V - back / scale) / damping


class ExactBlock:
    """``C`` of one layer (module docstring) as an implicit operator on ``(m, n)`` matrices.

    ``chunk``: samples per batch where per-sample gradients are formed (Gram rows, traces).
    ``cache_output_ggn`` (``T = 1`` only): :meth:`mv` forms ``Λ_s = Σ_k g_sk g_skᵀ`` (``N m²`` memory)
    once and then costs one batched product, ``C vec(V) = c Σ_s (Λ_s V a_s) a_sᵀ``.
    """

    def __init__(self, stats: LayerStats, chunk: int = 128, cache_output_ggn: bool = False) -> None:
        self.stats, self.chunk = stats, int(chunk)
        self.a, self.g, self.scale = stats.a, stats.g, float(stats.scale)
        self.m, self.n = stats.shape
        self.dim = self.m * self.n
        self.J = stats.N * stats.K  # number of per-sample gradients G_j
        self.cache_output_ggn = cache_output_ggn and stats.T == 1
        self._gram: Tensor | None = None
        self._gram_eigh: tuple[Tensor, Tensor] | None = None
        self._output_ggn: Tensor | None = None

    # ------------------------------------------------------------------ per-sample gradients
    def grads(self, s0: int, s1: int) -> Tensor:
        """``G_j`` for samples ``s0 ≤ s < s1`` (all ``k``), shape ``((s1-s0) K, m, n)``."""
        G = torch.einsum("sktm,stn->skmn", self.g[s0:s1], self.a[s0:s1])
        return G.reshape(-1, self.m, self.n)

    def grad_chunks(self) -> Iterator[Tensor]:
        for s0 in range(0, self.stats.N, self.chunk):
            yield self.grads(s0, min(s0 + self.chunk, self.stats.N))

    # ------------------------------------------------------------------ products
    def coefficients(self, V: Tensor) -> Tensor:
        """``w_sk = ⟨G_sk, V⟩ = Σ_t g_sktᵀ V a_st`` as an ``(N, K)`` tensor (``V``: ``(m, n)``)."""
        return torch.einsum("sktm,stm->sk", self.g, self.a @ V.T)

    def combine(self, w: Tensor) -> Tensor:
        """``c Σ_sk w_sk G_sk`` for coefficients ``w`` of shape ``(N, K)``."""
        return weighted_gradient_sum(self.stats, w) * self.scale

    def mv(self, V: Tensor) -> Tensor:
        """``C vec(V)`` reshaped to ``(m, n)``: ``c Σ_j ⟨G_j, V⟩ G_j``."""
        if not self.cache_output_ggn:
            return self.combine(self.coefficients(V))
        if self._output_ggn is None:
            self._output_ggn = summed_outer_products(self.g[:, :, 0])
        a = self.a[:, 0]
        h = (self._output_ggn @ (a @ V.T).unsqueeze(-1)).squeeze(-1)  # (N, m)
        return (h.T @ a) * self.scale

    def gradient_sum(self) -> Tensor:
        """``c Σ_j G_j`` (for the empirical kind this is the gradient of the loss)."""
        return self.combine(torch.ones(self.stats.N, self.stats.K, dtype=self.a.dtype, device=self.a.device))

    # ------------------------------------------------------------------ Gram matrix
    def gram_rows(self, s0: int, s1: int) -> Tensor:
        """Rows ``j = (s, k)``, ``s0 ≤ s < s1``, of the Gram matrix ``⟨G_j, G_j'⟩`` (``(·, J)``).

        ``T = 1``: ``(a_sᵀ a_s') (g_skᵀ g_s'k')`` from two small Gram matrices; otherwise the
        per-sample gradients of the row chunk against those of every column chunk.
        """
        K = self.stats.K
        if self.stats.T == 1:
            a, g = self.a[:, 0], self.g[:, :, 0]  # (N, n), (N, K, m)
            Ga = a[s0:s1] @ a.T  # (S, N)
            Gg = torch.einsum("skm,ulm->skul", g[s0:s1], g)  # (S, K, N, K)
            return (Ga[:, None, :, None] * Gg).reshape((s1 - s0) * K, self.J)
        rows = vec(self.grads(s0, s1))
        return torch.cat([rows @ vec(Gc).T for Gc in self.grad_chunks()], dim=1)

    def gram(self) -> Tensor:
        """The full ``(J, J)`` Gram matrix (cached); ``C`` and ``c·Gram`` share their nonzero eigenvalues."""
        if self._gram is None:
            self._gram = self.compute_gram()
        return self._gram

    def compute_gram(self) -> Tensor:
        """The ``(J, J)`` Gram matrix, not cached (:meth:`gram` caches it). With weight sharing (``T > 1``) and
        one chunk of samples the per-sample gradients are formed once, ``P Pᵀ`` with ``P = vec(G_j)`` rows."""
        N = self.stats.N
        if self._gram is not None:
            return self._gram
        if self.stats.T > 1 and N <= self.chunk:
            P = vec(self.grads(0, N))
            return P @ P.T
        return torch.cat([self.gram_rows(s0, min(s0 + self.chunk, N)) for s0 in range(0, N, self.chunk)], dim=0)

    def gram_eigh(self) -> tuple[Tensor, Tensor]:
        """Cached ``eigh`` of the Gram matrix (ascending)."""
        if self._gram_eigh is None:
            self._gram_eigh = torch.linalg.eigh(self.gram())
        return self._gram_eigh

    # ------------------------------------------------------------------ norms, trace, spectrum
    def frobenius_sq(self) -> float:
        """``‖C‖_F² = c² Σ_{j,j'} ⟨G_j, G_j'⟩²`` (row chunks of the Gram matrix; exact)."""
        if self._gram is not None:
            return self.scale**2 * float(self._gram.pow(2).sum())
        N, total = self.stats.N, 0.0
        for s0 in range(0, N, self.chunk):
            total += float(self.gram_rows(s0, min(s0 + self.chunk, N)).pow(2).sum())
        return self.scale**2 * total

    def trace(self) -> float:
        """``tr C = c Σ_j ‖G_j‖²``."""
        if self.stats.T == 1:
            return self.scale * float((self.a[:, 0].pow(2).sum(1)[:, None] * self.g[:, :, 0].pow(2).sum(2)).sum())
        return self.scale * sum(float(G.pow(2).sum()) for G in self.grad_chunks())

    def diagonal(self) -> Tensor:
        """``diag(C)`` as an ``(m, n)`` matrix: ``c Σ_j G_j²`` (elementwise)."""
        if self.stats.T == 1:
            return self.scale * (self.g[:, :, 0].pow(2).sum(1).T @ self.a[:, 0].pow(2))
        return self.scale * cast(Tensor, sum(G.pow(2).sum(0) for G in self.grad_chunks()))

    def eigenvalues(self) -> Tensor:
        """Nonzero spectrum of ``C`` (descending) as the eigenvalues of ``c·Gram`` (``J x J``)."""
        return (self.scale * self.gram_eigh()[0]).flip(0).clamp_min(0)

    def to_dense(self) -> Tensor:
        """``C`` as an ``(mn, mn)`` matrix (tests and small layers only)."""
        C = self.a.new_zeros(self.dim, self.dim)
        for G in self.grad_chunks():
            P = vec(G)
            C += P.T @ P
        return self.scale * C

    # ------------------------------------------------------------------ damped solve
    def solve(
        self, V: Tensor, damping: float, *, method: str = "auto", tol: float = 1e-10
    ) -> tuple[Tensor, dict[str, Any]]:
        """``(C + λI)⁻¹ vec(V)`` reshaped to ``(m, n)``, exact by one of

        * ``woodbury``: the ``J x J`` Gram system of the per-sample gradients (:func:`woodbury_solve`);
        * ``dense``: Cholesky of the formed block (small layers);
        * ``cg``: conjugate gradients on implicit products ``C v`` (any size, iterative, to ``tol``).

        ``auto``: woodbury when ``J ≤`` :data:`GRAM_MAX_TERMS`, else dense up to
        :data:`DENSE_MAX_DIM`, else cg. Info: ``method``, ``iterations``, ``residual`` (relative)."""
        if damping <= 0:
            raise ValueError(f"damping must be > 0 for the exact solve, got {damping}")
        if method == "auto":
            method = "woodbury" if self.J <= GRAM_MAX_TERMS else ("dense" if self.dim <= DENSE_MAX_DIM else "cg")
        if method == "woodbury":
            return _woodbury(self, V, damping)
        if method == "dense":
            M = self.to_dense() + damping * torch.eye(self.dim, dtype=V.dtype)
            x = torch.cholesky_solve(vec(V)[:, None], torch.linalg.cholesky(M))[:, 0]
            return unvec(x, self.m, self.n), {"method": "dense", "iterations": 0, "residual": 0.0}
        if method == "cg":
            x, info = pcg(lambda P: self.mv(P) + damping * P, V, tol=tol)
            return x, {"method": "cg", "iterations": info["iterations"], "residual": info["residual"]}
        raise ValueError(f"unknown exact-solve method {method!r}; valid: auto, woodbury, dense, cg")


class ExactModel:
    """``C`` of all covered layers of one capture (module docstring) on dicts of layer matrices.

    ``coupling="full"``: ``C = c Σ_j u_j u_jᵀ`` with cross-layer blocks; ``"block"``: its block
    diagonal. Build it from statistics with :meth:`from_stats`.
    """

    def __init__(
        self, blocks: Mapping[str, ExactBlock], coupling: str = "full", cache_layer_grams: bool = True
    ) -> None:
        check_coupling(coupling)
        if not blocks:
            raise ValueError("no layer statistics")
        self.blocks = dict(blocks)
        first = next(iter(self.blocks.values())).stats
        for name, b in self.blocks.items():
            st = b.stats
            if (st.N, st.K) != (first.N, first.K) or st.scale != first.scale:
                raise ValueError(
                    f"layer {name!r}: statistics of {st.N} samples x {st.K} columns (scale {st.scale}) "
                    f"do not match {first.N} x {first.K} (scale {first.scale}); one capture is needed"
                )
        self.coupling = coupling
        self.scale = float(first.scale)
        self.dim = sum(b.dim for b in self.blocks.values())
        self.cache_layer_grams = cache_layer_grams
        self._gram: Tensor | None = None
        self._eigh: tuple[Tensor, Tensor] | None = None
        self._cholesky: tuple[float, Tensor] | None = None

    @classmethod
    def from_stats(
        cls,
        stats: Mapping[str, LayerStats],
        coupling: str = "full",
        chunk: int = 128,
        cache_layer_grams: bool = True,
    ) -> ExactModel:
        """The operator of ``stats``; where every product stays inside a layer (``block``, or one layer)
        the layers cache their output GGNs (:class:`ExactBlock`'s ``cache_output_ggn``).
        ``cache_layer_grams=False``: the layers' Gram matrices are summed into the model's as they are
        formed, not kept (one ``J x J`` matrix in memory instead of one per layer)."""
        per_layer = coupling == "block" or len(stats) == 1
        blocks = {k: ExactBlock(st, chunk, cache_output_ggn=per_layer) for k, st in stats.items()}
        return cls(blocks, coupling, cache_layer_grams)

    @property
    def stats(self) -> dict[str, LayerStats]:
        return {k: b.stats for k, b in self.blocks.items()}

    def coefficients(self, V: Mapping[str, Tensor]) -> Tensor:
        """``w_j = Σ_l ⟨G_j^{(l)}, V_l⟩`` (``(N, K)``)."""
        return cast(Tensor, sum(b.coefficients(V[k]) for k, b in self.blocks.items()))

    def combine(self, w: Tensor) -> dict[str, Tensor]:
        return {k: b.combine(w) for k, b in self.blocks.items()}

    def mv(self, V: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``C V`` over the dict of layer matrices (``coupling`` decides the cross-layer blocks)."""
        if self.coupling == "block" or len(self.blocks) == 1:
            return {k: b.mv(V[k]) for k, b in self.blocks.items()}
        return self.combine(self.coefficients(V))

    def gram(self) -> Tensor:
        """``⟨u_j, u_j'⟩ = Σ_l ⟨G_j^{(l)}, G_j'^{(l)}⟩`` (``J x J``, full coupling; cached)."""
        if self._gram is None:
            total: Tensor | None = None
            for b in self.blocks.values():
                G = b.gram() if self.cache_layer_grams else b.compute_gram()
                total = G.clone() if total is None else total.add_(G)
            self._gram = cast(Tensor, total)  # __init__ refuses an empty model
        return self._gram

    def gram_eigh(self) -> tuple[Tensor, Tensor]:
        if self._eigh is None:
            self._eigh = torch.linalg.eigh(self.gram())
        return self._eigh

    def gram_cholesky(self, damping: float) -> Tensor:
        """:func:`damped_gram_cholesky` of the model Gram matrix at ``damping`` (cached for the last damping)."""
        if self._cholesky is None or self._cholesky[0] != damping:
            self._cholesky = (damping, damped_gram_cholesky(self.gram(), self.scale, damping))
        return self._cholesky[1]

    def frobenius_sq(self) -> float:
        """``c² ‖Σ_l Gram_l‖_F²`` (full coupling: the Gram matrices of the layers add up)."""
        return self.scale**2 * float(self.gram().pow(2).sum())

    def trace(self) -> float:
        return sum(b.trace() for b in self.blocks.values())

    def solve(
        self, V: Mapping[str, Tensor], damping: float, *, method: str = "woodbury", tol: float = 1e-10
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(C + λI)⁻¹ V`` (full coupling) over the dict of layer matrices: ``woodbury`` (exact, ``J x J``
        Gram system by its cached ``eigh``: any number of dampings), ``cholesky`` (the same system by one
        Cholesky factorization cached for this damping) or ``cg`` (conjugate gradients on implicit
        products, to ``tol``)."""
        if self.coupling != "full":
            raise ValueError("ExactModel.solve needs coupling='full'")
        if method == "woodbury":
            return _woodbury(self, V, damping)
        if method == "cholesky":
            chol = self.gram_cholesky(damping)
            x = woodbury_solve(self.gram(), self.scale, self.coefficients, self.combine, V, damping, chol=chol)
            return x, {"method": "cholesky", "iterations": 0, "residual": 0.0}
        if method != "cg":
            raise ValueError(f"unknown method {method!r}; valid: woodbury, cholesky, cg")
        x, info = pcg(lambda p: self.flatten(self.mv(self.unflatten(p))) + damping * p, self.flatten(V), tol=tol)
        return self.unflatten(x), {"method": "cg", "iterations": info["iterations"], "residual": info["residual"]}

    def flatten(self, V: Mapping[str, Tensor]) -> Tensor:
        """The layers' column-major ``vec`` concatenated in the blocks' order."""
        return torch.cat([vec(V[k]) for k in self.blocks])

    def unflatten(self, x: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for k, b in self.blocks.items():
            out[k] = unvec(x[i : i + b.dim], b.m, b.n)
            i += b.dim
        return out


class ParamLayout:
    """Flat ``θ`` (trainable parameters in ``named_parameters()`` order) ↔ one ``[W, b]`` matrix per layer.

    Built from ``Curvature.adapters``; every parameter of ``named_params`` must belong to a covered layer
    (otherwise the stats operator would not be the GGN of all of ``θ``). ``vec`` of ``θ``: the parameters'
    row-major flattenings concatenated in ``named_params`` order.
    """

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], adapters: Mapping) -> None:
        by_id = {id(p): i for i, (_, p) in enumerate(named_params)}
        self.numels = [p.numel() for _, p in named_params]
        self.shapes = [p.shape for _, p in named_params]
        self.layers = [(name, ad, [by_id[id(p)] for _, p in ad.params()]) for name, ad in adapters.items()]
        covered = {i for _, _, idx in self.layers for i in idx}
        missing = [n for i, (n, _) in enumerate(named_params) if i not in covered]
        if missing:
            raise ValueError(
                f"parameters {missing} are not in a covered layer; the stats GGN operator needs "
                "every trainable parameter inside a Linear/Conv2d block"
            )

    def to_mats(self, v: Tensor) -> dict[str, Tensor]:
        parts = [t.view(s) for t, s in zip(v.split(self.numels), self.shapes)]
        return {name: ad.to_matrix([parts[i] for i in idx]) for name, ad, idx in self.layers}

    def to_flat(self, mats: Mapping[str, Tensor]) -> Tensor:
        parts: list[Tensor | None] = [None] * len(self.numels)
        for name, ad, idx in self.layers:
            for i, t in zip(idx, ad.from_matrix(mats[name])):
                parts[i] = t.reshape(-1)
        return torch.cat(cast(list[Tensor], parts))  # __init__ checked that the layers cover every parameter


def _woodbury(op: ExactBlock | ExactModel, V, damping: float) -> tuple[Any, dict[str, Any]]:
    """:func:`woodbury_solve` through ``op``'s cached Gram eigendecomposition."""
    x = woodbury_solve(op.gram(), op.scale, op.coefficients, op.combine, V, damping, eig=op.gram_eigh())
    return x, {"method": "woodbury", "iterations": 0, "residual": 0.0}
