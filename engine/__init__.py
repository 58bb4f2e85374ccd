"""taskwatch.engine: run and watch background work in asyncio programs.

The public API of the engine; nothing here imports Textual.
"""

from .backends import AsyncioBackend, Backend, InlineBackend
from .background import BackgroundEngine, BackgroundRunHandle
from .bus import EventBus, Subscription
from .context import TaskContext
from .engine import Engine
from .errors import (
    AuthenticationFailed,
    ConnectionClosed,
    DuplicateTask,
    EngineNotRunning,
    IncompatibleVersion,
    InvalidParams,
    JobNotSerializable,
    LoopThreadError,
    MalformedMessage,
    MessageTooLarge,
    NotLeader,
    ProtocolError,
    QueueFull,
    RemoteError,
    RunNotCancellable,
    RunNotFound,
    RunNotRetryable,
    TaskDefinitionError,
    TaskwatchError,
    TooManyConnections,
    UnknownCommand,
    UnknownPeriodic,
    UnknownTask,
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
from .queues import QueueInfo, WorkQueue
from .remote import RemoteEngine
from .runs import EngineStats, Progress, RunError, RunList, RunRecord, RunStatus
from .scheduler import PeriodicInfo
from .server import ControlServer, ServerInfo
from .snapshot import Snapshot
from .supervisor import WorkerInfo
from .tasks import TaskInfo, TaskSpec
from .triggers import Trigger, TriggerKeyState, TriggerState
from .version import __version__

__all__ = [
    "AuthenticationFailed",
    "BackgroundEngine",
    "BackgroundRunHandle",
    "ConnectionClosed",
    "ControlServer",
    "IncompatibleVersion",
    "LoopThreadError",
    "MalformedMessage",
    "MessageTooLarge",
    "RemoteEngine",
    "RemoteError",
    "RunList",
    "ServerInfo",
    "UnknownCommand",
    "EVENT_ADAPTER",
    "EVENT_KINDS",
    "AsyncioBackend",
    "Backend",
    "BaseEvent",
    "DuplicateTask",
    "Engine",
    "EngineNotRunning",
    "EngineStats",
    "Event",
    "EventBus",
    "InlineBackend",
    "InvalidParams",
    "JobNotSerializable",
    "InProcessLease",
    "Leadership",
    "Lease",
    "LeaseState",
    "NotLeader",
    "Progress",
    "ProtocolError",
    "QueueFull",
    "RunError",
    "RunHandle",
    "RunNotCancellable",
    "RunNotFound",
    "RunNotRetryable",
    "RunRecord",
    "RunStatus",
    "Subscription",
    "PeriodicInfo",
    "QueueInfo",
    "Snapshot",
    "TaskContext",
    "TaskInfo",
    "Trigger",
    "TriggerKeyState",
    "TriggerState",
    "WorkQueue",
    "WorkerInfo",
    "TaskDefinitionError",
    "TaskSpec",
    "TaskwatchError",
    "TooManyConnections",
    "UnknownPeriodic",
    "UnknownTask",
    "event_from_dict",
    "event_from_json",
    "event_to_dict",
    "event_to_json",
    "__version__",
]
