"""The perceptual hash sees copies of one film through resizing, re-encoding and
contrast changes, tells different films apart, and groups near-duplicates transitively."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from trainer.near_duplicates import (
    DEFAULT_MAX_DISTANCE,
    HASH_BITS,
    hamming,
    near_duplicate_groups,
    perceptual_hash,
)


def _film(seed: int, size: int = 256) -> np.ndarray:
    """A smooth synthetic 'film': blurred noise plus a bright blob, in 0..255 uint8."""
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=(size, size)), sigma=size / 16)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.3, 0.7, size=2)
    field = field / field.std() + 2.0 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
    field = (field - field.min()) / (field.max() - field.min())
    return (field * 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, quality: int = 60) -> Image.Image:
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("L")


def test_hash_is_a_256_bit_int_and_deterministic() -> None:
    film = _film(1)
    h = perceptual_hash(film)
    assert isinstance(h, int)
    assert 0 <= h < 1 << HASH_BITS
    assert perceptual_hash(film) == h
    assert perceptual_hash(Image.fromarray(film)) == h


def test_copies_of_one_film_stay_within_the_default_distance() -> None:
    film = _film(2)
    h = perceptual_hash(film)
    resized = np.asarray(Image.fromarray(film).resize((97, 131)))
    sixteen_bit = film.astype(np.uint16) * 257 + 100  # a 16-bit, offset rendering
    stretched = np.clip(film.astype(np.float64) * 0.6 + 40, 0, 255).astype(np.uint8)
    cropped = film[3:-3, 2:-2]
    rgb = np.stack([film] * 3, axis=-1)
    for variant in (resized, sixteen_bit, stretched, cropped, rgb, _jpeg(film)):
        assert hamming(h, perceptual_hash(variant)) <= DEFAULT_MAX_DISTANCE


def test_different_films_are_far_apart() -> None:
    hashes = [perceptual_hash(_film(seed)) for seed in range(10, 20)]
    distances = [hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert min(distances) > DEFAULT_MAX_DISTANCE


def test_inverted_film_is_not_a_duplicate() -> None:
    film = _film(3)
    assert hamming(perceptual_hash(film), perceptual_hash(255 - film)) > HASH_BITS // 2


def test_constant_image_hashes_without_error() -> None:
    assert perceptual_hash(np.full((40, 40), 7, dtype=np.uint8)) == 0


@pytest.mark.parametrize(
    "bad",
    [np.zeros((0, 0)), np.zeros((2, 3, 5, 1)), np.array([[1.0, np.nan], [0.0, 1.0]])],
)
def test_unusable_arrays_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        perceptual_hash(bad)


def test_hamming_counts_differing_bits() -> None:
    assert hamming(0, 0) == 0
    assert hamming(0b1011, 0b0001) == 2
    assert hamming(0, (1 << 64) - 1) == 64
    assert hamming(0, (1 << HASH_BITS) - 1) == HASH_BITS
    with pytest.raises(ValueError):
        hamming(-1, 0)


def test_groups_are_connected_components_without_singletons() -> None:
    hashes = {
        "a": 0b0000_0000,
        "b": 0b0000_0011,  # 2 from a
        "c": 0b0000_1111,  # 2 from b, 4 from a
        "d": (1 << 63) | (1 << 62) | 0xFF00,  # far from all
        "e": (1 << 63) | (1 << 62) | 0xFF01,  # 1 from d
        "f": 0xFFFF_FFFF_0000_0000,  # alone
        "g": (1 << 255) | 0xFFFF_FFFF_0000_0000,  # 1 from f, in the top bit
    }
    groups = near_duplicate_groups(hashes, max_distance=2)
    assert groups == [{"a", "b", "c"}, {"d", "e"}, {"f", "g"}]
    assert near_duplicate_groups(hashes, max_distance=0) == []
    assert near_duplicate_groups({}) == []
    assert near_duplicate_groups({"only": 5}) == []


def test_groups_refuse_bad_input() -> None:
    with pytest.raises(ValueError):
        near_duplicate_groups({"a": 1}, max_distance=-1)
    with pytest.raises(ValueError):
        near_duplicate_groups({"a": 1 << HASH_BITS, "b": 0})


def test_groups_find_a_recoded_copy_among_films() -> None:
    films = {f"film{seed}": _film(seed) for seed in range(30, 36)}
    hashes = {name: perceptual_hash(arr) for name, arr in films.items()}
    hashes["copy_of_film32"] = perceptual_hash(_jpeg(films["film32"], quality=40))
    assert near_duplicate_groups(hashes) == [{"copy_of_film32", "film32"}]
