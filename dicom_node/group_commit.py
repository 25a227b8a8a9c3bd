"""Group commit: concurrent stores of one listener process share one database transaction
and one fsync per spool directory.

Each C-STORE handler thread hands its staged (written and fsync'ed) file to
:meth:`GroupCommitter.record` and waits.  One committer thread takes every store waiting
at that moment and, in one session: publishes each file (hard link into place), adds its
row and bumps its study, exactly as :func:`dicom_node.ingest._record` does for one; then it
fsyncs each touched directory once and commits once.  Only after that commit does any of
the waiting handlers return, so each store is still acknowledged only once its own file
and row are durable.

If the shared transaction fails (another process inserted the same SOP Instance UID, a
locked or lost database), it is rolled back and every store of the group is recorded on
its own, so that one bad store cannot fail its neighbours; the files already linked into
place are found by the same path that handles a retry of a single store.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from db.session import Database
from dicom_node import ingest, spool
from dicom_node.atomic import fsync_dir

log = logging.getLogger(__name__)

#: Most stores in one transaction; more wait for the next one.
MAX_GROUP = 32


@dataclass
class _Job:
    header: ingest.Header
    staged: spool.StagedFile
    calling_ae: str | None
    when: datetime
    future: Future[ingest.IngestOutcome] = field(default_factory=Future)


class GroupCommitter:
    """One committer thread per process that records stores in groups."""

    def __init__(self, db: Database, max_group: int = MAX_GROUP, *, start: bool = True) -> None:
        self.db = db
        self.max_group = max_group
        #: Largest group committed as one transaction so far (for tests and tuning).
        self.largest_group = 0
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._stopped = False
        self._lock = threading.Lock()  # nothing is queued after the stop marker
        if start:
            self._thread.start()

    def start(self) -> None:
        """Start the committer thread (when constructed with ``start=False``)."""
        self._thread.start()

    def waiting(self) -> int:
        return self._queue.qsize()

    def record(self, db: Database, header: ingest.Header, staged: spool.StagedFile,
               calling_ae: str | None, when: datetime) -> ingest.IngestOutcome:
        """Record one staged store; returns once its group is committed, raises what
        :func:`dicom_node.ingest._record` would raise for it alone."""
        job = _Job(header, staged, calling_ae, when)
        with self._lock:
            queued = db is self.db and not self._stopped
            if queued:
                self._queue.put(job)
        if not queued:  # stopped, or not our database: record it alone
            return ingest.record_one(db, header, staged, calling_ae, when)
        return job.future.result()

    def stop(self) -> None:
        """Record what is queued, then end the committer thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._queue.put(None)
        if self._thread.ident is not None:
            self._thread.join(60)

    # ----- committer thread ---------------------------------------------------------
    def _take(self) -> list[_Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        jobs = [first]
        while len(jobs) < self.max_group:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # stop after this group
                break
            jobs.append(job)
        return jobs

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            if len(jobs) == 1:
                self._alone(jobs[0])
                continue
            try:
                outcomes = self._together(jobs)
            except _GroupFailed as failure:
                log.info("group of %d stores failed as one transaction (%s); recording "
                         "each alone", len(jobs), type(failure.error).__name__)
                for job in jobs:
                    if job is failure.job and not isinstance(failure.error, SQLAlchemyError):
                        # Its own fault (its file could not be published): as if alone.
                        job.future.set_exception(failure.error)
                    else:
                        self._alone(job, after_group=True)
                continue
            self.largest_group = max(self.largest_group, len(jobs))
            for job, outcome in zip(jobs, outcomes, strict=True):
                job.future.set_result(outcome)

    def _alone(self, job: _Job, after_group: bool = False) -> None:
        try:
            if after_group and job.staged.final.exists():
                # Linked into place by the failed group, maybe before its directory
                # fsync: the single-store path will not publish (nor sync) it again.
                try:
                    fsync_dir(job.staged.final.parent)
                except OSError as exc:
                    raise spool.SpoolWriteError(
                        f"cannot sync {job.staged.final.parent.name}: {exc}") from exc
            outcome = ingest.record_one(self.db, job.header, job.staged, job.calling_ae,
                                        job.when)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting handler
            job.future.set_exception(exc)
        else:
            job.future.set_result(outcome)

    def _together(self, jobs: list[_Job]) -> list[ingest.IngestOutcome]:
        """Record ``jobs`` in one transaction; raises :class:`_GroupFailed` (rolled back)."""
        outcomes: list[ingest.IngestOutcome] = []
        directories: set[Path] = set()
        current: _Job | None = None
        try:
            with self.db.session() as session:
                for current in jobs:
                    outcomes.append(ingest.record_in(session, current.header, current.staged,
                                                     current.calling_ae, current.when,
                                                     sync_dir=False))
                    directories.add(current.staged.final.parent)
                current = None
                session.flush()
                for directory in directories:  # before the commit: no row without its file
                    fsync_dir(directory)
        except Exception as exc:  # noqa: BLE001 - sorted out per store by the caller
            raise _GroupFailed(current, exc) from exc
        return outcomes


class _GroupFailed(Exception):
    """The shared transaction failed; ``job`` is the store being recorded (None: the
    failure was in the flush, the directory syncs or the commit)."""

    def __init__(self, job: _Job | None, error: Exception) -> None:
        super().__init__(str(error))
        self.job = job
        self.error = error
