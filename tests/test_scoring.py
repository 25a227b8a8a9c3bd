"""The Scorer: same input as training, each image scored on its own by the model file's
precision policy, probabilities, retryable OOM."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from db.errors import TransientError
from dicom_node.pixels import load_image_file
from tests.support.dicom_factory import make_cxr, write
from tests.support.model_synthetic import synthetic_image, tiny_meta, train_tiny_model
from trainer.architectures import build_model
from trainer.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from trainer.scoring import DECODE_CHUNK, Scorer, autocast_dtype, gpu_memory_is_transient
from trainer.transforms import to_tensor_batch


@pytest.fixture(scope="module")
def trained() -> LoadedModel:
    return train_tiny_model()


def test_trained_model_separates_classes(trained: LoadedModel) -> None:
    rng = np.random.default_rng(21)
    scorer = Scorer(trained, "cpu")
    pos = scorer.predict([synthetic_image(True, rng, 128) for _ in range(4)])
    neg = scorer.predict([synthetic_image(False, rng, 96) for _ in range(4)])
    assert pos.shape == (4,) and pos.dtype == np.float64
    assert pos.min() > 0.8 and neg.max() < 0.2


def test_images_and_prepared_batches_agree_with_plain_forward(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = build_model("tiny_cnn", pretrained=False).eval()
    digest = save_checkpoint(tmp_path / "m.pt", model, tiny_meta())
    scorer = Scorer(load_checkpoint(tmp_path / "m.pt", digest), device="cpu")
    assert scorer.memory_format == torch.channels_last and scorer.amp_dtype is None
    rng = np.random.default_rng(0)
    images = [rng.random((50, 70), dtype=np.float32), rng.random((64, 64), dtype=np.float32)]
    batch = to_tensor_batch(images, tiny_meta())
    with torch.no_grad():
        expected = torch.sigmoid(model(batch).reshape(-1)).double().numpy()
    np.testing.assert_allclose(scorer.predict(images), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scorer.predict(batch), expected, rtol=1e-5, atol=1e-6)
    assert scorer.predict([]).shape == (0,)


def test_predict_files_decodes_dicom_in_a_pool(tmp_path: Path, trained: LoadedModel) -> None:
    paths = [write(make_cxr(seed=i, bits_stored=12), tmp_path / f"{i}.dcm") for i in range(3)]
    scorer = Scorer(trained, "cpu")
    with ThreadPoolExecutor(2) as pool:
        pooled = scorer.predict_files(paths, pool)
    np.testing.assert_allclose(pooled, scorer.predict_files(paths), rtol=1e-6)
    assert pooled.shape == (3,) and np.all((pooled >= 0) & (pooled <= 1))


def test_gpu_out_of_memory_is_transient() -> None:
    with pytest.raises(TransientError) as err, gpu_memory_is_transient():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert "out of memory" in str(err.value)
    with pytest.raises(ValueError), gpu_memory_is_transient():
        raise ValueError("other errors pass through unchanged")


def test_cpu_runs_full_precision(trained: LoadedModel) -> None:
    for precision in ("float32", "bfloat16", "float16"):
        assert autocast_dtype(torch.device("cpu"), precision) is None
    assert autocast_dtype(torch.device("cuda"), "float32") is None
    assert autocast_dtype(torch.device("cuda"), "float16") == torch.float16
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype(torch.device("cpu"), "int8")
    half = LoadedModel(trained.model, dataclasses.replace(trained.meta, precision="float16"), "")
    assert Scorer(half, "cpu").amp_dtype is None


def test_a_score_does_not_depend_on_the_images_beside_it(tmp_path: Path,
                                                        trained: LoadedModel) -> None:
    """Each image is scored on its own: alone, in a study, from a prepared batch or from
    files (across decode chunks), the number is the same to the bit."""
    rng = np.random.default_rng(8)
    images = [synthetic_image(bool(i % 2), rng, 64) for i in range(DECODE_CHUNK + 2)]
    scorer = Scorer(trained, "cpu")
    alone = np.array([scorer.predict([img])[0] for img in images])
    np.testing.assert_array_equal(scorer.predict(images), alone)
    np.testing.assert_array_equal(scorer.predict(scorer.prepare(images)), alone)
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.round(img * 255).astype(np.uint8)).save(paths[-1])
    decoded = [load_image_file(p) for p in paths]
    expected = np.array([scorer.predict([img])[0] for img in decoded])
    np.testing.assert_array_equal(scorer.predict_files(paths), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_follows_the_precision_policy_and_matches_cpu(trained: LoadedModel) -> None:
    rng = np.random.default_rng(5)
    images = [synthetic_image(bool(i % 2), rng, 128) for i in range(6)]
    cpu = Scorer(trained, "cpu").predict(images)
    full = Scorer(trained, "cuda")
    assert trained.meta.precision == "float32" and full.amp_dtype is None
    np.testing.assert_allclose(full.predict(images), cpu, atol=1e-4)
    half = LoadedModel(trained.model, dataclasses.replace(trained.meta, precision="bfloat16"),
                       "")
    gpu_scorer = Scorer(half, "cuda")
    assert gpu_scorer.amp_dtype in (torch.bfloat16, None)  # None: no bfloat16 on this GPU
    np.testing.assert_allclose(gpu_scorer.predict(images), cpu, atol=0.03)
    Scorer(trained, "cpu")  # hand the shared model back to the CPU for other tests
