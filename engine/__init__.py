"""taskwatch.engine: run and watch background work in asyncio programs.

The public API of the engine; nothing here imports Textual.
"""

from .background import BackgroundEngine, BackgroundRunHandle
from .bus import EventBus, Subscription
from .context import TaskContext
from .engine import Engine
from .errors import (
    AuthenticationFailed,
    ConnectionClosed,
    DuplicateTask,
    EngineCrashed,
    EngineNotRunning,
    IncompatibleVersion,
    InvalidConfiguration,
    InvalidCount,
    InvalidKey,
    InvalidParams,
    JobNotSerializable,
    LeaseUnavailable,
    LoopThreadError,
    MalformedMessage,
    MessageTooLarge,
    MissingDependency,
    NotLeader,
    ProtocolError,
    QueueFull,
    RemoteError,
    ReplyTooLarge,
    RunNotCancellable,
    RunNotFound,
    RunNotRetryable,
    TaskDefinitionError,
    TaskwatchError,
    TooManyConnections,
    TooManyHandshakes,
    UnknownCommand,
    UnknownPeriodic,
    UnknownQueue,
    UnknownTask,
    UnknownTrigger,
    UnknownWorker,
    WeakToken,
    WorkerNotLeading,
)
from .events import (
    EVENT_ADAPTER,
    EVENT_KINDS,
    BaseEvent,
    Event,
    event_from_dict,
    event_from_json,
    event_to_dict,
    event_to_json,
)
from .handle import RunHandle
from .lease import InProcessLease, Leadership, Lease, LeaseState
from .memory_events import MemoryEventRelay, MemoryEventStream
from .postgres_events import PostgresEventRelay
from .postgres_lease import PostgresLease
from .queues import QueueInfo, QueuePurge, WorkQueue
from .observer import ClusterObserver
from .operations import OPERATIONS, Operation
from .redis_events import RedisEventRelay
from .relay import ClusterNode, EventRelay, RelayStats
from .redis_lease import RedisLease
from .remote import RemoteEngine
from .runs import EngineStats, Progress, RunError, RunList, RunRecord, RunStatus
from .scheduler import PeriodicInfo
from .server import ControlServer, ServerInfo
from .snapshot import Snapshot, is_truncated
from .store import MemoryStore, NodeInfo, PostgresStore, SqliteStore, Store, StoredRun, make_store
from .supervisor import WorkerInfo
from .tasks import TaskInfo, TaskSpec
from .triggers import Trigger, TriggerFire, TriggerKeyState, TriggerState
from .version import __version__

__all__ = [
    "AuthenticationFailed",
    "BackgroundEngine",
    "BackgroundRunHandle",
    "BaseEvent",
    "ClusterNode",
    "ClusterObserver",
    "ConnectionClosed",
    "ControlServer",
    "DuplicateTask",
    "EVENT_ADAPTER",
    "EVENT_KINDS",
    "Engine",
    "EngineCrashed",
    "EngineNotRunning",
    "EngineStats",
    "Event",
    "EventBus",
    "EventRelay",
    "InProcessLease",
    "IncompatibleVersion",
    "InvalidConfiguration",
    "InvalidCount",
    "InvalidKey",
    "InvalidParams",
    "JobNotSerializable",
    "Leadership",
    "Lease",
    "LeaseState",
    "LeaseUnavailable",
    "LoopThreadError",
    "MalformedMessage",
    "MemoryEventRelay",
    "MemoryEventStream",
    "MemoryStore",
    "MessageTooLarge",
    "MissingDependency",
    "NodeInfo",
    "NotLeader",
    "PeriodicInfo",
    "PostgresEventRelay",
    "PostgresLease",
    "PostgresStore",
    "Progress",
    "ProtocolError",
    "QueueFull",
    "QueueInfo",
    "QueuePurge",
    "OPERATIONS",
    "Operation",
    "RedisEventRelay",
    "RedisLease",
    "RelayStats",
    "RemoteEngine",
    "RemoteError",
    "ReplyTooLarge",
    "RunError",
    "RunHandle",
    "RunList",
    "RunNotCancellable",
    "RunNotFound",
    "RunNotRetryable",
    "RunRecord",
    "RunStatus",
    "ServerInfo",
    "Snapshot",
    "SqliteStore",
    "Store",
    "StoredRun",
    "Subscription",
    "TaskContext",
    "TaskDefinitionError",
    "TaskInfo",
    "TaskSpec",
    "TaskwatchError",
    "TooManyConnections",
    "TooManyHandshakes",
    "Trigger",
    "TriggerFire",
    "TriggerKeyState",
    "TriggerState",
    "UnknownCommand",
    "UnknownPeriodic",
    "UnknownQueue",
    "UnknownTask",
    "UnknownTrigger",
    "UnknownWorker",
    "WeakToken",
    "WorkQueue",
    "WorkerInfo",
    "WorkerNotLeading",
    "__version__",
    "event_from_dict",
    "event_from_json",
    "event_to_dict",
    "event_to_json",
    "is_truncated",
    "make_store",
]
