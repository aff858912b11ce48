"""Projections: queryable state built from the log, exactly once in effect (view rows and the
checkpoint commit in one PostgreSQL transaction), rebuildable by replay."""

from projections.agent_runs import AgentRunsProjection, InsightsProjection
from projections.archive import ArchiveProjection
from projections.audit import AuditEntry, audit_trail
from projections.base import Projection
from projections.errors import CheckpointError, ProjectionApplyError, ProjectionError
from projections.read_models import RunReadModel
from projections.rebuild import RebuildReport, RebuildVerifyError, rebuild
from projections.registry import PROJECTIONS
from projections.routing import RequestAudit, RoutingProjection
from projections.runner import ProjectionRunner, RunnerStats, run_projections

__all__ = [
    "PROJECTIONS",
    "AgentRunsProjection",
    "ArchiveProjection",
    "AuditEntry",
    "CheckpointError",
    "InsightsProjection",
    "Projection",
    "ProjectionApplyError",
    "ProjectionError",
    "ProjectionRunner",
    "RebuildReport",
    "RebuildVerifyError",
    "RequestAudit",
    "RoutingProjection",
    "RunReadModel",
    "RunnerStats",
    "audit_trail",
    "rebuild",
    "run_projections",
]
