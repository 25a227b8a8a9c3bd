"""Backbones: one logit, Grad-CAM layer, freezing, offline weights, and EfficientNet-Lite0's
real ImageNet weights loading strictly and classifying natural images sensibly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.architectures import (
    BACKBONES,
    UnknownBackboneError,
    WeightsUnavailableError,
    build_model,
    freeze_until,
    gradcam_layer,
    normalisation,
    stage_names,
    train_mode,
    weights_file,
)
from trainer.efficientnet_lite import EfficientNetLite, efficientnet_lite0, shipped_weights_path

LIGHT = ("resnet18", "mobilenet_v2", "mobilenet_v3_large", "squeezenet1_1", "efficientnet_lite0",
         "tiny_cnn")


@pytest.mark.parametrize("name", LIGHT)
def test_single_logit_and_gradcam_layer(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, pretrained=False).eval()
    seen: list[torch.Tensor] = []
    handle = gradcam_layer(model, name).register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    handle.remove()
    assert out.shape == (2, 1)
    assert seen and seen[0].dim() == 4 and seen[0].shape[-1] >= 1  # a spatial feature map


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "densenet121", "vgg19"])
def test_heavy_backbones_build_offline(name: str) -> None:
    model = build_model(name, pretrained=False).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1)
    assert isinstance(gradcam_layer(model, name), torch.nn.Module)


def test_squeezenet_logits_can_be_negative() -> None:
    """The ImageNet head ends in ReLU; ours must not, or every probability is >= 0.5."""
    model = build_model("squeezenet1_1", pretrained=False)
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.classifier)


def test_missing_torchvision_weights_name_the_file(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert weights_file("resnet18") == expected
    with pytest.raises(WeightsUnavailableError) as err:
        build_model("resnet18", pretrained=True)
    assert str(expected) in str(err.value)
    assert "download.pytorch.org/models/resnet18-f37072fd.pth" in str(err.value)


def test_pre_placed_torchvision_weights_are_used(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(7)
    reference = build_model("squeezenet1_1", pretrained=False)
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("classifier")}
    state["classifier.1.weight"] = torch.zeros(1000, 512, 1, 1)
    state["classifier.1.bias"] = torch.zeros(1000)
    path = weights_file("squeezenet1_1")
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    model = build_model("squeezenet1_1", pretrained=True)
    for key, value in model.state_dict().items():
        if key.startswith("features"):
            assert torch.equal(value, reference.state_dict()[key])


def test_unknown_backbone() -> None:
    with pytest.raises(UnknownBackboneError):
        build_model("alexnet")
    with pytest.raises(UnknownBackboneError):
        normalisation("alexnet")


def test_normalisation() -> None:
    assert normalisation("efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)
    mean, std = normalisation("resnet18")
    assert mean == (0.485, 0.456, 0.406) and std == (0.229, 0.224, 0.225)
    assert set(BACKBONES) >= {"resnet18", "resnet50", "densenet121", "mobilenet_v2",
                              "mobilenet_v3_large", "squeezenet1_1", "vgg19",
                              "efficientnet_lite0"}


def test_freeze_until_and_train_mode() -> None:
    model = build_model("resnet18", pretrained=False)
    names = stage_names(model, "resnet18")
    assert names == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    frozen = freeze_until(model, "resnet18", "layer3")
    assert frozen == ["stem", "layer1", "layer2"]
    assert not any(p.requires_grad for p in model.layer2.parameters())
    assert all(p.requires_grad for p in model.layer3.parameters())
    assert all(p.requires_grad for p in model.fc.parameters())
    train_mode(model)
    assert not model.layer1[0].bn1.training and model.layer3[0].bn1.training
    assert freeze_until(model, "resnet18", 0) == []
    assert all(p.requires_grad for p in model.parameters())
    # The head is never frozen, whatever the cutoff.
    freeze_until(model, "resnet18", 99)
    assert all(p.requires_grad for p in model.fc.parameters())
    lite = build_model("efficientnet_lite0", pretrained=False)
    assert freeze_until(lite, "efficientnet_lite0", "block5")[-1] == "block4"


def test_efficientnet_lite0_weights_load_strictly() -> None:
    state = torch.load(shipped_weights_path(), map_location="cpu", weights_only=True)
    model = EfficientNetLite(num_classes=1000)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(model.state_dict()) == set(state)
    # The single-logit model keeps every pretrained feature weight.
    single = build_model("efficientnet_lite0", pretrained=True)
    assert torch.equal(single.state_dict()["_blocks.15._project_conv.weight"],
                       state["_blocks.15._project_conv.weight"])
    assert single._fc.out_features == 1


def _natural_image(name: str) -> torch.Tensor:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    img = sklearn_datasets.load_sample_image(name).astype(np.float32) / 255.0
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=224, mode="bilinear", antialias=True, align_corners=False)
    return (x - 0.5) / 0.5


def test_efficientnet_lite0_classifies_natural_images() -> None:
    """Scikit-learn's sample photos: a Chinese temple by a lake, and a daisy-like flower."""
    pretrained = efficientnet_lite0(pretrained=True).eval()
    torch.manual_seed(0)
    random = efficientnet_lite0(pretrained=False).eval()
    with torch.no_grad():
        temple = pretrained(_natural_image("china.jpg")).softmax(1)[0]
        flower = pretrained(_natural_image("flower.jpg")).softmax(1)[0]
        noise = random(_natural_image("china.jpg")).softmax(1)[0]
    assert float(temple.sum()) == pytest.approx(1.0, abs=1e-4)
    # ImageNet classes: 442 bell cote, 449 boathouse, 483 castle, 698 palace, 832 stupa,
    # 975 lakeside; 985 daisy.
    assert set(temple.topk(5).indices.tolist()) & {442, 449, 483, 698, 832, 975}
    assert 985 in flower.topk(5).indices.tolist()
    assert float(temple.max()) > 5 * float(noise.max())
