"""Models for the experiments, built by name: ``build(name, input_shape, num_outputs, **kw)``.

Every model takes a batch ``(N, *input_shape)`` and flattens where it needs to. Activations are
never in-place (the curvature capture hooks read module inputs after the forward pass).

* ``mlp``: ``Flatten → [Linear → act] × len(hidden_sizes) → Linear(num_outputs)``.
* ``autoencoder``: the deep autoencoder of Hinton & Salakhutdinov (2006), the benchmark of
  Martens (2010), Martens & Grosse (2015) and the KPSVD / two-level K-FAC thesis (Koroko et al.):
  encoder widths ``hidden_sizes`` down to a code, mirrored decoder, ``activation`` after every
  hidden layer, ``code_activation`` after the code layer (``None``: a linear code) and a linear
  output of ``d = prod(input_shape)`` values: logits for ``nn.BCEWithLogitsLoss`` (CURVES, MNIST:
  the sigmoid output and BCE of the papers, in one numerically stable loss) or the reconstruction
  for ``nn.MSELoss`` (FACES), against the flattened input. ``hidden_sizes=None`` scales the width
  to the input, ``[2d, d/2]`` (e.g. 64-128-32-128-64 for digits); ``preset`` picks a published
  architecture (:data:`AUTOENCODER_PRESETS`: ``mnist`` 784-1000-500-250-30, ``curves``
  784-400-200-100-50-25-6, ``faces`` 625-2000-1000-500-30). ``init``: ``torch`` (PyTorch's
  default) or ``xavier_uniform`` (Glorot & Bengio 2010, ``U(−a, a)`` with
  ``a = √(6/(fan_in + fan_out))``, biases zero); ``bias_init`` overrides the biases with a
  constant. Hinton & Salakhutdinov and Martens: ``activation="sigmoid"``, linear code. The thesis
  code (``conf/model/thesis_*.yaml``): ``relu`` everywhere including the code, Xavier-uniform,
  biases 0.01.
* ``cnn``: two ``Conv2d 3×3 → act → MaxPool 2`` stages, then ``Linear → act → Linear``.
* ``conv_autoencoder``: two stride-2 ``Conv2d`` down, two stride-2 ``ConvTranspose2d`` up (H, W
  divisible by 4); the output is the reconstruction flattened to ``(N, C·H·W)``.

Autoencoders return flattened outputs because the curvature's losses take ``(N, C)`` outputs and
targets: train them with MSE against ``X.flatten(1)``. ``build`` ignores ``num_outputs`` for them.
* ``resnet``: a small ResNet (stem conv, ``len(widths)`` stages of basic blocks, global average
  pooling, linear head). ``norm="none"`` by default: BatchNorm in training mode couples the samples
  of a batch (each output depends on the whole batch), which breaks the per-sample factorization
  every curvature block assumes; ``norm="group"`` (GroupNorm) keeps samples independent;
  ``norm="batch"`` is available for comparison only.

Curvature coverage (``tensorcurv.Curvature(model).coverage_table()``): every Linear / Conv2d
weight and bias and every ConvTranspose2d weight is a Kronecker block. Not covered by design, left
to the fallback: ConvTranspose2d biases (``conv_autoencoder``) and normalization-layer affine
parameters (``resnet`` with ``norm="group"``/``"batch"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

from torch import nn

from tensorcurv.core.options import Option

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "softplus": nn.Softplus,
}


class Norm(Option):
    """Normalization layers of the CNNs: ``none``, ``group`` or ``batch``."""

    NONE = "none"
    GROUP = "group"
    BATCH = "batch"


ModuleT = TypeVar("ModuleT", bound=nn.Module)
#: weight initializations of :func:`initialize` (``torch``: keep PyTorch's default)


class Init(Option):
    """Weight initialization: torch's default or ``xavier_uniform`` (zero biases)."""

    TORCH = "torch"
    XAVIER_UNIFORM = "xavier_uniform"


AUTOENCODER_PRESETS: dict[str, list[int]] = {
    "mnist": [1000, 500, 250, 30],
    "curves": [400, 200, 100, 50, 25, 6],
    "faces": [2000, 1000, 500, 30],
}


