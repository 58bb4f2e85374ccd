"""Every SQL statement of the SQL run stores, by name, and the schema migrations.

One place to review how a claim, a finish or a recovery is written. The
queries use named parameters (``:name``, bound by the driver) and only SQL
that SQLite (>= 3.35) and PostgreSQL both accept: ``ON CONFLICT ... DO
UPDATE``, ``RETURNING``, partial indexes. The marker ``/*LOCK*/`` is where
PostgreSQL puts ``FOR UPDATE SKIP LOCKED``; SQLite serialises writers with
``BEGIN IMMEDIATE`` instead and drops the marker. A PostgreSQL store binds
the same names (``:name`` -> ``%(name)s``) and needs only its own DDL
(``BIGINT GENERATED ALWAYS AS IDENTITY`` for ``seq``, ``JSONB`` for the JSON
columns).

Claim tokens are ``"<seq>.<random>"``: the seq makes every token check a
primary-key lookup, the random part makes a token of an earlier claim of the
same row useless.
"""

from __future__ import annotations

#: the newest schema this code knows; a database with a higher version is refused
SCHEMA_VERSION = 2

#: finished rows are exactly those with a finished_at (a re-queued run has none)
FINISHED = "finished_at IS NOT NULL"

# ---------------------------------------------------------------- schema

CREATE_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    applied_at  DOUBLE PRECISION NOT NULL
)"""

SCHEMA_FOUND = "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"

RECORD_MIGRATION = "INSERT INTO schema_migrations (version, name, applied_at) VALUES (:version, :name, :now)"

#: (version, name, statements); SQLite dialect. Append, never edit a released entry.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (
        1,
        "runs, nodes, totals, periodic, trigger counters",
        [
            """
            CREATE TABLE runs (
                seq                INTEGER PRIMARY KEY AUTOINCREMENT,
                id                 TEXT NOT NULL UNIQUE,
                task               TEXT NOT NULL,
                params             TEXT NOT NULL,
                status             TEXT NOT NULL,
                attempt            INTEGER NOT NULL DEFAULT 1,
                max_attempts       INTEGER NOT NULL DEFAULT 1,
                lost_count         INTEGER NOT NULL DEFAULT 0,
                created_at         DOUBLE PRECISION NOT NULL,
                started_at         DOUBLE PRECISION,
                finished_at        DOUBLE PRECISION,
                run_after          DOUBLE PRECISION NOT NULL,
                owner_node         TEXT,
                owner_incarnation  TEXT,
                claim_token        TEXT,
                lease_until        DOUBLE PRECISION,
                cancel_requested   INTEGER NOT NULL DEFAULT 0,
                cancel_reason      TEXT,
                progress_done      DOUBLE PRECISION NOT NULL DEFAULT 0,
                progress_total     DOUBLE PRECISION,
                progress_message   TEXT NOT NULL DEFAULT '',
                result             TEXT,
                error              TEXT,
                dedup_key          TEXT,
                -- the key while this row holds it: set only while pending, and
                -- only if no other pending run of the task holds the same key
                dedup_slot         TEXT,
                source             TEXT NOT NULL DEFAULT 'submit',
                on_lost            TEXT NOT NULL DEFAULT 'retry'
            )""",
            "CREATE UNIQUE INDEX runs_dedup ON runs (task, dedup_slot) WHERE dedup_slot IS NOT NULL",
            "CREATE INDEX runs_pending ON runs (task, seq) WHERE status = 'pending'",
            "CREATE INDEX runs_running ON runs (owner_incarnation) WHERE status = 'running'",
            f"CREATE INDEX runs_finished ON runs (finished_at, seq) WHERE {FINISHED}",
            "CREATE INDEX runs_status ON runs (status, seq)",
            """
            CREATE TABLE nodes (
                incarnation     TEXT PRIMARY KEY,
                node            TEXT NOT NULL,
                version         TEXT NOT NULL,
                started_at      DOUBLE PRECISION NOT NULL,
                last_heartbeat  DOUBLE PRECISION NOT NULL,
                running         INTEGER NOT NULL DEFAULT 0,
                stopped_at      DOUBLE PRECISION,
                registered_seq  INTEGER NOT NULL
            )""",
            "CREATE TABLE totals (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
            """INSERT INTO totals (name, value) VALUES
                ('inserted', 0), ('succeeded', 0), ('failed', 0),
                ('cancelled', 0), ('retried', 0), ('lost', 0)""",
            "CREATE TABLE periodic (name TEXT PRIMARY KEY, last_fire DOUBLE PRECISION NOT NULL)",
            """
            CREATE TABLE trigger_counters (
                trigger_name  TEXT NOT NULL,
                counter_key   TEXT NOT NULL,
                value         INTEGER NOT NULL,
                PRIMARY KEY (trigger_name, counter_key)
            )""",
        ],
    ),
    (
        2,
        "queue jobs, trigger key state",
        [
            """
            CREATE TABLE queue_jobs (
                id           INTEGER PRIMARY KEY AUTOINCREMENT,
                queue        TEXT NOT NULL,
                job          TEXT NOT NULL,
                incarnation  TEXT NOT NULL,
                created_at   DOUBLE PRECISION NOT NULL
            )""",
            "CREATE INDEX queue_jobs_by_queue ON queue_jobs (queue, id)",
            """
            CREATE TABLE trigger_keys (
                trigger_name   TEXT NOT NULL,
                counter_key    TEXT NOT NULL,
                count          INTEGER NOT NULL,
                captured       INTEGER NOT NULL,
                first_seen_at  DOUBLE PRECISION,
                last_run_at    DOUBLE PRECISION,
                run_id         TEXT,
                last_run_id    TEXT,
                last_status    TEXT,
                PRIMARY KEY (trigger_name, counter_key)
            )""",
            "DROP TABLE trigger_counters",
        ],
    ),
]

# ---------------------------------------------------------------- runs

RUN_COLUMNS = (
    "seq, id, task, params, status, attempt, max_attempts, lost_count, created_at, started_at, "
    "finished_at, run_after, owner_node, owner_incarnation, claim_token, lease_until, "
    "cancel_requested, cancel_reason, progress_done, progress_total, progress_message, "
    "result, error, dedup_key, source, on_lost"
)

INSERT_RUN = """
INSERT INTO runs (id, task, params, status, max_attempts, created_at, run_after,
                  dedup_key, dedup_slot, source, on_lost)
