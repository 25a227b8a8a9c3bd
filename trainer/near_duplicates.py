"""Near-duplicate films: a perceptual hash and groups of images within a Hamming radius.

The same film is often published twice: resized, re-encoded as JPEG, cropped by a few
pixels, or contrast-stretched, in two collections or under two patient ids.  A byte hash
cannot see that.  The perceptual hash here is the classic 64-bit DCT hash (pHash): the
image is reduced to grayscale, resized to 32x32, transformed with a 2-D DCT, and the 8x8
lowest frequencies (the DC term included) are compared with their median.  Two copies of
one film differ in a handful of bits; two different chest films differ in about half.

``near_duplicate_groups`` links every pair of images whose hashes are within
``max_distance`` bits and returns the connected components of size two or more, so that a
caller can keep one image of each group and a film never sits on both sides of a split.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy.fft import dctn

HASH_SIZE = 16
HASH_BITS = HASH_SIZE * HASH_SIZE
_HIGHFREQ_FACTOR = 4
DEFAULT_MAX_DISTANCE = 56


def _grayscale(image: NDArray[np.generic] | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        if image.mode in ("L", "F", "I", "I;16"):
            arr = np.asarray(image, dtype=np.float64)
        else:
            arr = np.asarray(image.convert("L"), dtype=np.float64)
    else:
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[2] in (3, 4):
            rgb = arr[..., :3].astype(np.float64)
            arr = rgb @ np.array([0.299, 0.587, 0.114])
        elif arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2:
            raise ValueError(f"image must be 2-D or HxWx3/4 colour, got shape {arr.shape}")
        arr = arr.astype(np.float64)
    if arr.size == 0:
        raise ValueError("image is empty")
    if not np.isfinite(arr).all():
        raise ValueError("image holds non-finite values")
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(scaled.astype(np.float32))


def perceptual_hash(image: NDArray[np.generic] | Image.Image) -> int:
    """The 256-bit DCT perceptual hash of an image, as an unsigned int.

    Accepts a 2-D array of any numeric dtype (MONOCHROME pixel data, 8 or 16 bits), an
    HxWx3/4 colour array, or a PIL image of any mode.  The intensity range is normalised
    first, so a window/level stretch of the same film gives the same hash.
    """
    side = HASH_SIZE * _HIGHFREQ_FACTOR
    small = _grayscale(image).resize((side, side), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.float64)
    low = dctn(pixels, type=2, norm="ortho")[:HASH_SIZE, :HASH_SIZE]
    bits = (low > np.median(low)).ravel()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def hamming(a: int, b: int) -> int:
    """The number of bits in which two hashes differ."""
    if a < 0 or b < 0:
        raise ValueError("hashes are unsigned")
    return (a ^ b).bit_count()


def near_duplicate_groups(
    hashes: Mapping[str, int], max_distance: int = DEFAULT_MAX_DISTANCE
) -> list[set[str]]:
    """Groups of keys whose hashes are linked by pairs at most ``max_distance`` bits apart.

    The groups are the connected components (so A~B and B~C put A, B and C together even
    when A and C are further apart); singletons are left out.  Groups come sorted by
    their smallest key, for a reproducible order.
    """
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    keys = sorted(hashes)
    n = len(keys)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key in keys:
        value = hashes[key]
        if not 0 <= value < 1 << HASH_BITS:
            raise ValueError(f"hash of {key!r} is not a {HASH_BITS}-bit unsigned value")
    if n > 1:
        nbytes = HASH_BITS // 8
        packed = np.frombuffer(
            b"".join(hashes[k].to_bytes(nbytes, "big") for k in keys), dtype=np.uint8
        ).reshape(n, nbytes)
        for i in range(n - 1):
            xor = np.bitwise_xor(packed[i + 1 :], packed[i])
            distances = np.unpackbits(xor, axis=1).sum(axis=1)
            for offset in np.flatnonzero(distances <= max_distance):
                j = i + 1 + int(offset)
                ri, rj = find(i), find(j)
                if ri != rj:
                    parent[max(ri, rj)] = min(ri, rj)
    components: dict[int, set[str]] = {}
    for i, key in enumerate(keys):
        components.setdefault(find(i), set()).add(key)
    groups = [group for group in components.values() if len(group) > 1]
    return sorted(groups, key=min)
