"""Projections: queryable state built from the log, exactly once in effect (view rows and the
checkpoint commit in one PostgreSQL transaction), rebuildable by replay."""

from projections.agent_runs import AgentRunsProjection
from projections.base import Projection
from projections.errors import CheckpointError, ProjectionApplyError, ProjectionError
from projections.runner import ProjectionRunner, RunnerStats, run_projections

__all__ = [
    "AgentRunsProjection",
    "CheckpointError",
    "Projection",
    "ProjectionApplyError",
    "ProjectionError",
    "ProjectionRunner",
    "RunnerStats",
    "run_projections",
]
