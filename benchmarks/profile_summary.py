"""Summarise py-spy "raw" (collapsed) profiles of the node, as written by
``benchmarks/ingest.py --profile DIR``: share of active samples per cost category.

``python benchmarks/profile_summary.py DIR/*.txt``.  A sample is put in the first category
whose pattern matches one of its frames, searched from the innermost frame outwards; the
categories are the steps of one C-STORE in the listener.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

#: Innermost frames that are waits, not work: py-spy's idle detection misses short sleeps,
#: selects and lock or server waits, so they are counted apart (pynetdicom's 1 ms sleeps
#: in its two reactor loops, the listener's select, condition waits, psycopg waiting for
#: the server).
WAITS = ("dul.py:403)", "association.py:714)", "wait_then_check_transport (", "Condition.wait (",
         "Connection.wait (", "selectors.py", "Event.wait (", "time.sleep")

#: (category, substrings of a frame), innermost match wins.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("fsync (file, directory)", ("fsync (", "fsync_dir (", "ReceivedFile.ingest (")),
    ("file write", ("stage (dicom_node/spool.py", "_write_all (")),
    # Streamed data sets (dicom_node.stream_store): the hash is ReceivedFile.write's own
    # line, the write is _write_all beneath it (innermost frame first).
    ("SHA-256", ("_hash_into (", "ReceivedFile.write (")),
    ("database (SQLAlchemy, driver, commit)", ("sqlalchemy/", "psycopg/", "sqlite3")),
    ("header parse and tail check", ("parse_header (",)),
    ("socket receive", ("recv (dicom_node/peer_socket.py", "recv_into", "recv_exactly")),
    ("PDU decode and assembly (pynetdicom)", ("pynetdicom/pdu", "pynetdicom/dimse",
                                              "pynetdicom/dul.py", "pynetdicom/fsm.py")),
    ("pynetdicom association set-up (context deepcopy), dispatch", ("pynetdicom/",)),
]


def categorise(stack: list[str]) -> str:
    if stack and any(w in stack[-1] for w in WAITS):
        return "waiting (sleep, select, locks, database server)"
    for frame in reversed(stack):
        for name, patterns in CATEGORIES:
            if any(p in frame for p in patterns):
                return name
    return "other"


def summarise(path: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack_text, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        counts[categorise(stack_text.split(";"))] += int(number)
    return counts


def main(argv: list[str]) -> int:
    for name in argv:
        counts = summarise(Path(name))
        total = sum(counts.values()) or 1
        print(f"\n{Path(name).name}: {total} active samples")
        for category, n in counts.most_common():
            print(f"  {100 * n / total:5.1f}%  {category}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
