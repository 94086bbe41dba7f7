"""Train a model with any optimizer / curvature structure (thin Hydra wrapper).

    python scripts/train.py                                         # conf/train.yaml defaults
    python scripts/train.py experiment=digits_mlp_kfac logger=wandb
    python scripts/train.py -m curvature=kfac,diagonal seed=0,1     # sweep -> multirun/<name>/...
    python scripts/train.py --cfg job                               # print the composed config
    torchrun --nproc_per_node=2 scripts/train.py distributed=ddp    # data parallel

Everything happens in ``tensorcurv.experiments.runner.run_training``. A bad config value stops with one
line (``error: <key>=<value> ...; valid: ...``, exit status 2) before anything is written; a run
that fails (diverged, or more than ``max_skip_fraction`` of its steps skipped) writes its
``summary.json`` and stops with one line and exit status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONF = str(ROOT / "conf")


@hydra.main(config_path=CONF, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from tensorcurv.experiments.cli import report_errors
    from tensorcurv.experiments.runner import run_training

    with report_errors():
        summary = run_training(cfg)
    print(
        " ".join(
            f"{k}={summary[k]:.4g}"
            for k in ("train_loss", "test_loss", "test_acc", "wall_time")
            if isinstance(summary.get(k), (int, float))
        )
    )
    return float(summary.get("val_loss", summary["train_loss"]))  # objective for sweepers


if __name__ == "__main__":
    main()
