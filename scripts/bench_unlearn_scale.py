"""Unlearning where retraining costs minutes: a CNN and a deeper MLP on digits, every method against retraining.

nice -n 19 python scripts/bench_unlearn_scale.py --quick --out /tmp/scale        # seconds-long smoke run
nice -n 19 python scripts/bench_unlearn_scale.py --seeds 3 --fraction 0.1 --model-cache /tmp/models \
    --out reports/unlearning/scale  # the committed report (see its command line for the methods)
python scripts/bench_unlearn_scale.py --device cuda --data cifar10 --seeds 3 --out reports/unlearning/cifar10
    # GPU: the CIFAR-10 CNN (2 conv + 2 linear, ~1.7M parameters); needs <data_dir>/cifar10 (see experiments.data)

Problems and scenarios (default): cnn: label_flip, backdoor, deletion; mlp: label_flip, feature.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tensorcurv.unlearn import report_scale, scale, scenarios  # noqa: E402

DEFAULT_SCENARIOS = {
    "cnn": ["label_flip", "backdoor", "deletion"],
    "mlp": ["label_flip", "feature"],
    "cifar10_cnn": ["label_flip", "backdoor"],
}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--presets", nargs="+", default=None, help=f"problems (default cnn mlp); valid: {sorted(scale.PRESETS)}"
    )
    p.add_argument("--data", default=None, help="cifar10: the cifar10_cnn preset (shortcut for --presets cifar10_cnn)")
    p.add_argument("--scenarios", nargs="+", default=None, help="default: per preset (see above)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--fraction", type=float, default=0.05, help="fraction of training points poisoned/deleted")
    p.add_argument("--methods", nargs="+", default=None, help="keep only these method names (default: all)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: fastest on the shared machine; 0: torch's default)",
    )
    p.add_argument("--quick", action="store_true", help="tiny images, 1 seed, a few training steps")
    p.add_argument(
        "--model-cache",
        default=None,
        help="directory keeping trained models: a training identical in data, θ_0 and recipe runs once "
        "(its measured wall and CPU times are reused)",
    )
    p.add_argument("--out", default=None, help="write report.md, results.csv and figures here")
    return p, p.parse_args(argv)


def plan(p: argparse.ArgumentParser, a) -> tuple[list[tuple[str, str]], list]:
    """(preset, scenario) pairs and the methods, all names checked before any work."""
    if a.data not in (None, "cifar10", "digits"):
        p.error(f"unknown --data {a.data!r}; valid: ['cifar10', 'digits']")
    presets = a.presets or (["cifar10_cnn"] if a.data == "cifar10" else ["cnn", "mlp"])
    try:
        for name in presets:
            scale.preset(name)
        for s in a.scenarios or []:
            scenarios.check_name(s)
        methods = scale.select_methods(a.methods, a.quick)
    except ValueError as err:
        p.error(str(err))
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {a.device}: CUDA is not available on this machine")
    lists = {pr: a.scenarios or DEFAULT_SCENARIOS[pr] for pr in presets}  # round-robin: first scenarios first
    pairs = [(pr, lists[pr][i]) for i in range(max(map(len, lists.values()))) for pr in presets if i < len(lists[pr])]
    return pairs, methods


def main(argv=None) -> None:
    p, a = parse(argv)
    pairs, methods = plan(p, a)
    if a.threads:
        torch.set_num_threads(a.threads)
    seeds = [0] if a.quick else list(range(a.seeds))
    rows, desc = [], {}
    for pr, scen in pairs:
        for seed in seeds:
            print(f"{pr}/{scen} seed {seed} (load {os.getloadavg()})", flush=True)
            r, d = scale.run_scale(
                pr, scen, seed, methods, device=a.device, fraction=a.fraction, quick=a.quick, model_cache=a.model_cache
            )
            rows += r
            desc[f"{pr}/{scen}"] = d
            if a.out:  # after every problem, so an interrupted run still leaves a report
                report_scale.write_report(rows, a.out, command=command(argv), header=HEADER, descriptions=desc)
            for x in r:
                print(
                    f"  {x['method']:24s} {x['status'][:30]:30s} t={x['time']:.3g}s "
                    f"oneoff={x.get('time_oneoff', 0):.3g}s dist={x['rel_dist']:.3f} "
                    f"restored={x['restored']:.3f} acc={x['test_acc']:.3f}",
                    flush=True,
                )
    if a.out:
        print(f"wrote {Path(a.out) / 'report.md'}")


def command(argv) -> str:
    return "nice -n 19 python scripts/bench_unlearn_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])


HEADER = """Objective L(D; θ) = Σ_i CE_i + (μ/2)‖θ‖² (sum over points). θ* is trained on the poisoned D and the
reference θ_r retrained from scratch on the corrected D̃, from the same θ_0, by the same recipe (Adam epochs,
then full-batch L-BFGS); "retrain" time is that wall-clock. Second-order updates use the GGN of L(D̃) at θ*
(+ μI, exact). `(cached)`: statistics of D captured at θ* once ("one-off"), a request costs "per request";
`+refineK`: K PCG steps on the exact GGN of D̃ (the network linearized at θ* once, in the one-off), preconditioned
by the cached structure (K = 1: the structure's step with the exact line search on the quadratic model). CPU
columns: process CPU time (one torch thread), i.e. the wall-clock of an idle machine; "× vs retrain (CPU)" is
the load-independent speed-up. With --model-cache, a training identical in data, θ_0 and recipe runs once and
its measured times are reused (the clean-data model is the retrained θ_r of label flip and backdoor and the θ*
of deletion).
"restored" = (acc − acc_poisoned)/(acc_retrained − acc_poisoned) on the test set. MIA AUC: loss-threshold
attack, removed/poisoned points Z (as trained on) vs as many held-out test points prepared the same way
(0.5 = indistinguishable). All timings from one process on a shared 2-core machine under `nice -n 19`;
the 1-minute load average at the start of each problem is in results.csv (`load1`)."""

if __name__ == "__main__":
    main()
