"""The three command lines refuse bad input with one line naming the key and the valid values,
before any work and before any file is written (validators in-process, a few scripts end to end)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tensorcurv.experiments.cli import RUN_FAILED_EXIT, report_errors, validate_or_exit
from tensorcurv.experiments.config import ConfigError, validate_train
from tensorcurv.experiments.study_config import validate_study
from tensorcurv.experiments.unlearn_config import validate_unlearn

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
VALIDATORS = {"train": validate_train, "study": validate_study, "unlearn": validate_unlearn}


def compose_cfg(primary, overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=primary, overrides=list(overrides))


def error_of(primary, *overrides) -> str:
    with pytest.raises(ConfigError) as e:
        VALIDATORS[primary](compose_cfg(primary, overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# (primary, overrides, substrings the one-line error must contain)
BAD_INPUTS = [
    # scripts/train.py
    ("train", ["model.hidden_sizes=abc"], ["model.hidden_sizes='abc'", "list of integers >= 1"]),
    ("train", ["model.hidden_sizes=[-4]"], ["model.hidden_sizes=[-4]", "-4", ">= 1"]),
    ("train", ["model.activation=relu6"], ["model.activation='relu6'", "did you mean 'relu'", "tanh", "softplus"]),
    ("train", ["curvature.damping=0"], ["curvature.damping=0", "> 0"]),
    ("train", ["model=cnn", "model.channels=[16,0]"], ["model.channels=[16, 0]", ">= 1"]),
    ("train", ["model=conv_autoencoder", "model.channels=[8]"], ["model.channels=[8]", "list of 2 integers"]),
    ("train", ["model=resnet", "model.norm=layer"], ["model.norm='layer'", "group", "batch"]),
    ("train", ["model=autoencoder", "model.preset=mnistt"], ["model.preset='mnistt'", "did you mean 'mnist'"]),
    ("train", ["distributed=ddp"], ["torchrun --nproc_per_node=", "distributed=ddp", "RANK"]),
    ("train", ["distributed=ddp", "distributed.solve_mode=remote"], ["distributed.solve_mode='remote'", "owner"]),
    ("train", ["+distributed.backnd=gloo"], ["distributed.backnd", "did you mean 'distributed.backend'"]),
    ("train", ["resume=no"], ["resume='no'", "true or false"]),
    ("train", ["resume=maybe"], ["resume='maybe'", "true or false"]),
    ("train", ["progress=1"], ["progress=1", "true or false"]),
    ("train", ["+foo=1"], ["unknown key 'foo'", "epochs"]),
    ("train", ["+max_skip_fractio=0.1"], ["did you mean 'max_skip_fraction'"]),
    ("train", ["optim=natural_gradient", "+optim.refin=5"], ["does not take ['refin']", "refine", "optimizer keys"]),
    ("train", ["optim=natural_gradient", "optim.refine=-2"], ["refine must be an integer >= 0"]),
    ("train", ["max_skip_fraction=1.5"], ["max_skip_fraction=1.5", "<= 1"]),
    ("train", ["curvature.kind=fisher"], ["curvature.kind='fisher'", "empirical", "ggn"]),
    ("train", ["curvature.name=kfca"], ["curvature.name='kfca'", "did you mean 'kfac'"]),
    ("train", ["data.download=maybe"], ["data.download='maybe'", "true or false"]),
    ("train", ["data.normalize=zscore"], ["data.normalize='zscore'", "standard", "unit"]),
    ("train", ["logger=wandb", "logger.tags=abc"], ["logger.tags='abc'", "list of strings"]),
    ("train", ["+schedule.warmup=3"], ["schedule.warmup", "kwargs"]),
    # scripts/study.py
    ("study", ["train.steps=-1"], ["train.steps=-1", "integer >= 0"]),
    ("study", ["study.batch_size=0"], ["study.batch_size=0", "integer >= 1"]),
    ("study", ["+foo=1"], ["unknown key 'foo'", "render_only"]),
    ("study", ["+study.mc_sample=2"], ["did you mean 'study.mc_samples'"]),
    ("study", ["study.kinds=[ggn,fisher]"], ["'fisher' is not a curvature kind", "empirical"]),
    ("study", ["study.kinds=[]"], ["study.kinds=[]", "non-empty"]),
    ("study", ["study.checkpoints=[0,1.5]"], ["study.checkpoints", "1.5", "<= 1"]),
    ("study", ["study.structures=[kfac,kfca]"], ["'kfca' is not a structure", "did you mean 'kfac'"]),
    ("study", ["+study.sweeps.kron_summ.rank=[2]"], ["study.sweeps.kron_summ", "did you mean 'study.sweeps.kron_sum'"]),
    ("study", ["study.sweeps.kron_sum.rank=[0,2]"], ["kron_sum", "rank", ">= 1"]),
    ("study", ["+study.hparams.kfac.damping_kind=exact"], ["damping_kind='exact'", "tikhonov"]),
    ("study", ["study.damping_rel=[0.1,-1]"], ["study.damping_rel", "-1", "> 0"]),
    ("study", ["train.lr=0"], ["train.lr=0", "> 0"]),
    ("study", ["model=autoencoder"], ["model.name='autoencoder'", "classifier", "mlp"]),
    ("study", ["render_only=maybe"], ["render_only='maybe'", "true or false"]),
    ("study", ["loss=mse"], ["loss='mse'", "cross_entropy"]),
    # scripts/unlearn.py
    ("unlearn", ["scenario=nope"], ["scenario='nope'", "label_flip", "backdoor", "deletion"]),
    ("unlearn", ["fraction=2"], ["fraction=2", "> 0 and < 1"]),
    ("unlearn", ["fraction=0"], ["fraction=0", "> 0 and < 1"]),
    ("unlearn", ["mu=-1"], ["mu=-1", "> 0"]),
    ("unlearn", ["seeds=abc"], ["seeds='abc'", "list of integers >= 0"]),
    ("unlearn", ["seeds=[]"], ["seeds=[]", "non-empty"]),
    ("unlearn", ["+lissa_dept=5"], ["unknown key 'lissa_dept'", "did you mean 'lissa_depth'"]),
    ("unlearn", ["lissa_depth=0"], ["lissa_depth=0", ">= 1"]),
    ("unlearn", ["hidden=[0]"], ["hidden=[0]", ">= 1"]),
    ("unlearn", ["methods=[kfac,lisa]"], ["'lisa' is not a method", "did you mean 'lissa'"]),
    ("unlearn", ["quick=yes"], ["quick='yes'", "true or false"]),
    ("unlearn", ["+scenario_kwargs.patch=2"], ["scenario_kwargs.patch", "takes no keys"]),
    ("unlearn", ["experiment=unlearn_backdoor", "scenario_kwargs.target=12"], ["scenario_kwargs.target=12", "<= 9"]),
    ("unlearn", ["experiment=unlearn_backdoor", "+scenario_kwargs.pach=3"], ["did you mean 'scenario_kwargs.patch'"]),
]


@pytest.mark.parametrize("primary,overrides,expected", BAD_INPUTS, ids=[f"{p}:{' '.join(o)}" for p, o, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_key_and_valid_values(primary, overrides, expected):
    msg = error_of(primary, *overrides)
    for part in expected:
        assert part in msg, (part, msg)


@pytest.mark.parametrize("primary", ["train", "study", "unlearn"])
def test_default_config_is_valid(primary):
    VALIDATORS[primary](compose_cfg(primary))


def study_data_error(*overrides) -> str:
    from tensorcurv.experiments.study_config import check_study_data

    with pytest.raises(ConfigError) as e:
        check_study_data(validate_study(compose_cfg("study", overrides)))
    return str(e.value)


def test_study_spectrum_layer_must_be_a_covered_layer():
    assert study_data_error("study.spectrum_layer=2") == (
        "study.spectrum_layer='2' is not a covered layer; valid: 1, 3, 5"
    )


def test_study_model_that_does_not_fit_the_data_is_refused():
    assert study_data_error("model=cnn", "model.channels=[4,4,4,4]").startswith("model (cnn) on digits: ")


def test_study_dataset_without_its_files_is_refused(tmp_path):
    msg = study_data_error("data=mnist", f"data.data_dir={tmp_path}", "data.download=false")
    assert msg.startswith("data (mnist): dataset 'mnist': missing ") and str(tmp_path) in msg


def test_study_data_check_accepts_the_default_and_a_numeric_layer_name():
    from tensorcurv.experiments.study_config import check_study_data

    raw = validate_study(compose_cfg("study", ["study.spectrum_layer=3"]))
    assert raw["study"]["spectrum_layer"] == "3"
    check_study_data(raw)


def test_resume_accepts_strict_booleans():
    assert validate_train(compose_cfg("train", ["resume=false"])).train.resume is False
    assert validate_train(compose_cfg("train", ["resume=true"])).train.resume is True


def test_unlearn_validation_returns_typed_fields():
    u = validate_unlearn(compose_cfg("unlearn", ["experiment=unlearn_backdoor", "hidden=[16]"]))
    assert (u.scenario, u.seeds, u.hidden, u.scenario_kwargs["patch"]) == ("backdoor", [0, 1, 2], [16], 2)


def test_ddp_inside_torchrun_environment_is_accepted(monkeypatch):
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(key, value)
    assert validate_train(compose_cfg("train", ["distributed=ddp"])).raw["distributed"]["enabled"] is True


def test_validate_or_exit_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        validate_or_exit("unlearn", compose_cfg("unlearn", ["mu=-1"]))
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: mu=-1 must be a finite number > 0\n"


def test_failed_run_is_reported_as_one_line_with_exit_1(capsys):
    from tensorcurv.experiments.runner import RunFailed

    with pytest.raises(SystemExit) as e, report_errors():
        raise RunFailed("7 of the run's 12 steps skipped\nby step 8")
    assert e.value.code == RUN_FAILED_EXIT == 1
    assert capsys.readouterr().err == "error: 7 of the run's 12 steps skipped by step 8\n"


# ------------------------------------------------------------------ end to end (fresh processes)
def run_script(script, args, cwd):
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(ROOT)}
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "script,args,line",
    [
        ("study.py", ["train.steps=-1", "report_dir={tmp}/report"], "error: train.steps=-1 must be an integer >= 0"),
        ("unlearn.py", ["+lissa_dept=5"], "error: unknown key 'lissa_dept'; did you mean 'lissa_depth'? valid keys: "),
        ("train.py", ["distributed=ddp"], "error: distributed=ddp needs the torchrun environment"),
    ],
    ids=["study", "unlearn", "train-ddp"],
)
def test_script_refuses_bad_input_before_hydra_writes_the_run_directory(tmp_path, script, args, line):
    r = run_script(script, [*(a.format(tmp=tmp_path) for a in args), f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(line), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run dir, no .hydra, no log, no report