def _act(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def _image_shape(name: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"model {name!r} needs image inputs (C, H, W), got input_shape={tuple(input_shape)}")
    return tuple(int(s) for s in input_shape)  # type: ignore[return-value]


def mlp(
    input_shape, num_outputs, hidden_sizes: Sequence[int] = (64, 64), activation: str = "tanh", bias: bool = True
) -> nn.Sequential:
    d = math.prod(input_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden_sizes:
        layers += [nn.Linear(d, int(h), bias=bias), _act(activation)]
        d = int(h)
    layers.append(nn.Linear(d, num_outputs, bias=bias))
    return nn.Sequential(*layers)


def initialize(model: ModuleT, init: str = "torch", bias_init: float | None = None) -> ModuleT:
    """Re-initialize every ``Linear`` / ``Conv2d`` of ``model`` in place (see :class:`Init`); returns it.

    ``xavier_uniform``: weights ``U(−a, a)``, ``a = √(6/(fan_in + fan_out))`` (gain 1), biases 0.
    ``bias_init``: then every bias is this constant (the thesis code uses 0.01). Draws from torch's
    global generator, like the default initialization.
    """
    if init not in Init.values():
        raise ValueError(f"unknown init {init!r}; valid: {Init.values()}")
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if init == "xavier_uniform":
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        if bias_init is not None and m.bias is not None:
            nn.init.constant_(m.bias, float(bias_init))
    return model


def autoencoder(
    input_shape,
    num_outputs=None,
    hidden_sizes: Sequence[int] | None = None,
    preset: str | None = None,
    activation: str = "sigmoid",
    code_activation: str | None = None,
    init: str = "torch",
    bias_init: float | None = None,
) -> nn.Sequential:
    d = math.prod(input_shape)
    if preset is not None:
        if preset not in AUTOENCODER_PRESETS:
            raise ValueError(f"unknown autoencoder preset {preset!r}; valid: {sorted(AUTOENCODER_PRESETS)}")
        hidden_sizes = AUTOENCODER_PRESETS[preset]
    if hidden_sizes is None:
        hidden_sizes = [2 * d, max(2, d // 2)]
    if init not in Init.values():
        raise ValueError(f"unknown init {init!r}; valid: {Init.values()}")
    widths = [d, *[int(h) for h in hidden_sizes]]
    layers: list[nn.Module] = [nn.Flatten()]
    enc = list(zip(widths[:-1], widths[1:]))
    for i, (a, b) in enumerate(enc):
        layers.append(nn.Linear(a, b))
        if i < len(enc) - 1:
            layers.append(_act(activation))
        elif code_activation is not None:
            layers.append(_act(code_activation))
    for a, b in reversed(enc):
        layers += [nn.Linear(b, a), _act(activation)]
    layers.pop()  # linear output: logits (BCE) or the reconstruction (MSE)
    return initialize(nn.Sequential(*layers), init, bias_init)


class CNN(nn.Module):
    def __init__(
        self, input_shape, num_outputs, channels: Sequence[int] = (16, 32), hidden: int = 64, activation: str = "relu"
    ) -> None:
        super().__init__()
        c, h, w = _image_shape("cnn", input_shape)
        feats: list[nn.Module] = []
        for ch in channels:
            feats += [nn.Conv2d(c, int(ch), 3, padding=1), _act(activation), nn.MaxPool2d(2)]
            c, h, w = int(ch), h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"cnn: input {tuple(input_shape)} is too small for {len(channels)} pooling stages")
        self.features = nn.Sequential(*feats)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, hidden), _act(activation), nn.Linear(hidden, num_outputs)
        )

    def forward(self, x):
        return self.head(self.features(x))


class ConvAutoencoder(nn.Module):
    def __init__(
        self, input_shape, num_outputs=None, channels: Sequence[int] = (16, 32), activation: str = "relu"
    ) -> None:
        super().__init__()
        c, h, w = _image_shape("conv_autoencoder", input_shape)
        if h % 4 or w % 4:
            raise ValueError(f"conv_autoencoder needs H and W divisible by 4, got {(h, w)}")
        c1, c2 = (int(x) for x in channels)
        self.encoder = nn.Sequential(
            nn.Conv2d(c, c1, 3, stride=2, padding=1),
            _act(activation),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            _act(activation),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(c2, c1, 3, stride=2, padding=1, output_padding=1),
            _act(activation),
            nn.ConvTranspose2d(c1, c, 3, stride=2, padding=1, output_padding=1),
        )

    def forward(self, x):
        return self.decoder(self.encoder(x)).flatten(1)


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "group":
        return nn.GroupNorm(math.gcd(groups, channels), channels)
    return nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    """``act(x' + conv(act(conv(x))))`` with a 1×1 projection ``x'`` when the shape changes."""

    def __init__(self, cin, cout, stride, norm, groups, activation) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = _norm(norm, cout, groups)
        self.act1 = _act(activation)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=bias)
        self.norm2 = _norm(norm, cout, groups)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=bias) if stride != 1 or cin != cout else nn.Identity()
        )
        self.act2 = _act(activation)

    def forward(self, x):
        out = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(
        self,
        input_shape,
        num_outputs,
        widths: Sequence[int] = (16, 32),
        blocks_per_stage: int = 1,
        norm: str = "none",
        groups: int = 8,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        c, _, _ = _image_shape("resnet", input_shape)
        if norm not in Norm.values():
            raise ValueError(f"unknown norm {norm!r}; valid: {Norm.values()}")
        w0 = int(widths[0])
        self.stem = nn.Sequential(
            nn.Conv2d(c, w0, 3, padding=1, bias=norm == "none"), _norm(norm, w0, groups), _act(activation)
        )
        blocks, cin = [], w0
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(cin, int(w), stride, norm, groups, activation))
                cin = int(w)
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_outputs)

    def forward(self, x):
        return self.fc(self.pool(self.blocks(self.stem(x))))


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "autoencoder": autoencoder,
    "cnn": CNN,
    "conv_autoencoder": ConvAutoencoder,
    "resnet": ResNet,
}
#: models whose output reconstructs the input (trained with MSE against the input)
AUTOENCODERS = ("autoencoder", "conv_autoencoder")


def names() -> list[str]:
    return list(_BUILDERS)


def builder(name: str):
    """The function or class that builds model ``name``; its keyword parameters are the config keys."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(names())}")
    return _BUILDERS[name]


def build(name: str, input_shape: Sequence[int], num_outputs: int | None = None, **kw) -> nn.Module:
    """Build model ``name`` for inputs of shape ``input_shape`` (without the batch dimension).

    ``num_outputs`` is the number of classes for classifiers; autoencoders ignore it (None).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(names())}")
    if name not in AUTOENCODERS and (num_outputs is None or num_outputs < 1):
        raise ValueError(f"model {name!r} is a classifier and needs num_outputs >= 1, got {num_outputs!r}")
    return _BUILDERS[name](tuple(input_shape), num_outputs, **kw)
