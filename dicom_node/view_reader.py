"""A file-like reader over a memoryview, for pydicom's ``read_dataset`` without a copy.

``BytesIO(view)`` copies the whole buffer: a 10 MB data set, only to read the few kilobytes
of header in front of its pixel data.
"""

from __future__ import annotations


class ViewReader:
    """The read, seek and tell pydicom's ``read_dataset`` needs, over a view, no copy."""

    name = "<received data set>"

    def __init__(self, view: memoryview) -> None:
        self._view, self._pos = view, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size < 0 else self._pos + size
        data = bytes(self._view[self._pos:end])
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, len(self._view))[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos
