"""Unlearning on digits with every method, compared with retraining (thin Hydra wrapper).

    python scripts/unlearn.py                                    # conf/unlearn.yaml defaults
    python scripts/unlearn.py experiment=unlearn_backdoor
    python scripts/unlearn.py methods=[kfac,lissa,cg] fraction=0.1

Writes report.md, results.csv and a fidelity-vs-time plot into the run directory (or report_dir).
A bad config value or an unknown key (``+lissa_dept=5``) stops with one line (``error: ...``, exit
status 2, with the closest valid key) before anything is computed or written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CONF = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(config_path=CONF, config_name="unlearn", version_base="1.3")
def main(cfg: DictConfig) -> float:
    import torch

    from tensorcurv.experiments.cli import validate_or_exit
    from tensorcurv.unlearn import benchmark, report

    u = validate_or_exit("unlearn", cfg)  # one line and exit 2 before any work
    if u.threads is not None:
        torch.set_num_threads(u.threads)
    methods = benchmark.default_methods(u.quick, u.lissa_depth)
    if u.methods is not None:
        methods = [m for m in methods if m.name in set(u.methods)]
    rows, desc = benchmark.run(
        u.scenario,
        u.seeds,
        mu=u.mu,
        hidden=u.hidden,
        methods=methods,
        quick=u.quick,
        scenario_kwargs={"fraction": u.fraction, **u.scenario_kwargs},
    )
    out = u.report_dir or hydra.core.hydra_config.HydraConfig.get().runtime.output_dir
    path = report.write_report(
        rows, out, command="python scripts/unlearn.py " + " ".join(sys.argv[1:]), descriptions=desc
    )
    print(f"wrote {path}")
    ok = [r["rel_dist"] for r in rows if r["method"] not in ("original", "retrain") and r["status"] == "ok"]
    return float(min(ok)) if ok else float("nan")


if __name__ == "__main__":
    main()