VALUES (:id, :task, :params, 'pending', :max_attempts, :created_at, :run_after,
        :key, :key, :source, :on_lost)"""

KEY_HOLDER = "SELECT id FROM runs WHERE task = :task AND dedup_slot = :key"

RUN_ID_EXISTS = "SELECT 1 FROM runs WHERE id = :id"

COUNT_PENDING = "SELECT COUNT(*) FROM runs WHERE status = 'pending'"

#: the due pending runs of one task, oldest first; run once per task the node may claim
CLAIM_CANDIDATES = """
SELECT seq, id, task, params, attempt, max_attempts, created_at, dedup_key, source, lost_count
FROM runs
WHERE status = 'pending' AND task = :task AND run_after <= :now
ORDER BY seq
LIMIT :n
/*LOCK*/"""

CLAIM_TAKE = """
UPDATE runs
SET status = 'running', owner_node = :node, owner_incarnation = :incarnation,
    claim_token = :token, lease_until = :lease_until, started_at = :now, dedup_slot = NULL
WHERE seq = :seq AND status = 'pending'"""

HEARTBEAT = """
UPDATE runs SET lease_until = :lease_until
WHERE seq = :seq AND claim_token = :token AND owner_incarnation = :incarnation AND status = 'running'
RETURNING cancel_requested, cancel_reason"""

HEARTBEAT_PROGRESS = """
UPDATE runs
SET lease_until = :lease_until, progress_done = :done, progress_total = :total, progress_message = :message
WHERE seq = :seq AND claim_token = :token AND owner_incarnation = :incarnation AND status = 'running'
RETURNING cancel_requested, cancel_reason"""

#: the claim a finish or a recovery acts on, if it is still current
CLAIM_STATE = """
SELECT cancel_requested, cancel_reason
FROM runs
WHERE seq = :seq AND claim_token = :token AND status = 'running'"""

#: a claimed run ends; returns nothing when the token is stale
END_CLAIMED = """
UPDATE runs
SET status = :status, finished_at = :now, result = :result,
    error = COALESCE(:error, error), cancel_reason = COALESCE(:cancel_reason, cancel_reason),
    lost_count = lost_count + :lost,
    claim_token = NULL, lease_until = NULL, dedup_slot = NULL
WHERE seq = :seq AND claim_token = :token AND status = 'running'
RETURNING id"""

#: a claimed run goes back to pending (retry, or its worker was lost), retaking its key if free
REQUEUE_CLAIMED = """
UPDATE runs
SET status = 'pending', attempt = attempt + :step, lost_count = lost_count + :lost,
    run_after = :run_after, error = :error,
    owner_node = NULL, owner_incarnation = NULL, claim_token = NULL, lease_until = NULL,
    dedup_slot = CASE
        WHEN dedup_key IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM runs AS other WHERE other.task = runs.task AND other.dedup_slot = runs.dedup_key
        ) THEN dedup_key
    END
WHERE seq = :seq AND claim_token = :token AND status = 'running'"""

CANCEL_PENDING = """
UPDATE runs
SET status = 'cancelled', finished_at = :now, cancel_reason = :reason, dedup_slot = NULL
WHERE seq = :seq AND status = 'pending'"""

CANCEL_FLAG = """
UPDATE runs SET cancel_requested = 1, cancel_reason = :reason
WHERE seq = :seq AND status = 'running' AND cancel_requested = 0"""

RUNNING_CLAIMS = """
SELECT seq, id, task, owner_node, owner_incarnation, claim_token, lease_until,
       cancel_requested, lost_count, on_lost, attempt
