"""Unlearning on digits with every method, compared with retraining (thin Hydra wrapper).

    python scripts/unlearn.py                                    # conf/unlearn.yaml defaults
    python scripts/unlearn.py experiment=unlearn_backdoor
    python scripts/unlearn.py methods=[kfac,lissa,cg] fraction=0.1

Writes report.md, results.csv and a fidelity-vs-time plot into the run directory (or report_dir).
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
CONF = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(config_path=CONF, config_name="unlearn", version_base="1.3")
def main(cfg: DictConfig) -> float:
    import torch

    from tensorcurv.unlearn import benchmark, report

    torch.set_num_threads(cfg.threads)
    methods = benchmark.default_methods(cfg.quick, cfg.lissa_depth)
    if cfg.methods is not None:
        known = [m.name for m in methods]
        unknown = sorted(set(cfg.methods) - set(known))
        if unknown:
            print(f"error: methods={unknown} unknown; valid: {known}", file=sys.stderr)
            sys.exit(2)
        methods = [m for m in methods if m.name in set(cfg.methods)]
    rows, desc = benchmark.run(cfg.scenario, list(cfg.seeds), mu=cfg.mu, hidden=list(cfg.hidden), methods=methods,
                               quick=cfg.quick, scenario_kwargs={"fraction": cfg.fraction,
                                                                 **OmegaConf.to_container(cfg.scenario_kwargs)})
    out = cfg.report_dir or hydra.core.hydra_config.HydraConfig.get().runtime.output_dir
    path = report.write_report(rows, out, command="python scripts/unlearn.py " + " ".join(sys.argv[1:]),
                               descriptions=desc)
    print(f"wrote {path}")
    ok = [r["rel_dist"] for r in rows if r["method"] not in ("original", "retrain") and r["status"] == "ok"]
    return float(min(ok)) if ok else float("nan")


if __name__ == "__main__":
    main()
