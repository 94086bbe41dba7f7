"""Train a model with any optimizer / curvature structure (thin Hydra wrapper).

    python scripts/train.py                                         # conf/train.yaml defaults
    python scripts/train.py experiment=digits_mlp_kfac logger=wandb
    python scripts/train.py -m curvature=kfac,diagonal seed=0,1     # sweep -> multirun/<name>/...
    python scripts/train.py --cfg job                               # print the composed config

Everything happens in ``tensorcurv.experiment.run_training``; a bad config value stops here with
one line (``error: <key>=<value> ...; valid: ...``) before any work starts.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

CONF = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(config_path=CONF, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from tensorcurv.config import ConfigError
    from tensorcurv.experiment import run_training

    try:
        summary = run_training(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(" ".join(f"{k}={summary[k]:.4g}" for k in ("train_loss", "test_loss", "test_acc", "wall_time")
                   if isinstance(summary.get(k), (int, float))))
    return float(summary.get("val_loss", summary["train_loss"]))  # objective for sweepers


if __name__ == "__main__":
    main()
