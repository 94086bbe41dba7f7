"""Gap of the default ``kron_sum`` fit (``psd="none"``) to the Eckart–Young floor on the reference layers.

    python scripts/kron_sum_floor.py [--ranks 2 3 4 5 6 7 8] [--out reports/kron_sum_floor.md]

For every reference layer (``tensorcurv.experiments.reference_layers``: digits MLP 64-128-128-10, autoencoder
64-128-32-128-64, CNN; seeded init and trained; GGN and empirical Fisher; float64, 256 samples) and
rank r: the relative gap ``(‖C − Ĉ‖_F − floor_r)/floor_r``, ``floor_r = sqrt(Σ_{i>r} σ_i(R(C))²)``, of
one cold ``fit`` with the structure's default settings, and the fit's route and iterations. Dense
reference: ``T = 1``: ``R(C) = scale Uᵀ W`` with the explicit rows ``U_s = vec(a_s a_sᵀ)``,
``W_s = vec(Σ_k g_sk g_skᵀ)``; ``T > 1``: ``dense_rearranged``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tensorcurv import structures
from tensorcurv.experiments.reference_layers import reference_stats
from tensorcurv.linalg.rearrange import dense_rearranged

LAYERS = [("mlp", "1"), ("mlp", "3"), ("mlp", "5"), ("autoencoder", "3"), ("cnn", "features.3")]


def reference(st):
    """Singular values of R(C) and the error ‖R(C) − R(Ĉ)‖_F of a fitted block, from dense factors."""
    if st.T == 1:
        a, g = st.a[:, 0], st.g[:, :, 0]
        U = torch.einsum("si,sj->sij", a, a).flatten(1)
        W = torch.einsum("ski,skj->sij", g, g).flatten(1)
        s = torch.linalg.svdvals(torch.linalg.qr(U.T)[1] @ torch.linalg.qr(W.T)[1].T) * st.scale

        def error(block):
            X = torch.cat([U.T, -block.A.flatten(1).T], 1)
            Y = torch.cat([st.scale * W.T, block.G.flatten(1).T], 1)
            return float(((X.T @ X) * (Y.T @ Y)).sum().clamp_min(0).sqrt())

        return s, error
    R = dense_rearranged(st)

    def error(block):
        return float((R - block.A.flatten(1).T @ block.G.flatten(1)).norm())

    return torch.linalg.svdvals(R), error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=list(range(2, 9)))
    ap.add_argument(
        "--layers", nargs="+", default=[f"{n}:{l}" for n, l in LAYERS], help="net:layer pairs, e.g. mlp:1 autoencoder:3"
    )
    ap.add_argument("--label", default="", help="a note for the table title (e.g. the code version)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    head = "| layer | state | kind | " + " | ".join(f"r={r}" for r in args.ranks) + " | route | iterations | fit s |"
    lines = [
        f"### Relative gap to the Eckart–Young floor {args.label}".rstrip(),
        "",
        head,
        "|" + "---|" * (len(args.ranks) + 6),
    ]
    worst = 0.0
    for spec in args.layers:
        net, name = spec.split(":")
        for trained in (False, True):
            for kind in ("ggn", "empirical"):
                st = reference_stats(net, trained, kind)[name]
                s, error = reference(st)
                gaps, routes, its, secs = [], set(), [], 0.0
                for r in args.ranks:
                    block = structures.create("kron_sum", st.shape, rank=r, psd="none")
                    t0 = time.perf_counter()
                    block.fit(st)
                    secs += time.perf_counter() - t0
                    floor = float(s[r:].pow(2).sum().sqrt())
                    gaps.append((error(block) - floor) / floor)
                    routes.add(block.last_fit["method"])
                    its.append(block.last_fit["iterations"])
                worst = max(worst, max(gaps))
                row = (
                    f"| {net} {name} {tuple(st.shape)} | {'trained' if trained else 'init'} | {kind} | "
                    + " | ".join(f"{g:.1e}" for g in gaps)
                    + f" | {'/'.join(sorted(routes))} | {min(its)}-{max(its)} | {secs:.2f} |"
                )
                lines.append(row)
                print(row, flush=True)
    lines += [
        "",
        f"Largest gap: {worst:.1e}. Command: `python scripts/kron_sum_floor.py "
        + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k in ("ranks",)
        )
        + "`",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
