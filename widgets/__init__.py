"""taskwatch.widgets: reusable Textual widgets fed with the engine's plain data models.

Every widget takes the public pydantic models of :mod:`taskwatch.engine`
(RunRecord, PeriodicInfo, QueueInfo, ...) through update methods, and reports
user choices upward with messages. None of them keeps global state.
"""

from ._format import printable, printable_lines
from .counts_bar import CountsBar
from .event_log import EventLog
from .failures_list import FailuresList
from .health_sparklines import HealthSparklines
from .leader_badge import LeaderBadge
from .nodes_table import NodesTable, StoreNodesTable
from .params_form import FieldSpec, ParamsForm, ParamsFormError, fields_from_schema
from .queues_table import QueuesTable
from .run_detail import RunAttempt, RunDetail
from .runs_table import ClusterRunsTable, RunsTable
from .schedule_table import ScheduleTable
from .store_badge import StoreBadge
from .task_stats_table import TaskStats, TaskStatsTable
from .triggers_table import TriggersTable
from .workers_table import WorkersTable

__all__ = [
    "ClusterRunsTable",
    "CountsBar",
    "EventLog",
    "FailuresList",
    "FieldSpec",
    "HealthSparklines",
    "LeaderBadge",
    "NodesTable",
    "ParamsForm",
    "ParamsFormError",
    "QueuesTable",
    "RunAttempt",
    "RunDetail",
    "RunsTable",
    "ScheduleTable",
    "StoreNodesTable",
    "StoreBadge",
    "TaskStats",
    "TaskStatsTable",
    "TriggersTable",
    "WorkersTable",
    "fields_from_schema",
    "printable",
    "printable_lines",
]
