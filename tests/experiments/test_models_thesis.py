"""The thesis's autoencoders (CURVES, MNIST, FACES): architecture, activations, initialization, curvature."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from tensorcurv import Curvature
from tensorcurv.experiments import models

CONF = Path(__file__).resolve().parents[2] / "conf"
#: the thesis settings of conf/model/thesis_*.yaml (the thesis code's apps/mlp_cnn/models.py)
THESIS = {"activation": "relu", "code_activation": "relu", "init": "xavier_uniform", "bias_init": 0.01}
#: (preset, input shape, widths of every Linear layer's output, parameter count Σ (a·b + b) over layers)
ARCHITECTURES = [
    ("curves", (1, 28, 28), [400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784], 842_340),
    ("mnist", (1, 28, 28), [1000, 500, 250, 30, 250, 500, 1000, 784], 2_837_314),
    ("faces", (1, 25, 25), [2000, 1000, 500, 30, 500, 1000, 2000, 625], 7_537_655),
]


def linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("preset,shape,widths,count", ARCHITECTURES)
def test_thesis_autoencoder_has_the_published_widths_and_parameter_count(preset, shape, widths, count):
    m = models.build("autoencoder", shape, preset=preset, **THESIS)
    assert [layer.out_features for layer in linears(m)] == widths
    assert sum(p.numel() for p in m.parameters()) == count


@pytest.mark.parametrize("preset,shape,widths,count", ARCHITECTURES)
def test_thesis_autoencoder_maps_a_batch_to_one_output_per_pixel(preset, shape, widths, count):
    m = models.build("autoencoder", shape, preset=preset, **THESIS)
    assert tuple(m(torch.rand(3, *shape)).shape) == (3, math.prod(shape))


def test_thesis_activations_are_relu_after_every_hidden_layer_and_the_code_and_the_output_is_linear():
    m = models.build("autoencoder", (1, 28, 28), preset="curves", **THESIS)
    layers = [type(x) for x in m if not isinstance(x, nn.Flatten)]
    assert layers == [nn.Linear, nn.ReLU] * 11 + [nn.Linear]


def test_hinton_salakhutdinov_variant_has_sigmoid_hidden_units_and_a_linear_code():
    m = models.build("autoencoder", (1, 28, 28), preset="curves", activation="sigmoid", code_activation=None)
    layers = [type(x) for x in m if not isinstance(x, nn.Flatten)]
    code = 2 * 5  # five (Linear, Sigmoid) pairs, then the code Linear
    assert layers[code] is nn.Linear and layers[code + 1] is nn.Linear  # no activation after the code
    assert layers.count(nn.Sigmoid) == 10 and layers[-1] is nn.Linear


def test_xavier_uniform_weights_have_the_glorot_bound_and_variance():
    # W ~ U(−a, a), a = √(6/(fan_in + fan_out)): variance a²/3. For the 784 → 400 layer (313,600
    # weights) the relative standard error of the sample variance is √(0.8/n) ≈ 0.0016; 1 % is 6σ.
    torch.manual_seed(0)
    w = linears(models.build("autoencoder", (1, 28, 28), preset="curves", **THESIS))[0].weight.detach().double()
    a = math.sqrt(6.0 / (784 + 400))
    assert float(w.abs().max()) <= a and float(w.abs().max()) > 0.999 * a
    assert float(w.var()) == pytest.approx(a * a / 3, rel=0.01)
    assert abs(float(w.mean())) < 5 * a / math.sqrt(3 * w.numel())  # 5 standard errors of the mean


def test_every_layer_gets_its_own_glorot_bound():
    torch.manual_seed(0)
    for layer in linears(models.build("autoencoder", (1, 25, 25), preset="faces", **THESIS)):
        a = math.sqrt(6.0 / (layer.in_features + layer.out_features))
        assert float(layer.weight.detach().abs().max()) <= a


def test_thesis_biases_are_the_constant_001_and_plain_xavier_biases_are_zero():
    thesis = models.build("autoencoder", (1, 8, 8), preset=None, hidden_sizes=[16, 4], **THESIS)
    assert all(torch.all(layer.bias == 0.01) for layer in linears(thesis))
    plain = models.build("autoencoder", (1, 8, 8), hidden_sizes=[16, 4], init="xavier_uniform")
    assert all(torch.all(layer.bias == 0) for layer in linears(plain))


def test_initialization_is_reproducible_from_torch_seed():
    torch.manual_seed(5)
    a = models.build("autoencoder", (1, 8, 8), hidden_sizes=[16, 4], **THESIS)
    torch.manual_seed(5)
    b = models.build("autoencoder", (1, 8, 8), hidden_sizes=[16, 4], **THESIS)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_unknown_init_and_code_activation_raise_with_valid_choices():
    with pytest.raises(ValueError, match="xavier_uniform"):
        models.build("autoencoder", (1, 8, 8), init="glorot")
    with pytest.raises(ValueError, match="activation"):
        models.build("autoencoder", (1, 8, 8), code_activation="swishy")


@pytest.mark.parametrize("kind", ["ggn", "mc"])
def test_kfac_ggn_update_with_bce_runs_on_the_curves_autoencoder(kind):
    torch.manual_seed(0)
    m = models.build("autoencoder", (1, 28, 28), preset="curves", **THESIS)
    x = torch.rand(3, 1, 28, 28)
    y = x.flatten(1)
    curv = Curvature(m, "kfac", kind, seed=0)
    value = curv.update(x, y, nn.BCEWithLogitsLoss())
    assert torch.allclose(value, nn.BCEWithLogitsLoss()(m(x), y))
    assert len(curv.blocks) == 12 and all(b.fitted for b in curv.blocks.values())
    grads = torch.autograd.grad(nn.BCEWithLogitsLoss()(m(x), y), list(m.parameters()))
    step = curv.solve(list(grads), damping=1e-3)
    assert all(torch.isfinite(s).all() for s in step)


@pytest.mark.parametrize("dataset", ["curves", "mnist", "faces"])
def test_thesis_model_config_files_build_the_thesis_model(dataset):
    from omegaconf import OmegaConf

    from tensorcurv.experiments.config import validate_model

    cfg = validate_model(OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"thesis_{dataset}.yaml")))
    assert {k: cfg[k] for k in THESIS} == THESIS and cfg["preset"] == dataset
    shape = (1, 25, 25) if dataset == "faces" else (1, 28, 28)
    m = models.build(cfg.pop("name"), shape, **cfg)
    assert sum(p.numel() for p in m.parameters()) == {a[0]: a[3] for a in ARCHITECTURES}[dataset]


def test_natural_gradient_kfac_with_bce_lowers_the_loss_of_a_small_curves_autoencoder():
    # 64 regenerated curves on a 12 × 12 frame (the 28 × 28 A factor is too slow for a unit test), a
    # 144-32-6 thesis-style autoencoder, 15 full-batch K-FAC steps on the MC Fisher, float64; seeded,
    # so deterministic: measured 0.699 -> 0.298, the bound 0.6 × the first loss leaves a wide margin
    from tensorcurv import optim
    from tensorcurv.experiments import curves_synthetic

    x = torch.as_tensor(curves_synthetic.make_curves_synthetic(64, seed=0, side=12, margin=1.0), dtype=torch.float64)
    x, y = x.unsqueeze(1), x.flatten(1)
    torch.manual_seed(0)
    m = models.build("autoencoder", (1, 12, 12), hidden_sizes=[32, 6], **THESIS).double()
    opt = optim.build(
        "natural_gradient", m, nn.BCEWithLogitsLoss(), structure="kfac", lr=0.3, damping=1e-2, inverse_interval=5
    )
    losses = [float(opt.step(x, y)) for _ in range(15)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.6 * losses[0]
