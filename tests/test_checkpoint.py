"""Checkpoints: atomic write, sha256, weights_only loading, meta round trip, named errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from trainer.architectures import build_model
from trainer.checkpoint import (
    CheckpointError,
    ChecksumMismatchError,
    ModelMeta,
    Preprocessing,
    Provenance,
    load_checkpoint,
    read_meta,
    save_checkpoint,
)


def meta(architecture: str = "tiny_cnn") -> ModelMeta:
    return ModelMeta(
        architecture=architecture,
        input_size=64,
        preprocessing=Preprocessing.for_backbone(architecture, contrast="clahe"),
        threshold=0.27,
        provenance=Provenance(data_digest="sha256:abc", parent_version="v1",
                              metrics={"auc": 0.91, "sensitivity": 0.98},
                              extra={"labels": 120, "sources": ["nih", "hannover"]}),
        version="v2",
    )


def test_round_trip_restores_weights_and_meta(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = build_model("tiny_cnn", pretrained=False).eval()
    path = tmp_path / "models" / "m.pt"
    digest = save_checkpoint(path, model, meta())
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temporary left behind
    loaded = load_checkpoint(path, expected_sha256=digest, device="cpu")
    assert loaded.sha256 == digest and loaded.meta == meta()
    assert not loaded.model.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert read_meta(path) == meta()


def test_file_is_plain_data_for_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    save_checkpoint(path, build_model("tiny_cnn", pretrained=False), meta())
    raw = torch.load(path, weights_only=True)
    assert raw["meta"]["architecture"] == "tiny_cnn"
    assert raw["meta"]["preprocessing"]["contrast"] == "clahe"
    assert raw["meta"]["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert raw["meta"]["provenance"]["metrics"]["auc"] == 0.91
    assert raw["meta"]["threshold"] == 0.27


def test_pretrained_backbone_rebuilds_without_download(tmp_path: Path) -> None:
    model = build_model("efficientnet_lite0", pretrained=True)
    path = tmp_path / "lite.pt"
    digest = save_checkpoint(path, model, meta("efficientnet_lite0"))
    loaded = load_checkpoint(path, digest)
    assert torch.equal(loaded.model.state_dict()["_conv_stem.weight"],
                       model.state_dict()["_conv_stem.weight"])


def test_sha256_mismatch_is_named(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    digest = save_checkpoint(path, build_model("tiny_cnn", pretrained=False), meta())
    with pytest.raises(ChecksumMismatchError):
        load_checkpoint(path, expected_sha256="0" * 64)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError):
        load_checkpoint(path, expected_sha256=digest)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError):
        load_checkpoint(other)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "absent.pt")


def test_overwrite_is_atomic_replacement(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    first = save_checkpoint(path, build_model("tiny_cnn", pretrained=False), meta())
    inode = os.stat(path).st_ino
    torch.manual_seed(9)
    second = save_checkpoint(path, build_model("tiny_cnn", pretrained=False), meta())
    assert first != second and os.stat(path).st_ino != inode
    assert load_checkpoint(path, second).sha256 == second


def test_invalid_contrast_is_rejected() -> None:
    with pytest.raises(ValueError):
        Preprocessing(contrast="sharpen")


def test_precision_policy_is_recorded_and_old_files_score_in_float32(tmp_path: Path) -> None:
    """The file records the CUDA compute dtype its scores use; a file written before the
    policy existed has none and loads as float32."""
    import dataclasses

    model = build_model("tiny_cnn", pretrained=False)
    half = dataclasses.replace(meta(), precision="bfloat16")
    save_checkpoint(tmp_path / "b.pt", model, half)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["meta"]["precision"] == "bfloat16"
    assert read_meta(tmp_path / "b.pt").precision == "bfloat16"
    assert meta().precision == "float32"
    old = meta().to_dict()
    del old["precision"]
    assert ModelMeta.from_dict(old).precision == "float32"
    with pytest.raises(ValueError, match="precision"):
        dataclasses.replace(meta(), precision="int8")
