"""Loggers: the CSV record, the real wandb package in offline mode, and the none logger."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tensorcurv import tracking
from tensorcurv.experiment import run_training

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = ["data.limit=120", "batch_size=40", "epochs=2", "progress=false", "threads=1"]


def test_csv_logger_writes_union_of_columns_jsonl_table_and_summary(tmp_path):
    lg = tracking.build({"kind": "csv"}, tmp_path)
    lg.log({"loss": 1.0}, step=1)
    lg.log({"loss": 0.5, "val_loss": 0.7}, step=2)
    lg.log_table("sizes", [{"layer": "0", "n": 65}])
    lg.summary({"final": 0.5})
    lg.finish()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert rows == [{"step": "1", "loss": "1.0", "val_loss": ""}, {"step": "2", "loss": "0.5", "val_loss": "0.7"}]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "tables" / "sizes.csv").read_text().splitlines() == ["layer,n", "0,65"]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"final": 0.5}


def test_csv_logger_restored_state_drops_rows_after_the_checkpoint(tmp_path):
    lg = tracking.CsvLogger(tmp_path)
    lg.log({"loss": 1.0}, 1)
    state = lg.state_dict()
    lg.log({"loss": 2.0}, 2)
    lg.load_state_dict(state)
    assert [r["step"] for r in lg.rows] == [1]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_unknown_logger_kind_and_mode_name_the_choices(tmp_path):
    with pytest.raises(ValueError, match="wandb"):
        tracking.build({"kind": "tensorboard"}, tmp_path)
    with pytest.raises(ValueError, match="offline"):
        tracking.build({"kind": "wandb", "mode": "offlin"}, tmp_path)


def test_none_logger_writes_nothing(tmp_path):
    lg = tracking.build({"kind": "none"}, tmp_path / "x")
    lg.log({"loss": 1.0}, 1)
    lg.finish()
    assert not (tmp_path / "x").exists()


def test_wandb_offline_run_directory_holds_the_logged_history(tmp_path, monkeypatch):
    """logger=wandb (offline, the default mode): a real run dir that `wandb sync` can upload."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, "optim=adam", "logger=wandb"])
    assert cfg.logger.mode == "offline"
    run_training(cfg, run_dir=tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    blob = files[0].read_bytes()
    for key in (b"test_acc", b"step_time", b"adam"):  # history + config
        assert key in blob, key
    assert (runs[0] / "files" / "media" / "images").is_dir()  # the final loss-curve plot
    assert (tmp_path / "metrics.csv").exists()  # the local record is kept next to W&B
