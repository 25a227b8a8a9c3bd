"""The one way to name a file under the data dir.

Every writer (spool, heatmaps, outbox, reports, models) builds its target here, from
names that are either validated UIDs, names of a strict grammar, or digests of anything
else.  A raw header value never becomes a path component: a value that is not a safe
name is replaced by its digest, and a target that resolves outside the root (through a
symlink, say) is refused with :class:`UnsafePathError`.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from db.uids import is_valid_uid

#: Names we generate ourselves: letters, digits, dot, dash, underscore; never hidden.
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


class UnsafePathError(ValueError):
    """A target path would leave its root directory (a bug or an attack, never written)."""


def digest_name(value: str) -> str:
    """A fixed-length, file-system-safe stand-in for an arbitrary value."""
    return "x" + hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def uid_name(uid: str) -> str:
    """``uid`` itself where it is a well-formed UID (digits and dots), else its digest."""
    text = str(uid).rstrip("\x00 ")
    return text if is_valid_uid(text) else digest_name(str(uid))


def is_safe_name(name: str) -> bool:
    """True for one path component of the strict grammar (no separators, not ``..``)."""
    return bool(_NAME_RE.fullmatch(name)) and name not in (".", "..")


def safe_name(name: str) -> str:
    """``name`` where it is safe, else :class:`UnsafePathError`."""
    if not is_safe_name(name):
        raise UnsafePathError(f"unsafe file name {name[:80]!r}")
    return name


def under(root: Path, *names: str) -> Path:
    """``root / names...``, each name checked by :func:`safe_name`, refused if the result
    resolves outside ``root`` (symlinks included)."""
    target = Path(root)
    for name in names:
        target = target / safe_name(name)
    resolved_root = Path(root).resolve()
    resolved = target.resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise UnsafePathError(f"{target} resolves outside {resolved_root}")
    return target


def check_inside(root: Path, target: Path) -> Path:
    """``target`` unchanged where it resolves inside ``root``, else :class:`UnsafePathError`."""
    resolved_root = Path(root).resolve()
    resolved = Path(target).resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise UnsafePathError(f"{target} resolves outside {resolved_root}")
    return Path(target)


__all__ = ["UnsafePathError", "check_inside", "digest_name", "is_safe_name", "safe_name",
           "uid_name", "under"]
