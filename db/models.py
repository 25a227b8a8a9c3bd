"""The schema: studies, instances, analyses, predictions, labels, models, evaluations,
retrain runs and deliveries.

The database is the source of truth for every study's state; the broker only carries work.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"
    QUEUED = "queued"
    ANALYSING = "analysing"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


class AnalysisState(enum.StrEnum):
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    DELIVERED = "delivered"
    FAILED = "failed"


class ModelStage(enum.StrEnum):
    CANDIDATE = "candidate"
    PRODUCTION = "production"
    RETIRED = "retired"
    REJECTED = "rejected"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING, index=True)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    # Patient identity is kept for training splits and label matching; it is never logged.
    patient_id: Mapped[str | None] = mapped_column(String(64), default=None)
    accession_number: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_instance_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # Bumped whenever new instances re-open a study; an analysis names the generation it saw.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    attempts: Mapped[int] = mapped_column(Integer, default=0)

    instances: Mapped[list[Instance]] = relationship(back_populates="study")
    analyses: Mapped[list[Analysis]] = relationship(back_populates="study")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    transfer_syntax: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16), default=None)
    view_position: Mapped[str | None] = mapped_column(String(16), default=None)
    body_part: Mapped[str | None] = mapped_column(String(64), default=None)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    calling_ae: Mapped[str | None] = mapped_column(String(16), default=None)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="instances")


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    architecture: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float] = mapped_column(Float)
    input_size: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(16), default=ModelStage.CANDIDATE, index=True)
    parent_version: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    promoted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    metadata_json: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Analysis(Base):
    """One scoring of one study generation by one model version."""

    __tablename__ = "analyses"
    __table_args__ = (UniqueConstraint("study_id", "model_version_id", "generation"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    generation: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=AnalysisState.RUNNING)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    probability: Mapped[float | None] = mapped_column(Float, default=None)
    positive: Mapped[bool | None] = mapped_column(Boolean, default=None)
    threshold: Mapped[float | None] = mapped_column(Float, default=None)
    # the pneumonia-pattern finding, P(covid) + P(other pneumonia) (three-class models)
    pneumonia_probability: Mapped[float | None] = mapped_column(Float, default=None)
    pneumonia_positive: Mapped[bool | None] = mapped_column(Boolean, default=None)
    pneumonia_threshold: Mapped[float | None] = mapped_column(Float, default=None)
    heatmap_method: Mapped[str | None] = mapped_column(String(16), default=None)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(String(64), default=None)

    study: Mapped[Study] = relationship(back_populates="analyses")
    model_version: Mapped[ModelVersion | None] = relationship()
    predictions: Mapped[list[Prediction]] = relationship(back_populates="analysis")


class Prediction(Base):
    """The outcome for one instance within an analysis: a score, or why it was skipped."""

    __tablename__ = "predictions"
    __table_args__ = (UniqueConstraint("analysis_id", "instance_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    analysis_id: Mapped[int] = mapped_column(ForeignKey("analyses.id"), index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    scored: Mapped[bool] = mapped_column(Boolean, default=True)
    probability: Mapped[float | None] = mapped_column(Float, default=None)
    pneumonia_probability: Mapped[float | None] = mapped_column(Float, default=None)
    heatmap_path: Mapped[str | None] = mapped_column(Text, default=None)
    skip_reason: Mapped[str | None] = mapped_column(Text, default=None)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    analysis: Mapped[Analysis] = relationship(back_populates="predictions")
    instance: Mapped[Instance] = relationship()


class Label(Base):
    """Ground truth for a study.  A changed label supersedes the old row (history kept)."""

    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    label: Mapped[int] = mapped_column(Integer)  # 1 COVID-19, 0 not
    # normal, other_pneumonia or covid; None where only COVID-19 or not is known
    label_name: Mapped[str | None] = mapped_column(String(32), default=None)
    truth_source: Mapped[str] = mapped_column(String(64))
    label_date: Mapped[str | None] = mapped_column(String(32), default=None)
    imported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    superseded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    current: Mapped[bool] = mapped_column(Boolean, default=True, index=True)

    study: Mapped[Study] = relationship()


class Evaluation(Base):
    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("retrain_runs.id"), default=None)
    kind: Mapped[str] = mapped_column(String(32))  # test, drift, dataset, deployed
    dataset: Mapped[str] = mapped_column(Text)
    n_images: Mapped[int] = mapped_column(Integer)
    auc: Mapped[float | None] = mapped_column(Float, default=None)
    sensitivity: Mapped[float | None] = mapped_column(Float, default=None)
    specificity: Mapped[float | None] = mapped_column(Float, default=None)
    metrics_json: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    report_path: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    model_version: Mapped[ModelVersion] = relationship()


class RetrainRun(Base):
    __tablename__ = "retrain_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # running, done, noop or failed
    status: Mapped[str] = mapped_column(String(16), default="running")
    champion_version: Mapped[str | None] = mapped_column(String(64), default=None)
    challenger_version: Mapped[str | None] = mapped_column(String(64), default=None)
    decision: Mapped[str | None] = mapped_column(String(16), default=None)  # promoted, kept, none
    reasons: Mapped[list[Any]] = mapped_column(JSON, default=list)
    report_path: Mapped[str | None] = mapped_column(Text, default=None)
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)


class Delivery(Base):
    """An outbox row: one DICOM object for one destination, sent exactly once."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "destination"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    analysis_id: Mapped[int | None] = mapped_column(ForeignKey("analyses.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    kind: Mapped[str] = mapped_column(String(8))  # sr or sc
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    destination: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deadline_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_status: Mapped[str | None] = mapped_column(String(16), default=None)
    reason: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)

    study: Mapped[Study] = relationship()


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; every stored time is UTC, so make it aware."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
