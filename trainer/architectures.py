"""The seed papers' backbones, with a single-logit head (COVID-19 vs not, the two-class
models of earlier versions) or a softmax head over several classes (normal / other
pneumonia / COVID-19, the default).

ImageNet weights come through torchvision's weights API, which reads a file in the torch
hub cache or downloads it.  Production hosts often have no internet, so a missing file is
an operator's error that names the exact file to pre-place (:class:`WeightsUnavailableError`).
EfficientNet-Lite0's weights ship inside a Python package and always load offline.

Besides :func:`build_model`, the trainer and the heatmaps need to know, per backbone, the
input normalisation, the last convolutional block (Grad-CAM) and the ordered stages that
``freeze_until`` can freeze for staged fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from trainer.efficientnet_lite import EfficientNetLite, efficientnet_lite0

BACKBONES: tuple[str, ...] = (
    "resnet18",
    "resnet50",
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "squeezenet1_1",
    "vgg19",
    "efficientnet_lite0",
)

# Not a seed-paper model: a few convolutions for tests and smoke runs, never for patients.
TEST_BACKBONES: tuple[str, ...] = ("tiny_cnn",)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


class UnknownBackboneError(ValueError):
    """The configuration names a backbone we do not build (operator's fault)."""


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are not in the torch hub cache and cannot be downloaded here.

    The operator pre-places the named file (from a machine with internet) or trains with
    ``pretrained=False``.
    """


class TinyCNN(nn.Module):
    """Four small convolutions and a linear logit: trains in seconds on a CPU."""

    def __init__(self, width: int = 16, outputs: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for out_ch in (width, width * 2, width * 2, width * 4):
            layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch),
                       nn.ReLU(inplace=True)]
            if out_ch != width * 4:
                layers.append(nn.MaxPool2d(2))
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))  # type: ignore[no-any-return]


def _check_name(name: str) -> None:
    if name not in BACKBONES + TEST_BACKBONES:
        choices = ", ".join(BACKBONES + TEST_BACKBONES)
        raise UnknownBackboneError(f"unknown backbone {name!r}; choose one of {choices}")


def normalisation(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) per RGB channel that the backbone's pretrained weights expect."""
    _check_name(name)
    if name in ("efficientnet_lite0", "tiny_cnn"):
        return HALF, HALF
    return IMAGENET_MEAN, IMAGENET_STD


def weights_file(name: str) -> Path:
    """Where torchvision looks for ``name``'s ImageNet weights (the file to pre-place)."""
    _check_name(name)
    if name == "efficientnet_lite0":
        from trainer.efficientnet_lite import shipped_weights_path

        return shipped_weights_path()
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    filename = str(weights.url).rsplit("/", 1)[-1]
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _torchvision_model(name: str, pretrained: bool) -> nn.Module:
    if not pretrained:
        model: nn.Module = torchvision.models.get_model(name, weights=None)
        return model
    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1
    path = weights_file(name)
    if not path.is_file():
        raise WeightsUnavailableError(
            f"ImageNet weights for {name} are missing: place {weights.url} at {path} "
            f"(torch hub cache), or build with pretrained=False"
        )
    pretrained_model: nn.Module = torchvision.models.get_model(name, weights=weights)
    return pretrained_model


def _replace_head(model: nn.Module, name: str, outputs: int = 1) -> None:
    """Swap the ImageNet classifier for ``outputs`` logits."""
    m: Any = model
    n = outputs
    if name.startswith("resnet"):
        m.fc = nn.Linear(m.fc.in_features, n)
    elif name == "densenet121":
        m.classifier = nn.Linear(m.classifier.in_features, n)
    elif name == "mobilenet_v2" or name == "vgg19":
        last = len(m.classifier) - 1
        m.classifier[last] = nn.Linear(m.classifier[last].in_features, n)
    elif name == "mobilenet_v3_large":
        m.classifier[3] = nn.Linear(m.classifier[3].in_features, n)
    elif name == "squeezenet1_1":
        # The ImageNet head ends in ReLU, which would force logits >= 0 (p >= 0.5).
        m.classifier = nn.Sequential(
            nn.Dropout(p=0.5), nn.Conv2d(512, n, kernel_size=1), nn.AdaptiveAvgPool2d(1)
        )
    elif name == "efficientnet_lite0":
        m._fc = nn.Linear(m._fc.in_features, n)
    else:  # pragma: no cover - guarded by _check_name
        raise UnknownBackboneError(name)


def build_model(name: str, pretrained: bool = True, outputs: int = 1) -> nn.Module:
    """Backbone ``name`` with ``outputs`` logits (1: sigmoid, more: softmax); never downloads.

    ``pretrained=False`` gives random initialisation (used when rebuilding a checkpoint,
    whose state dict replaces every weight anyway).
    """
    _check_name(name)
    model: nn.Module
    if name == "tiny_cnn":
        return TinyCNN(outputs=outputs)
    if name == "efficientnet_lite0":
        model = efficientnet_lite0(pretrained=pretrained)
    else:
        model = _torchvision_model(name, pretrained)
    _replace_head(model, name, outputs)
    return model


def stages(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """The backbone's blocks in input-to-output order, the single-logit head last."""
    _check_name(name)
    m: Any = model
    if name.startswith("resnet"):
        stem = nn.ModuleList([m.conv1, m.bn1])
        return [("stem", stem), ("layer1", m.layer1), ("layer2", m.layer2),
                ("layer3", m.layer3), ("layer4", m.layer4), ("head", m.fc)]
    if name == "efficientnet_lite0":
        lite: EfficientNetLite = m
        out: list[tuple[str, nn.Module]] = [("stem", nn.ModuleList([lite._conv_stem, lite._bn0]))]
        out += [(f"block{i}", b) for i, b in enumerate(lite._blocks)]
        out += [("conv_head", nn.ModuleList([lite._conv_head, lite._bn1])), ("head", lite._fc)]
        return out
    head = m.classifier
    return [(f"features{i}", f) for i, f in enumerate(m.features)] + [("head", head)]


def stage_names(model: nn.Module, name: str) -> list[str]:
    return [n for n, _ in stages(model, name)]


def freeze_until(model: nn.Module, name: str, cutoff: int | str) -> list[str]:
    """Freeze every stage before ``cutoff`` (an index into :func:`stages` or a stage name).

    ``cutoff=0`` trains everything; the head is never frozen.  Returns the frozen stage
    names.  Frozen BatchNorm layers are put in eval mode by :func:`train_mode`.
    """
    named = stages(model, name)
    names = [n for n, _ in named]
    if isinstance(cutoff, str):
        if cutoff not in names:
            raise ValueError(f"{name} has no stage {cutoff!r}; stages: {', '.join(names)}")
        index = names.index(cutoff)
    else:
        index = max(0, min(int(cutoff), len(named) - 1))
    for p in model.parameters():
        p.requires_grad_(True)
    for _, module in named[:index]:
        for p in module.parameters():
            p.requires_grad_(False)
    return names[:index]


def train_mode(model: nn.Module) -> None:
    """``model.train()``, but BatchNorm layers whose weights are all frozen stay in eval.

    Frozen stages then keep their ImageNet running statistics instead of drifting towards
    small fine-tuning batches.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()


def head_parameters(model: nn.Module, name: str) -> Iterator[nn.Parameter]:
    """Parameters of the single-logit head (for a higher learning rate)."""
    return stages(model, name)[-1][1].parameters()


_GRADCAM: dict[str, Callable[[Any], nn.Module]] = {
    "resnet18": lambda m: m.layer4,
    "resnet50": lambda m: m.layer4,
    "densenet121": lambda m: m.features,
    "mobilenet_v2": lambda m: m.features[-1],
    "mobilenet_v3_large": lambda m: m.features[-1],
    "squeezenet1_1": lambda m: m.features[-1],
    "vgg19": lambda m: m.features[-2],  # the last ReLU, before the final max-pool
    "efficientnet_lite0": lambda m: m._head_act,
    "tiny_cnn": lambda m: m.features,
}


def gradcam_layer(model: nn.Module, name: str) -> nn.Module:
    """The module whose output is the last convolutional feature map (Grad-CAM's target)."""
    _check_name(name)
    return _GRADCAM[name](model)


__all__ = [
    "BACKBONES",
    "TEST_BACKBONES",
    "TinyCNN",
    "UnknownBackboneError",
    "WeightsUnavailableError",
    "build_model",
    "freeze_until",
    "gradcam_layer",
    "head_parameters",
    "normalisation",
    "stage_names",
    "stages",
    "train_mode",
    "weights_file",
]
