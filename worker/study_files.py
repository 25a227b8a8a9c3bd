"""The spooled files of one analysis, each parsed once.

:func:`read_instances` parses every file of the study once.  Values larger than
:data:`DEFER_BYTES` (in practice the Pixel Data alone) stay on disk, so an image that the
selection rules pass over never brings its pixels into memory.  :func:`select_images`
applies the rules to those datasets, and :func:`load_pixels` decodes each selected image
from the same dataset: pydicom reads the deferred value at the offset the parse recorded,
without parsing the file again.  The pixel data and whatever follows it are then dropped,
so each image's ``header``, which the SR and SC builders take as their source, holds
exactly what ``dcmread(stop_before_pixels=True)`` would have read.
"""

from __future__ import annotations

import logging
import os
import time

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from db.errors import BadInputError, TransientError
from db.settings import Settings
from db.uids import is_valid_uid
from dicom_node.pixels import decode_pixels
from dicom_node.selection import select_instances
from worker.records import ImageResult, InstanceRef

log = logging.getLogger(__name__)

#: Values larger than this stay on disk until used (pydicom's ``defer_size``).
DEFER_BYTES = 256 * 1024
#: Float Pixel Data, Double Float Pixel Data, Pixel Data: ``stop_before_pixels`` stops at
#: the first of them present.
PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)

#: What pydicom and the pixel pipeline raise for damaged or unusual data beyond their own
#: error types (a Modality LUT with 12-bit entries gives a TypeError, for instance): the
#: data's fault, recorded for that image, never "internal error".
DECODE_ERRORS: tuple[type[Exception], ...] = (
    ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
    NotImplementedError, ZeroDivisionError, EOFError, MemoryError)
_HEADER_ERRORS: tuple[type[Exception], ...] = (InvalidDicomError, OSError, *DECODE_ERRORS)
_PIXEL_ERRORS: tuple[type[Exception], ...] = (BadInputError, *DECODE_ERRORS)


def _missing(ref: InstanceRef) -> TransientError:
    # The spool is ours: a missing file is our infrastructure's trouble.
    return TransientError(f"spooled file missing for {ref.sop_instance_uid}")


def read_instances(refs: tuple[InstanceRef, ...]) -> list[Dataset | None]:
    """Each spooled file parsed once, its large values left on disk; None where a file is
    unreadable."""
    datasets: list[Dataset | None] = []
    for ref in refs:
        try:
            datasets.append(pydicom.dcmread(ref.path, defer_size=DEFER_BYTES))
        except FileNotFoundError as exc:
            raise _missing(ref) from exc
        except _HEADER_ERRORS as exc:
            log.warning("unreadable instance sop_uid=%s error=%s", ref.sop_instance_uid, exc)
            datasets.append(None)
    return datasets


def select_images(refs: tuple[InstanceRef, ...], datasets: list[Dataset | None],
                  settings: Settings) -> list[ImageResult]:
    """Apply ``settings.selection_rules``: which instances are scored, and why not."""
    results = [ImageResult(ref, scored=False, header=ds)
               for ref, ds in zip(refs, datasets, strict=True)]
    readable = [i for i, ds in enumerate(datasets) if ds is not None]
    for i, ds in enumerate(datasets):
        if ds is None:
            results[i].skip_reason = "bad input: not a readable DICOM file"
            results[i].bad_input = True
        elif not is_valid_uid(refs[i].sop_instance_uid):
            results[i].skip_reason = "bad input: invalid SOPInstanceUID"
            results[i].bad_input = True
            results[i].header = None
    readable = [i for i in readable if results[i].skip_reason is None]
    selections = select_instances([datasets[i] for i in readable], settings.selection_rules)
    for sel in selections:
        target = results[readable[sel.index]]
        target.scored = bool(sel.scored)
        target.skip_reason = None if sel.scored else (sel.reason or "not selected")
    return results


def _read_deferred_pixels(ds: Dataset, ref: InstanceRef) -> None:
    """Bring a deferred pixel data value into memory from the file parsed before.  A file
    gone or replaced since (a newer generation is on its way) is the spool's trouble,
    retried, never the image's fault."""
    try:
        replaced = os.stat(ref.path).st_mtime != getattr(ds, "timestamp", None)
    except FileNotFoundError as exc:
        raise _missing(ref) from exc
    if replaced:
        raise TransientError(f"spooled file replaced during analysis for {ref.sop_instance_uid}")
    try:
        for tag in PIXEL_TAGS:
            if tag in ds:
                ds[tag]  # reads a deferred value
    except OSError as exc:
        raise TransientError(f"spooled file unreadable for {ref.sop_instance_uid}: {exc}") \
            from exc


def _decode(img: ImageResult) -> None:
    t0 = time.perf_counter()
    try:
        _read_deferred_pixels(img.header, img.instance)
        img.image = decode_pixels(img.header)
    except _PIXEL_ERRORS as exc:
        img.scored = False
        img.bad_input = True
        img.image = None
        kind = type(exc).__name__ if isinstance(exc, BadInputError) else \
            f"UndecodablePixelsError: {type(exc).__name__}"
        img.skip_reason = f"bad input: {kind}: {exc}"[:500]
        log.warning("bad input sop_uid=%s reason=%s", img.instance.sop_instance_uid,
                    img.skip_reason)
        return
    img.timings["decode_s"] = time.perf_counter() - t0


def drop_pixel_data(ds: Dataset) -> None:
    """Remove the pixel data and every element after it, unread where still deferred."""
    tags = sorted(ds.keys())
    first = next((i for i, tag in enumerate(tags) if tag in PIXEL_TAGS), len(tags))
    for tag in tags[first:]:
        del ds[tag]


def load_pixels(images: list[ImageResult]) -> None:
    """Decode each selected image from its parsed file (bad pixels turn that image into a
    recorded skip), then leave every image its header alone."""
    for img in images:
        if img.scored:
            _decode(img)
        if img.header is not None:
            drop_pixel_data(img.header)


__all__ = [
    "DECODE_ERRORS",
    "DEFER_BYTES",
    "drop_pixel_data",
    "load_pixels",
    "read_instances",
    "select_images",
]
