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
    IncompatibleVersion,
    LoopThreadError,
    MalformedMessage,
    MessageTooLarge,
    RemoteError,
    UnknownCommand,
    DuplicateTask,
    EngineNotRunning,
    InvalidParams,
    JobNotSerializable,
    NotLeader,
    ProtocolError,
    QueueFull,
    RunNotCancellable,
    RunNotFound,
    RunNotRetryable,
    TaskDefinitionError,
    TaskwatchError,
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
from .runs import EngineStats, Progress, RunError, RunRecord, RunStatus
from .runs import RunList
from .remote import RemoteEngine
from .server import ControlServer, ServerInfo
from .queues import QueueInfo, WorkQueue
from .scheduler import PeriodicInfo
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
    "UnknownPeriodic",
    "UnknownTask",
    "event_from_dict",
    "event_from_json",
    "event_to_dict",
    "event_to_json",
    "__version__",
]
