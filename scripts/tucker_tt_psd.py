"""Cost of the PSD shift of ``tucker`` / ``tt`` (``psd="shift"``, the default) against the unconstrained fit.

    python scripts/tucker_tt_psd.py [--layers mlp:5 autoencoder:3 cnn:features.3] [--out reports/tucker_tt_psd.md]

For every reference layer (``tensorcurv.experiments.reference_layers``, trained, GGN, float64, 256 samples) and
structure (default hparams): the relative Frobenius error ``‖C − Ĉ‖/‖C‖`` of the unconstrained fit
(``psd="none"``) and of the shifted one, the spectral error ``‖C − Ĉ‖₂/‖C‖₂`` of both, the most
negative eigenvalue of the unconstrained ``Ĉ`` and the shift ``μ`` (both relative to ``λ_max(C)``),
the least eigenvalue of the shifted ``Ĉ``, and whether a damped solve (``λ = 1e-3 λ_max(C)``) falls back.
Dense reference ``C`` from the per-sample gradients (``eigvalsh`` on ``mn x mn``: small blocks only).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from tensorcurv import structures
from tensorcurv.experiments.reference_layers import reference_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", nargs="+", default=["mlp:5", "autoencoder:3", "cnn:features.3"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    lines = [
        "| layer | structure | fit | Frobenius error none / shift | spectral error none / shift | "
        "λ_min(none)/λ_max | μ/λ_max | λ_min(shift)/λ_max | fallback none / shift | shift s |",
        "|" + "---|" * 10,
    ]
    for spec in args.layers:
        net, name = spec.split(":")
        st = reference_stats(net, True, "ggn")[name]
        G = st.per_sample_grads().transpose(1, 2).flatten(1)  # rows vec(G_q), column-major
        C = st.scale * (G.T @ G)
        lmax = float(torch.linalg.eigvalsh(C)[-1])
        V = torch.randn(st.shape, generator=torch.Generator().manual_seed(0), dtype=C.dtype)
        for structure in ("tucker", "tt"):
            row = {}
            for psd in ("none", "shift"):
                block = structures.create(structure, st.shape, psd=psd)
                block.fit(st)
                t0 = time.perf_counter()
                block._repair() if psd == "shift" else None  # timed again: the shift alone
                row[psd + "_time"] = time.perf_counter() - t0
                M = block.to_dense()
                block.solve(V, 1e-3 * lmax)
                row[psd] = dict(
                    fro=float((M - C).norm() / C.norm()),
                    spec=float(torch.linalg.matrix_norm(M - C, 2)) / lmax,
                    lmin=float(torch.linalg.eigvalsh(M)[0]) / lmax,
                    mu=block.shift / lmax,
                    fallback=block.last_solve["fallback"],
                    method=block.last_fit.get("method"),
                )
            n, s = row["none"], row["shift"]
            line = (
                f"| {net} {name} {tuple(st.shape)} | {structure} | {s['method']} | "
                f"{n['fro']:.3f} / {s['fro']:.3f} | "
                f"{n['spec']:.3f} / {s['spec']:.3f} | {n['lmin']:.2e} | {s['mu']:.2e} | {s['lmin']:.1e} | "
                f"{n['fallback']} / {s['fallback']} | {row['shift_time']:.2f} |"
            )
            lines.append(line)
            print(line, flush=True)
    lines += ["", "Command: `python scripts/tucker_tt_psd.py --layers " + " ".join(args.layers) + "`"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
