"""Config composition for every experiment file, and one-line validation errors before any work."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tensorcurv import structures
from tensorcurv.experiments.config import ConfigError, validate_train
from tensorcurv.experiments.study_config import validate_study
from tensorcurv.experiments.unlearn_config import validate_unlearn

CONF = Path(__file__).resolve().parents[2] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def primary_for(experiment: str) -> str:
    """The naming rule of conf/experiment: study_* -> study.yaml, unlearn_* -> unlearn.yaml, else train.yaml."""
    for prefix, primary in (("study_", "study"), ("unlearn_", "unlearn")):
        if experiment.startswith(prefix):
            return primary
    return "train"


def compose_cfg(primary: str = "train", overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=primary, overrides=list(overrides))


def train_cfg(*overrides):
    return OmegaConf.to_container(compose_cfg("train", overrides), resolve=True)


def test_there_are_train_experiments():
    assert {"digits_mlp_kfac", "digits_mlp_adam", "digits_autoencoder_kfac"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_its_primary_config(experiment):
    primary = primary_for(experiment)
    assert (CONF / f"{primary}.yaml").exists(), f"{experiment} needs conf/{primary}.yaml"
    cfg = compose_cfg(primary, [f"experiment={experiment}"])
    assert OmegaConf.to_container(cfg, resolve=True)
    if primary == "train" and cfg.curvature.name in structures.names():
        v = validate_train(cfg)
        assert v.train.name == experiment  # every experiment names its runs after itself
    elif primary == "study":
        assert validate_study(cfg)["name"] == experiment
    elif primary == "unlearn":
        assert validate_unlearn(cfg).name == experiment


def test_default_train_config_is_valid():
    v = validate_train(compose_cfg())
    assert (v.data.name, v.model["name"], v.optim["name"], v.curvature["name"]) == (
        "digits",
        "mlp",
        "natural_gradient",
        "kfac",
    )


def test_second_order_optimizer_takes_structure_kind_damping_from_curvature_group():
    v = validate_train(compose_cfg(overrides=["curvature=diagonal", "curvature.damping=0.5", "curvature.kind=mc"]))
    kw = v.optimizer_kwargs()
    assert (kw["structure"], kw["kind"], kw["damping"]) == ("diagonal", "mc", 0.5)


def test_structure_hparams_reach_the_optimizer():
    kw = validate_train(compose_cfg(overrides=["curvature.damping_kind=pi"])).optimizer_kwargs()
    assert kw["damping_kind"] == "pi" and kw["weight_sharing"] == "expand"


def test_first_order_optimizer_drops_curvature_keys():
    kw = validate_train(compose_cfg(overrides=["optim=adam"])).optimizer_kwargs()
    assert not {"structure", "kind", "damping", "damping_kind"} & set(kw)


def test_every_curvature_file_validates_through_make_hparams():
    for path in sorted((CONF / "curvature").glob("*.yaml")):
        c = OmegaConf.to_container(OmegaConf.load(path))
        assert {"name", "kind", "damping"} <= set(c), path.name
        if c["name"] in structures.names():
            structures.make_hparams(c["name"], **{k: v for k, v in c.items() if k not in ("name", "kind", "damping")})


def _error(cfg) -> str:
    with pytest.raises(ConfigError) as e:
        validate_train(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unknown_structure_names_key_and_valid_choices():
    cfg = train_cfg()
    cfg["curvature"]["name"] = "kfca"
    msg = _error(cfg)
    assert "curvature.name='kfca'" in msg and "kfac" in msg and "diagonal" in msg


def test_unknown_optimizer_names_key_and_valid_choices():
    msg = _error(train_cfg("optim.name=adamm"))
    assert "optim.name='adamm'" in msg and "natural_gradient" in msg and "adam," in msg


def test_unknown_dataset_and_model_name_valid_choices():
    assert "digits" in _error(train_cfg("data.name=digitz")) and "data.name" in _error(train_cfg("data.name=digitz"))
    assert "model.name='mlpp'" in _error(train_cfg("model.name=mlpp"))


def test_negative_damping_is_rejected():
    assert "curvature.damping=-1.0" in _error(train_cfg("curvature.damping=-1.0"))


@pytest.mark.skipif("kron_sum" not in structures.names(), reason="kron_sum structure not registered")
def test_rank_below_one_is_rejected():
    msg = _error(train_cfg("curvature=kron_sum", "curvature.rank=0"))
    assert msg.startswith("curvature (kron_sum)") and "rank" in msg


def test_bad_structure_hparam_value_names_the_choices():
    msg = _error(train_cfg("curvature.damping_kind=exact"))
    assert "damping_kind" in msg and "tikhonov" in msg


def test_unknown_structure_hparam_key_is_rejected():
    assert "rnak" in _error(train_cfg("+curvature.rnak=2"))


def test_unknown_top_level_key_lists_valid_keys():
    msg = _error(train_cfg("+epochz=3"))
    assert "epochz" in msg and "epochs" in msg


def test_bad_loop_values_are_rejected():
    assert "batch_size=0" in _error(train_cfg("batch_size=0"))
    assert "dtype='float16'" in _error(train_cfg("dtype=float16"))
    assert "data.val_fraction=1.5" in _error(train_cfg("data.val_fraction=1.5"))
    assert "logger.mode='onlin'" in _error(train_cfg("logger=wandb", "logger.mode=onlin"))
    assert "schedule.name='cosine'" in _error(train_cfg("schedule.name=cosine"))


def test_bad_optimizer_value_is_rejected():
    assert _error(train_cfg("optim=adam", "optim.beta1=1.5")).startswith("optim (adam)")


def test_optim_structure_conflicting_with_curvature_group_is_rejected():
    assert "optim.structure='diagonal'" in _error(train_cfg("optim.structure=diagonal"))


def test_model_kwargs_are_checked_against_the_builder():
    assert "hidden_sizez" in _error(train_cfg("+model.hidden_sizez=[3]"))


def test_index_split_that_does_not_divide_the_layer_fails_before_training(monkeypatch, tmp_path):
    """A shape-dependent hyper-parameter is checked by constructing every block on the model."""
    from dataclasses import dataclass

    from tensorcurv.experiments.runner import run_training
    from tensorcurv.structures import registry
    from tensorcurv.structures.diagonal import Diagonal

    @dataclass
    class SplitHparams:
        in_split: tuple = (2, 2)

    class SplitProbe(Diagonal):
        name = "split_probe"
        Hparams = SplitHparams

        def __init__(self, shape, hparams=None):
            super().__init__(shape, hparams)
            a, b = self.hparams.in_split
            if a * b != shape[1]:
                raise ValueError(f"in_split={list(self.hparams.in_split)} does not divide the layer's n={shape[1]}")

    monkeypatch.setitem(registry._REGISTRY, "split_probe", SplitProbe)
    cfg = train_cfg(
        "curvature=diagonal",
        "curvature.name=split_probe",
        "+curvature.in_split=[4,16]",
        f"run_dir={tmp_path}",
        "progress=false",
    )
    with pytest.raises(ConfigError, match=r"curvature \(split_probe\): in_split=\[4, 16\] does not divide"):
        run_training(cfg)
    assert not (tmp_path / "metrics.csv").exists()  # no training happened


def test_slurm_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher.timeout_min == 120
    assert "submitit" in cfg.hydra.launcher._target_.lower()


@pytest.mark.skipif("tucker" not in structures.names(), reason="tucker structure not registered")
def test_tucker_split_that_does_not_multiply_to_the_layer_size_fails_before_training(tmp_path):
    from tensorcurv.experiments.runner import run_training

    cfg = train_cfg("curvature=tucker", "curvature.splits_in=[4,16]", f"run_dir={tmp_path}", "progress=false")
    with pytest.raises(ConfigError, match=r"^curvature \(tucker\): .*splits_in=\[4, 16\].*65"):
        run_training(cfg)  # the MLP's layers have n = 64 + 1 (bias) = 65
    assert not (tmp_path / "metrics.csv").exists()


@pytest.mark.skipif("tt" not in structures.names(), reason="tt structure not registered")
def test_tt_rank_below_one_is_rejected_at_validation():
    assert _error(train_cfg("curvature=tt", "curvature.ranks=0")).startswith("curvature (tt)")


def test_unknown_device_names_the_valid_forms():
    msg = _error(train_cfg("device=tpu"))
    assert "device='tpu'" in msg and "cuda:<index>" in msg


def test_cuda_device_without_cuda_is_a_config_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "torch.cuda.is_available() is False" in _error(train_cfg("device=cuda"))


def test_auto_device_falls_back_to_cpu_without_cuda(monkeypatch):
    import torch

    from tensorcurv.experiments.config import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    validate_train(train_cfg("device=auto"))


@pytest.mark.parametrize("name", ["soap", "shampoo", "psgd_kron"])
def test_packaged_optimizer_without_pytorch_optimizer_fails_validation_naming_the_extra(name, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda m, *a: None if m == "pytorch_optimizer" else find_spec(m, *a)
    )
    with pytest.raises(ConfigError) as e:
        validate_train(compose_cfg("train", [f"optim={name}"]))
    assert str(e.value) == (
        f"optim={name}: optimizer {name!r} needs the pytorch-optimizer package: "
        "pip install 'tensorcurv[baselines]' (or make setup)"
    )
