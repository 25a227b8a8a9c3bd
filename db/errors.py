"""Errors named by whose fault they are.

    CxrError
     ├── BadInputError            the data or its sender: recorded, never retried
     │    ├── UndecodablePixelsError
     │    ├── MissingPixelDataError
     │    ├── MultiFrameError
     │    └── UnsupportedImageError
     ├── PeerError                a DICOM peer refused or failed (retried until a deadline)
     └── TransientError           our infrastructure: database, broker, disk, GPU memory
                                  (retried with backoff, then recorded)
"""

from __future__ import annotations


class CxrError(Exception):
    """Base of every cxr-triage error."""


class BadInputError(CxrError):
    """The input cannot be used; retrying will not help."""


class UndecodablePixelsError(BadInputError):
    """Pixel Data is present but cannot be decoded."""


class MissingPixelDataError(BadInputError):
    """The object has no Pixel Data."""


class MultiFrameError(BadInputError):
    """More than one frame where a single radiograph is expected."""


class UnsupportedImageError(BadInputError):
    """An image whose photometric or sample layout we do not score."""


class PeerError(CxrError):
    """A DICOM peer refused the association or answered with a failure status."""


class TransientError(CxrError):
    """A temporary failure of infrastructure we run; worth retrying."""