FROM runs
WHERE status = 'running'
/*LOCK*/"""

GET_RUN = f"SELECT {RUN_COLUMNS} FROM runs WHERE id = :id"

#: newest first; every filter is optional (NULL disables it)
QUERY_RUNS = f"""
SELECT {RUN_COLUMNS}
FROM runs
WHERE (:before IS NULL OR seq < :before)
  AND (:status IS NULL OR status = :status)
  AND (:task IS NULL OR task = :task)
  AND (:since IS NULL OR created_at >= :since)
ORDER BY seq DESC
LIMIT :limit"""

COUNT_BY_STATUS = "SELECT status, COUNT(*) FROM runs GROUP BY status"

TOTALS = "SELECT name, value FROM totals"

ADD_TOTAL = "UPDATE totals SET value = value + :delta WHERE name = :name"

PRUNE_OLDER = f"DELETE FROM runs WHERE {FINISHED} AND finished_at < :cutoff"

#: the newest finished run beyond the ``keep`` newest (its position bounds the delete)
PRUNE_BOUNDARY = f"""
SELECT finished_at, seq FROM runs WHERE {FINISHED}
ORDER BY finished_at DESC, seq DESC
LIMIT 1 OFFSET :keep"""

PRUNE_FROM = f"""
DELETE FROM runs
WHERE {FINISHED} AND (finished_at < :finished_at OR (finished_at = :finished_at AND seq <= :seq))"""

# ---------------------------------------------------------------- nodes

REGISTER_NODE = """
INSERT INTO nodes (incarnation, node, version, started_at, last_heartbeat, running, stopped_at, registered_seq)
VALUES (:incarnation, :node, :version, :now, :now, 0, NULL,
        (SELECT COALESCE(MAX(registered_seq), 0) + 1 FROM nodes))
ON CONFLICT (incarnation) DO UPDATE
SET node = excluded.node, version = excluded.version, last_heartbeat = excluded.last_heartbeat,
    stopped_at = NULL, registered_seq = excluded.registered_seq"""

NODE_COLUMNS = "node, incarnation, version, started_at, last_heartbeat, running, stopped_at"

GET_NODE = f"SELECT {NODE_COLUMNS} FROM nodes WHERE incarnation = :incarnation"

ALL_NODES = f"SELECT {NODE_COLUMNS} FROM nodes ORDER BY registered_seq"

NODE_HEARTBEAT = "UPDATE nodes SET last_heartbeat = :now, running = :running WHERE incarnation = :incarnation"

NODE_STOPPED = "UPDATE nodes SET stopped_at = :now, running = 0 WHERE incarnation = :incarnation"

# ---------------------------------------------------------------- small durable state

GET_PERIODIC = "SELECT last_fire FROM periodic WHERE name = :name"

SET_PERIODIC = """
INSERT INTO periodic (name, last_fire) VALUES (:name, :fired_at)
ON CONFLICT (name) DO UPDATE SET last_fire = excluded.last_fire"""

TRIGGER_KEY_COLUMNS = "count, captured, first_seen_at, last_run_at, run_id, last_run_id, last_status"

LOAD_TRIGGER = f"SELECT counter_key, {TRIGGER_KEY_COLUMNS} FROM trigger_keys WHERE trigger_name = :trigger"

SAVE_TRIGGER_KEY = f"""
INSERT INTO trigger_keys (trigger_name, counter_key, {TRIGGER_KEY_COLUMNS})
VALUES (:trigger, :key, :count, :captured, :first_seen_at, :last_run_at, :run_id, :last_run_id, :last_status)
ON CONFLICT (trigger_name, counter_key) DO UPDATE SET
    count = excluded.count, captured = excluded.captured, first_seen_at = excluded.first_seen_at,
    last_run_at = excluded.last_run_at, run_id = excluded.run_id, last_run_id = excluded.last_run_id,
    last_status = excluded.last_status"""

# ---------------------------------------------------------------- queue jobs

PUT_JOB = """
INSERT INTO queue_jobs (queue, job, incarnation, created_at) VALUES (:queue, :job, :incarnation, :now)
RETURNING id"""

DONE_JOB = "DELETE FROM queue_jobs WHERE id = :id"

QUEUE_JOBS = "SELECT id, job, incarnation FROM queue_jobs WHERE queue = :queue ORDER BY id"

ADOPT_JOB = "UPDATE queue_jobs SET incarnation = :incarnation WHERE id = :id"


def for_sqlite(sql: str) -> str:
    """SQLite locks the whole database per write transaction: no row locks to ask for."""
    return sql.replace("/*LOCK*/", "")
