"""Loggers: the CSV record, the real wandb package in offline mode, and the none logger."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tensorcurv.experiments import tracking as tracking
from tensorcurv.experiments.runner import run_training

CONF = Path(__file__).resolve().parents[2] / "conf"
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
    assert len(files) == 1
    wait_for_exit_record(files[0])
    blob = files[0].read_bytes()
    for key in (b"test_acc", b"step_time", b"adam"):  # history + config
        assert key in blob, key
    assert (runs[0] / "files" / "media" / "images").is_dir()  # the final loss-curve plot
    assert (tmp_path / "metrics.csv").exists()  # the local record is kept next to W&B


def offline_records(path: Path) -> list:
    """The protobuf records of an offline ``run-<id>.wandb`` file (W&B's LevelDB-log framing: a 7-byte
    header, 32 KiB blocks of chunks ``crc32 (4) | length (2) | type (1: full, 2: first, 3: middle, 4: last)``)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, out = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            pos += block - pos % block if pos % block else 0
        elif kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            out.append(record)
            pending = b""
        else:
            pending += chunk
    return out


def wait_for_exit_record(path: Path, timeout: float = 60.0) -> list:
    """The records of an offline run file once its exit record is written: ``run.finish()`` returns
    before W&B's service has flushed and closed the file (a few ms later, longer on a loaded machine)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        recs = offline_records(path) if path.exists() else []
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.monotonic() > deadline:
            return recs
        time.sleep(0.05)


def offline_history(path: Path) -> tuple[list[str], dict[int, dict[str, float]]]:
    """``(run ids, {step: {key: value}})`` of an offline run file, one entry per committed history row."""
    recs = wait_for_exit_record(path)
    ids = [r.run.run_id for r in recs if r.WhichOneof("record_type") == "run"]
    rows: dict[int, dict[str, float]] = {}
    for r in recs:
        if r.WhichOneof("record_type") == "history":
            assert r.history.step.num not in rows, f"step {r.history.step.num} logged twice"
            items = {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            rows[r.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return ids, rows


def test_wandb_resumed_run_is_the_same_offline_run_with_every_step_once(tmp_path, monkeypatch):
    """Killed at step 7 (checkpoint at 5) and restarted: one offline run directory, the stored run id,
    steps 0..12 each exactly once, with the losses of the local record."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*TINY, "epochs=4", "checkpoint_every=5", "optim=adam", "logger=wandb"])

    class Killed(Exception):
        pass

    def kill_at_7(step, metrics):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        run_training(cfg, run_dir=tmp_path, callbacks=[kill_at_7])
    import torch

    run_id = torch.load(tmp_path / "checkpoints/last.pt", weights_only=False)["logger_ext"]["run_id"]
    run_training(cfg, run_dir=tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    ids, history = offline_history(runs[0] / f"run-{run_id}.wandb")
    assert ids == [run_id]
    assert sorted(history) == list(range(13))
    local = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    local_losses = {r["step"]: r["loss"] for r in local if "loss" in r}
    assert local_losses == {k: v["loss"] for k, v in history.items() if "loss" in v}
    assert history[12]["test_acc"] == next(r["test_acc"] for r in reversed(local) if "test_acc" in r)
