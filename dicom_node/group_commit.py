"""Group commit: concurrent stores of one listener process share one database transaction
and one fsync per spool directory.

Each C-STORE handler thread hands its staged (written and fsync'ed) file to
:meth:`GroupCommitter.record`.  The first to arrive while nobody is committing leads: it
takes every store waiting at that moment (itself included) and, in one session, publishes
each file (hard link into place), adds its row and bumps its study, exactly as
:func:`dicom_node.ingest.record_in` does for one; then it fsyncs each touched directory
once and commits once.  Only after that commit does any store of the group return, so
each is still acknowledged only once its own file and row are durable.

If the shared transaction fails (another process inserted the same SOP Instance UID, a
locked or lost database), it is rolled back and every store of the group is recorded on
its own, so that one bad store cannot fail its neighbours; the files already linked into
place are found by the same path that handles a retry of a single store.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from db.atomic import fsync_dir
from db.session import Database
from dicom_node import ingest, spool

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
    wake: threading.Event = field(default_factory=threading.Event)


class GroupCommitter:
    """Leader-based group commit for the store handler threads of one process.

    There is no committer thread: a store that finds nobody committing commits itself, with
    every store queued at that moment (a lone sender pays no thread hand-off); stores that
    arrive meanwhile queue up, and the first of them leads the next group.
    """

    def __init__(self, db: Database, max_group: int = MAX_GROUP) -> None:
        self.db = db
        self.max_group = max_group
        #: Largest group committed as one transaction so far (for tests and tuning).
        self.largest_group = 0
        self._pending: list[_Job] = []
        self._lock = threading.Lock()  # guards _pending and _stopped
        self._leader = threading.Lock()  # held by the store that is committing a group
        self._stopped = False

    def record(self, db: Database, header: ingest.Header, staged: spool.StagedFile,
               calling_ae: str | None, when: datetime) -> ingest.IngestOutcome:
        """Record one staged store; returns once its group is committed, raises what
        :func:`dicom_node.ingest.record_one` would raise for it alone."""
        job = _Job(header, staged, calling_ae, when)
        with self._lock:
            queued = db is self.db and not self._stopped
            if queued:
                self._pending.append(job)
        if not queued:  # stopped, or not our database: record it alone
            return ingest.record_one(db, header, staged, calling_ae, when)
        while not job.future.done():
            if self._leader.acquire(blocking=False):
                try:
                    self._lead()
                finally:
                    self._leader.release()
                with self._lock:
                    following = self._pending[0] if self._pending else None
                if following is not None:
                    following.wake.set()  # it leads the next group
            else:
                # The timeout only guards against a missed wake-up; leaders wake us.
                job.wake.wait(0.05)
                job.wake.clear()
        return job.future.result()

    def waiting(self) -> int:
        """Stores queued and not yet taken into a group."""
        with self._lock:
            return len(self._pending)

    @contextmanager
    def held(self) -> Iterator[None]:
        """No group is committed while this is held (tests use it to form a group)."""
        with self._leader:
            yield

    def stop(self) -> None:
        """Later stores are recorded one by one; queued ones are still committed."""
        with self._lock:
            self._stopped = True

    # ----- the leader -------------------------------------------------------------------
    def _lead(self) -> None:
        with self._lock:
            jobs = self._pending[:self.max_group]
            del self._pending[:self.max_group]
        if not jobs:
            return
        if len(jobs) == 1:
            self._alone(jobs[0])
        else:
            self._group(jobs)
        for job in jobs:
            job.wake.set()

    def _group(self, jobs: list[_Job]) -> None:
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
            return
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
