"""The training entry point: tiny real runs (compose API and subprocess), multirun, resume equality."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tensorcurv.experiments.runner import run_training

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
TINY = ["data.limit=120", "batch_size=40", "epochs=2", "progress=false", "threads=1"]


def cfg_for(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[*TINY, *overrides])


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_tiny_run_writes_config_metrics_checkpoint_figure_and_summary(tmp_path):
    s = run_training(cfg_for("curvature.damping=0.03", "optim.lr=0.2"), run_dir=tmp_path)
    for name in (
        "config.yaml",
        "metrics.csv",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/last.pt",
        "figures/loss_curve.png",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = read_csv(tmp_path / "metrics.csv")
    steps = [r for r in rows if r["step_time"]]
    assert len(steps) == s["steps"] == 6  # 120 samples / 40 per batch * 2 epochs
    assert all(float(r["damping"]) == 0.03 and float(r["curvature_fit_time"]) >= 0 for r in steps)
    assert json.loads((tmp_path / "summary.json").read_text())["test_acc"] == s["test_acc"]
    assert s["train_loss"] < 2.0 and 0 <= s["test_acc"] <= 1


def test_adam_run_logs_no_curvature_columns(tmp_path):
    s = run_training(cfg_for("optim=adam"), run_dir=tmp_path)
    assert s["optimizer"] == "adam" and s["structure"] is None
    assert "damping" not in read_csv(tmp_path / "metrics.csv")[0]


def test_autoencoder_run_uses_mse_to_the_input(tmp_path):
    s = run_training(cfg_for("experiment=digits_autoencoder_kfac", *TINY), run_dir=tmp_path)
    assert s["task"] == "autoencode" and s["loss_fn"] == "mse" and "test_acc" not in s and s["test_loss"] < 1.0


def test_interrupted_run_resumes_to_the_same_final_metrics(tmp_path):
    """Killed after step 7 (last checkpoint at step 5), restarted with the same config: same end."""
    over = [
        "dtype=float64",
        "epochs=4",
        "checkpoint_every=5",
        "curvature.kind=mc",
        "optim.lr=0.2",
        "curvature.damping=0.03",
        "optim.momentum=0.5",
    ]
    ref = run_training(cfg_for(*over), run_dir=tmp_path / "ref")

    class Killed(Exception):
        pass

    def kill_at_7(step, metrics):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        run_training(cfg_for(*over), run_dir=tmp_path / "run", callbacks=[kill_at_7])
    assert torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=False)["step"] == 5
    resumed = run_training(cfg_for(*over), run_dir=tmp_path / "run")

    for k in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "steps"):
        assert resumed[k] == ref[k], k
    a, b = read_csv(tmp_path / "ref/metrics.csv"), read_csv(tmp_path / "run/metrics.csv")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # identical per-step history, no duplicates


def test_resume_false_starts_afresh(tmp_path):
    run_training(cfg_for("optim=adam"), run_dir=tmp_path)
    s = run_training(cfg_for("optim=adam", "resume=false", "epochs=1"), run_dir=tmp_path)
    assert s["steps"] == 3
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 3]  # eval at 0, three steps, final eval: nothing left from the first run


def _script(args, cwd, timeout=240):
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_train_script_bad_value_fails_with_one_line(tmp_path):
    r = _script(["curvature.damping=-1", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr == "error: curvature.damping=-1 must be a finite number > 0 or null\n"
    assert not (tmp_path / "run").exists()  # refused before Hydra creates the run directory


# SGD with lr 1e38: after the first step the parameters are huge but finite and every later loss is
# inf, so the optimizer really skips steps 2, 3, ... (its non-finite-loss guard)
SKIPPING = ["optim=sgd", "optim.lr=1e38"]


def test_run_that_skips_most_steps_fails_and_still_writes_the_summary(tmp_path):
    from tensorcurv.experiments.runner import RunFailed

    expected = r"^7 of the run's 12 steps skipped by step 8 \(more than max_skip_fraction=0.5\)"
    with pytest.raises(RunFailed, match=expected):
        run_training(cfg_for(*SKIPPING, "epochs=4"), run_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["skipped_steps"], summary["steps"]) == (7, 8)
    assert summary["status"].startswith("failed: 7 of the run's 12 steps skipped")


def test_skipped_steps_are_counted_and_reported_outside_the_progress_bar(tmp_path, capsys):
    import warnings

    from tensorcurv.optim import NonFiniteStepWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = run_training(cfg_for(*SKIPPING, "max_skip_fraction=1"), run_dir=tmp_path)
    assert s["skipped_steps"] == 5 and s["status"] == "ok"
    assert json.loads((tmp_path / "summary.json").read_text())["skipped_steps"] == 5
    lines = [ln for ln in capsys.readouterr().err.splitlines() if " skipped: " in ln]
    assert [ln.split("(")[-1] for ln in lines] == [f"{k - 1} of {k} steps skipped so far)" for k in range(2, 7)]
    assert not [w for w in caught if issubclass(w.category, NonFiniteStepWarning)]  # no warning inside the bar


def test_skip_count_survives_a_resume(tmp_path):
    over = [*SKIPPING, "max_skip_fraction=1", "checkpoint_every=3"]

    class Killed(Exception):
        pass

    def kill_at_5(step, metrics):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        run_training(cfg_for(*over), run_dir=tmp_path, callbacks=[kill_at_5])
    assert run_training(cfg_for(*over), run_dir=tmp_path)["skipped_steps"] == 5


def test_train_script_run_that_skips_most_steps_exits_1_with_one_line(tmp_path):
    r = _script([*TINY, *SKIPPING, "epochs=4", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert r.returncode == 1
    last = r.stderr.splitlines()[-1]
    assert last.startswith("error: 7 of the run's 12 steps skipped by step 8") and "summary.json" in last
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_steps"] == 7


def test_a_run_is_checkpointed_after_its_first_evaluation(tmp_path):
    """So that a run killed before its first periodic checkpoint resumes (and keeps its W&B run id)."""

    class Killed(Exception):
        pass

    def kill_at_1(step, metrics):
        raise Killed

    with pytest.raises(Killed):
        run_training(cfg_for("optim=adam"), run_dir=tmp_path, callbacks=[kill_at_1])
    assert torch.load(tmp_path / "checkpoints/last.pt", weights_only=False)["step"] == 0


def test_two_job_multirun(tmp_path):
    r = _script(
        ["-m", "curvature=kfac,diagonal", *TINY, "epochs=1", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=tmp_path,
        timeout=400,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    jobs = sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/summary.json"))
    assert len(jobs) == 2 and any("curvature=kfac" in j for j in jobs) and any("curvature=diagonal" in j for j in jobs)
    assert all((tmp_path / "sweep" / j / ".hydra" / "config.yaml").exists() for j in jobs)
    assert r.stdout.count("test_acc=") == 2
    structures = {json.loads((tmp_path / "sweep" / j / "summary.json").read_text())["structure"] for j in jobs}
    assert structures == {"kfac", "diagonal"}


def test_resuming_with_a_different_config_is_refused(tmp_path):
    from tensorcurv.experiments.config import ConfigError

    run_training(cfg_for("optim=adam"), run_dir=tmp_path)
    with pytest.raises(ConfigError, match="different config"):
        run_training(cfg_for("optim=adam", "optim.lr=0.5"), run_dir=tmp_path)


def test_refused_resume_names_the_differing_key(tmp_path):
    from tensorcurv.experiments.config import ConfigError

    run_training(cfg_for("optim=adam"), run_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"optim\.lr \(0\.001 → 0\.5\)"):
        run_training(cfg_for("optim=adam", "optim.lr=0.5"), run_dir=tmp_path)


def test_a_checkpoint_older_than_a_defaulted_key_resumes(tmp_path):
    """A checkpoint written before ``loss`` existed (no key, another fingerprint) is the same run."""
    over = ["optim=adam", "epochs=2", "checkpoint_every=1"]
    run_training(cfg_for(*over), run_dir=tmp_path)
    ckpt = tmp_path / "checkpoints/last.pt"
    state = torch.load(ckpt, weights_only=False)
    state["config"].pop("loss")
    state["fingerprint"] = "written-by-an-older-schema"
    torch.save(state, ckpt)
    assert run_training(cfg_for(*over), run_dir=tmp_path)["steps"] == 6


def test_a_checkpoint_without_a_stored_config_is_checked_against_config_yaml(tmp_path):
    from tensorcurv.experiments.config import ConfigError

    run_training(cfg_for("optim=adam", "max_steps=2", "checkpoint_every=1"), run_dir=tmp_path)
    ckpt = tmp_path / "checkpoints/last.pt"
    state = torch.load(ckpt, weights_only=False)
    del state["config"]
    state["fingerprint"] = "written-by-an-older-schema"
    torch.save(state, ckpt)
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        run_training(cfg_for("optim=adam", "optim.lr=0.5"), run_dir=tmp_path)


def test_refused_resume_leaves_the_run_untouched(tmp_path):
    from tensorcurv.experiments.config import ConfigError

    run_training(cfg_for("optim=adam"), run_dir=tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("config.yaml", "metrics.jsonl", "metrics.csv")}
    with pytest.raises(ConfigError, match="different config"):
        run_training(cfg_for("optim=adam", "optim.lr=0.5"), run_dir=tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_model_that_does_not_fit_the_input_is_a_config_error_before_any_file(tmp_path):
    from tensorcurv.experiments.config import ConfigError

    with pytest.raises(ConfigError, match=r"^model \(cnn\) on digits: cnn: input .* too small for 4 pooling stages"):
        run_training(cfg_for("model=cnn", "model.channels=[4,4,4,4]"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_demo_prints_table_and_writes_png_and_markdown(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    res = demo.main(
        ["data.limit=100", "batch_size=50", "epochs=1", "progress=false"],
        out=tmp_path / "report",
        runs_dir=tmp_path / "runs",
    )
    assert {label for _, label in res} == {"NaturalGradient + K-FAC", "Adam"} and len(res) == 4
    table = capsys.readouterr().out
    assert "optimizer" in table and "time/step [ms]" in table and "autoencoder" in table
    assert (tmp_path / "report" / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report" / "demo.md").read_text()
    assert md.count("| NaturalGradient + K-FAC |") == 2 and md.count("| Adam |") == 2


BCE_AUTOENCODER = ["model=autoencoder", "task=autoencode", "loss=bce_with_logits", "data.normalize=unit"]


def test_bce_autoencoder_run_with_natural_gradient_kfac_finishes_with_finite_loss(tmp_path):
    over = [*BCE_AUTOENCODER, "optim=natural_gradient", "curvature=kfac", "max_steps=3"]
    s = run_training(cfg_for(*over), run_dir=tmp_path)
    rows = read_csv(tmp_path / "metrics.csv")
    assert s["loss_fn"] == "bce_with_logits" and s["steps"] == 3 and s["status"] == "ok"
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows if r.get("loss"))
    assert torch.isfinite(torch.tensor(s["test_loss"]))


def test_evaluation_reports_the_bce_with_logits_loss_of_the_training():
    from tensorcurv.experiments.run_records import evaluate

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 5).double()
    X = torch.rand(7, 5, dtype=torch.float64)
    with torch.no_grad():
        ref = float(torch.nn.BCEWithLogitsLoss()(model(X), X))
    assert evaluate(model, X, X, "bce_with_logits", chunk=3)["loss"] == pytest.approx(ref, rel=1e-14)


def test_unknown_autoencoder_loss_fails_with_one_line_naming_the_key():
    from tensorcurv.experiments.config import ConfigError, validate_train

    with pytest.raises(ConfigError) as e:
        validate_train(cfg_for("loss=bce"))
    assert str(e.value) == "loss='bce' is not an autoencoder loss; valid: mse, bce_with_logits"


def test_bce_autoencoder_on_inputs_outside_unit_interval_fails_with_one_line(tmp_path):
    from tensorcurv.experiments.config import ConfigError

    with pytest.raises(ConfigError, match=r"^loss=bce_with_logits needs inputs in \[0, 1\], but the train split"):
        run_training(cfg_for(*BCE_AUTOENCODER, "data.normalize=standard"), run_dir=tmp_path)


def test_bce_loss_with_classification_fails_with_one_line(tmp_path):
    from tensorcurv.experiments.config import ConfigError

    with pytest.raises(ConfigError, match="^loss=bce_with_logits is an autoencoder loss"):
        run_training(cfg_for("loss=bce_with_logits", "task=classify"), run_dir=tmp_path)
