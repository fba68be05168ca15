"""The networks, built by name."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import speedups
from .recipes import AIRBENCH94


class CifarNet(nn.Module):
    """What the training loop may ask of any network here, with the answers most give."""

    # Learning-rate multiplier (and weight-decay divisor) for batch-norm parameters.
    norm_lr_scale: float = 1.0
    # Test-time augmentation adds 1-pixel translations to the flips (three times the work).
    translate_tta: bool = False

    def init_from_data(self, images: torch.Tensor) -> None:
        """Data-dependent initialisation from normalised training images; most need none."""

    def input_layer(self) -> nn.Conv2d:
        """The convolution that sees the normalised images, without padding (see
        `weights_for_inputs`)."""
        raise NotImplementedError

    def begin_epoch(self, epoch: int) -> None:
        """Called as each training epoch (1-based) begins: a network may freeze parameters."""


class Net(CifarNet):
    """The PyTorch tutorial's CNN, layer for layer: 62 k parameters, 0.65 M multiply-adds."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = speedups.MaxPool2x2()
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def input_layer(self) -> nn.Conv2d:
        return self.conv1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The tutorial writes pool(relu(conv)); max-pooling and ReLU commute, and pooling
        # first leaves ReLU a quarter of the elements: a third off a CPU training step.
        x = F.relu(self.pool(self.conv1(x)))
        x = F.relu(self.pool(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class Airbench(CifarNet):
    """airbench94 (Keller Jordan, 2024, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU").

    A 2x2 patch-whitening convolution (fixed weights; its bias trains for the first epochs),
    then three blocks of conv-maxpool-batchnorm-GELU-conv-batchnorm-GELU (widths 64, 256,
    256), a global max-pool and a linear head whose logits are scaled by 1/9. 2.0 M
    parameters.
    """

    # The paper trains batch-norm shifts 64 times faster, with 64 times less decay.
    norm_lr_scale = AIRBENCH94.bias_scaler
    translate_tta = True
    # The paper trains the whitening bias for the first 3 epochs only. Frozen, it needs no
    # gradient, so backpropagation stops at the first block: a ninth off a CPU step.
    whiten_bias_epochs = AIRBENCH94.whiten_bias_epochs

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (64, 256, 256)) -> None:
        super().__init__()
        patch = 2
        self.whiten = nn.Conv2d(3, 2 * 3 * patch**2, patch)
        self.whiten.weight.requires_grad_(False)
        blocks, channels = [], self.whiten.out_channels
        for width in widths:
            blocks.append(_ConvBlock(channels, width))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, num_classes, bias=False)

    def input_layer(self) -> nn.Conv2d:
        return self.whiten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.gelu(self.whiten(x)))
        x = F.adaptive_max_pool2d(x, 1).flatten(1)
        return self.head(x) * AIRBENCH94.scaling_factor

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Whitening filters: the eigenvectors of the training images' 2x2 patch covariance,
        each scaled by its inverse standard deviation, with their negatives (so GELU keeps
        both signs)."""
        k = self.whiten.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # N, C, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * k * k)
        covariance = (patches.T.double() @ patches.double()) / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = eigenvectors.T / (eigenvalues + AIRBENCH94.whitening_eps).sqrt()[:, None]
        filters = filters.reshape(-1, images.shape[1], k, k).to(self.whiten.weight)
        self.whiten.weight.copy_(torch.cat([filters, -filters]))
        _bias(self.whiten).zero_()

    def begin_epoch(self, epoch: int) -> None:
        _bias(self.whiten).requires_grad_(epoch <= self.whiten_bias_epochs)


class _ConvBlock(nn.Sequential):
    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__(
            _identity_conv(channels_in, channels_out),
            nn.MaxPool2d(2),
            _batch_norm(channels_out),
            nn.GELU(),
            _identity_conv(channels_out, channels_out),
            _batch_norm(channels_out),
            nn.GELU(),
        )


def _identity_conv(channels_in: int, channels_out: int) -> nn.Conv2d:
    """A 3x3 convolution whose first `channels_in` filters start as the identity."""
    conv = nn.Conv2d(channels_in, channels_out, 3, padding="same", bias=False)
    nn.init.dirac_(conv.weight.data[:channels_in])
    return conv


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    # Running statistics follow the last few batches closely; the scale stays fixed at 1.
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=1 - AIRBENCH94.batchnorm_momentum)
    norm.weight.requires_grad_(False)
    return norm


_BUILDERS = {"tutorial": Net, "airbench": Airbench}


def build_model(name: str, num_classes: int = 10) -> CifarNet:
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_BUILDERS)}") from None
    return builder(num_classes=num_classes)


@torch.no_grad()
def weights_for_inputs(
    model: CifarNet, trained_on: tuple[Sequence[float], Sequence[float]],
    given: tuple[Sequence[float], Sequence[float]],
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The model's weights, on the CPU, for images normalised with `given` (mean, std per
    channel) when it was trained on `trained_on`.

    Normalisation is affine per channel, so the first convolution can take the difference:
    its filters are scaled per input channel and its bias absorbs the shift. This is exact
    because that convolution has no padding: every window it sees holds only image values.
    """
    layer = model.input_layer()
    if layer.padding not in ((0, 0), "valid"):
        raise ValueError(f"{type(model).__name__}'s input layer pads its input")
    (old_mean, old_std), (new_mean, new_std) = (
        (torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))
        for mean, std in (trained_on, given)
    )
    # x_trained = x_given * scale + shift, channel by channel.
    scale = (new_std / old_std).view(1, -1, 1, 1)
    shift = ((new_mean - old_mean) / old_std).view(1, -1, 1, 1)
    weight = layer.weight.double()
    name = next(n for n, module in model.named_modules() if module is layer)
    weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    weights[f"{name}.weight"] = (weight * scale).to(layer.weight.dtype).cpu()
    old_bias = _bias(layer)
    bias = old_bias.double() + (weight * shift).sum(dim=(1, 2, 3))
    weights[f"{name}.bias"] = bias.to(old_bias.dtype).cpu()
    return weights


def _bias(layer: nn.Conv2d) -> torch.Tensor:
    if layer.bias is None:
        raise ValueError(f"{layer} has no bias")
    return layer.bias


def model_names() -> tuple[str, ...]:
    return tuple(_BUILDERS)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def predict_log_proba(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Class log-probabilities averaged over test-time views of each image.

    Every model sees the image and its mirror image: a cheap, reliable point or two. Models
    with `translate_tta` also see both shifted by one pixel up-left and down-right, weighted
    half as much (airbench's level-2 augmentation). Every evaluation and the served model go
    through here, so they agree.
    """
    views = [(inputs, 1.0)]
    if getattr(model, "translate_tta", False):
        h, w = inputs.shape[-2:]
        padded = F.pad(inputs, (1, 1, 1, 1), mode="reflect")
        views += [(padded[..., :h, :w], 0.5), (padded[..., 2:, 2:], 0.5)]
    log_probas, log_weights = [], []
    for view, weight in views:
        # A view and its mirror image in one call: for one image, as served, that halves the
        # time (the call's overhead outweighs the tutorial Net's arithmetic).
        both = model(torch.cat([view, view.flip(-1)])).float().log_softmax(dim=-1)
        log_probas += both.chunk(2)
        log_weights += [math.log(weight)] * 2
    weights = torch.tensor(log_weights, device=inputs.device).log_softmax(dim=0)
    return (torch.stack(log_probas) + weights.view(-1, 1, 1)).logsumexp(dim=0)
