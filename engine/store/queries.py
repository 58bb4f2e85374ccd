"""Every SQL statement of the SQL run stores, by name, and the schema migrations.

One place to review how a claim, a finish or a recovery is written. The
queries use named parameters (``:name``, bound by the driver) and only SQL
that SQLite (>= 3.35) and PostgreSQL both accept: ``ON CONFLICT ... DO
UPDATE``, ``RETURNING``, partial indexes. The marker ``/*LOCK*/`` is where
PostgreSQL puts ``FOR UPDATE SKIP LOCKED``; SQLite serialises writers with
``BEGIN IMMEDIATE`` instead and drops the marker. The PostgreSQL store runs the
same statements through :func:`for_postgres` (``:name`` -> ``$n``, the lock
marker filled in), the same migrations through :func:`postgres_ddl`, and has
its own statements only where one set-based statement replaces a loop of
SQLite's (claims, heartbeats and finishes of many runs at once: the
``PG_`` statements below).

Claim tokens are ``"<seq>.<random>"``: the seq makes every token check a
primary-key lookup, the random part makes a token of an earlier claim of the
same row useless.
"""

from __future__ import annotations

import re

#: the newest schema this code knows; a database with a higher version is refused
SCHEMA_VERSION = 9

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
    (
        3,
        "node CPU and RSS, cluster events",
        [
            "ALTER TABLE nodes ADD COLUMN cpu_percent DOUBLE PRECISION",
            "ALTER TABLE nodes ADD COLUMN rss_bytes BIGINT",
            # every node's events, for the nodes and dashboards of a cluster (events="postgres");
            # ``skipped``: progress events of the node coalesced away just before this one
            """
            CREATE TABLE events (
                id       INTEGER PRIMARY KEY AUTOINCREMENT,
                node     TEXT NOT NULL,
                seq      BIGINT NOT NULL,
                skipped  INTEGER NOT NULL DEFAULT 0,
                ts       DOUBLE PRECISION NOT NULL,
                body     TEXT NOT NULL
            )""",
        ],
    ),
    (
        4,
        "no index on (status, seq)",
        [
            # every transition of every run rewrote two of its entries (a fifth of a run's
            # statement time on SQLite); what reads by status has its own partial index
            # (pending, running, finished), and only counts() by every status scans the table
            "DROP INDEX IF EXISTS runs_status",
        ],
    ),
    (
        5,
        "operation nonces on queue jobs and periodic slots, the bus of each event",
        [
            # an operation of the PostgreSQL store tried again after its connection was cut
            # (the server may have committed before the cut) finds what its first try wrote
            # by the nonce of the call: the jobs it put or adopted, the slot it claimed
            "ALTER TABLE queue_jobs ADD COLUMN nonce TEXT",
            "ALTER TABLE periodic ADD COLUMN nonce TEXT",
            # the bus that numbered an event (one per relay): a batch written again after its
            # commit answer was lost inserts nothing, and a reader tells a repeat from a restart
            "ALTER TABLE events ADD COLUMN bus TEXT",
            "CREATE UNIQUE INDEX events_bus_seq ON events (node, bus, seq)",
        ],
    ),
    (
        6,
        "queue job handovers",
        [
            # delivery is at least once: a handler told its job was handed over from a holder
            # that ended (ctx.attempt > 1) can check before doing what must not happen twice
            "ALTER TABLE queue_jobs ADD COLUMN handovers INTEGER NOT NULL DEFAULT 0",
        ],
    ),
    (
        7,
        "the server's time of each cluster event",
        [
            # pruning by age reads the server's clock at both ends: by the emitting node's time
            # stamp, a node whose clock ran behind by more than max_age lost its events at once
            "ALTER TABLE events ADD COLUMN stored_at DOUBLE PRECISION",
        ],
    ),
    (
        8,
        "trigger keys held by the incarnation that saved them",
        [
            # every node sharing the store counts its own notifies under the trigger's name: a
            # key's row is its saver's (a node takes up only its own rows and those of holders
            # that are gone, so a key's saved count fires once). A primary key cannot change in
            # place in SQLite: the table is made anew. Rows saved before have no holder (''),
            # which no incarnation is, so the first node to start the trigger takes them up.
            # ``nonce``: the adoption that wrote the row (PostgreSQL's retry after a cut)
            """
            CREATE TABLE trigger_keys_held (
                trigger_name   TEXT NOT NULL,
                holder         TEXT NOT NULL DEFAULT '',
                counter_key    TEXT NOT NULL,
                count          BIGINT NOT NULL,
                captured       BIGINT NOT NULL,
                first_seen_at  DOUBLE PRECISION,
                last_run_at    DOUBLE PRECISION,
                run_id         TEXT,
                last_run_id    TEXT,
                last_status    TEXT,
                nonce          TEXT,
                PRIMARY KEY (trigger_name, holder, counter_key)
            )""",
            """
            INSERT INTO trigger_keys_held (trigger_name, holder, counter_key, count, captured, first_seen_at,
                                           last_run_at, run_id, last_run_id, last_status)
            SELECT trigger_name, '', counter_key, count, captured, first_seen_at, last_run_at, run_id,
                   last_run_id, last_status
            FROM trigger_keys""",
            "DROP TABLE trigger_keys",
            "ALTER TABLE trigger_keys_held RENAME TO trigger_keys",
        ],
    ),
    (
        9,
        "pending runs waiting for their dedup key",
        [
            # a retry that finds its key held by another pending run waits for it (KEY_WAITING):
            # once the holder left pending, a submit with the key is answered with the waiting run
            # rather than queueing one more. Few rows, if any: the index costs next to nothing
            "CREATE INDEX runs_key_waiting ON runs (task, dedup_key, seq) "
            "WHERE status = 'pending' AND dedup_key IS NOT NULL AND dedup_slot IS NULL",
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

#: the oldest pending run of a task with a dedup key it could not take: a retry (or a run
#: recovered, or handed back) whose key another pending run held then (REQUEUE_CLAIMED)
KEY_WAITING = """
SELECT seq, id FROM runs
WHERE task = :task AND dedup_key = :key AND status = 'pending' AND dedup_slot IS NULL
ORDER BY seq
LIMIT 1"""

#: KEY_WAITING's run takes its key (no other run holds it: KEY_HOLDER found none)
TAKE_KEY = "UPDATE runs SET dedup_slot = dedup_key WHERE seq = :seq AND status = 'pending' AND dedup_slot IS NULL"

#: KEY_HOLDER, else KEY_WAITING's run, which takes its key, in one round trip (PostgreSQL)
PG_KEY_HOLDER_OR_WAITING = """
WITH holder AS (
    SELECT id FROM runs WHERE task = :task AND dedup_slot = :key
), waiting AS (
    UPDATE runs SET dedup_slot = dedup_key
    WHERE seq = (
        SELECT seq FROM runs
        WHERE task = :task AND dedup_key = :key AND status = 'pending' AND dedup_slot IS NULL
        ORDER BY seq
        LIMIT 1
    ) AND NOT EXISTS (SELECT 1 FROM holder)
    RETURNING id
)
SELECT id FROM holder UNION ALL SELECT id FROM waiting
LIMIT 1"""

RUN_ID_EXISTS = "SELECT 1 FROM runs WHERE id = :id"

COUNT_PENDING = "SELECT COUNT(*) FROM runs WHERE status = 'pending'"

#: the due pending runs of one task, oldest first; run once per task the node may claim
CLAIM_CANDIDATES = """
SELECT seq, id, task, params, attempt, max_attempts, created_at, dedup_key, source, lost_count, error
FROM runs
WHERE status = 'pending' AND task = :task AND run_after <= :now
ORDER BY seq
LIMIT :n
/*LOCK*/"""

#: runs of one task running now, on any node (a cluster-wide concurrency limit's count)
COUNT_RUNNING_TASK = "SELECT COUNT(*) FROM runs WHERE status = 'running' AND task = :task"

#: a claim starts an attempt, whose progress is its own: the last attempt's is cleared
CLAIM_TAKE = """
UPDATE runs
SET status = 'running', owner_node = :node, owner_incarnation = :incarnation,
    claim_token = :token, lease_until = :lease_until, started_at = :now, dedup_slot = NULL,
    progress_done = 0, progress_total = NULL, progress_message = ''
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

#: CLAIM_STATE for a write that acts on what it reads (PostgreSQL): the row stays locked
#: until the transaction ends, so a cancel requested meanwhile waits and is not overwritten
PG_CLAIM_STATE_LOCKED = CLAIM_STATE + "\nFOR UPDATE"

#: a claimed run ends; returns nothing when the token is stale. A cancel requested while its
#: outcome was on its way keeps its reason only if the run ends cancelled: one that succeeded or
#: failed was not cancelled, and its row says so as the node that ran it does
END_CLAIMED = """
UPDATE runs
SET status = :status, finished_at = :now, result = :result, error = COALESCE(:error, error),
    cancel_reason = CASE WHEN :status = 'cancelled' THEN COALESCE(:cancel_reason, cancel_reason) END,
    lost_count = lost_count + :lost,
    claim_token = NULL, lease_until = NULL, dedup_slot = NULL
WHERE seq = :seq AND claim_token = :token AND status = 'running'
RETURNING id"""

#: END_CLAIMED for a success, without RETURNING: SQLite gathers a RETURNING clause's rows in a
#: temporary table first, a third of the statement's cost on every run; the row count says
#: whether the token was current (SQLite, every run that succeeds)
SUCCEED_CLAIMED = """
UPDATE runs
SET status = 'succeeded', finished_at = :now, result = :result, cancel_reason = NULL,
    claim_token = NULL, lease_until = NULL, dedup_slot = NULL
WHERE seq = :seq AND claim_token = :token AND status = 'running'"""

#: the last progress of an attempt that ended (heartbeats write it only now and then), with its outcome
ENDED_PROGRESS = """
UPDATE runs SET progress_done = :done, progress_total = :total, progress_message = :message WHERE seq = :seq"""

#: a claimed run goes back to pending (retry, or its worker was lost), retaking its key if free;
#: ``added`` is 1 for an attempt its node's graceful stop cut short (see models.Retry.cut_short)
REQUEUE_CLAIMED = """
UPDATE runs
SET status = 'pending', attempt = attempt + :step, max_attempts = max_attempts + :added,
    lost_count = lost_count + :lost,
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

#: the running claims recovery found lost, locked (PostgreSQL reads every running claim
#: without a lock first, so healthy claims are never locked by another node's recovery)
PG_LOCK_CLAIMS = """
SELECT seq, id, task, owner_node, owner_incarnation, claim_token, lease_until,
       cancel_requested, lost_count, on_lost, attempt
FROM runs
WHERE seq = ANY(CAST(:seqs AS bigint[])) AND status = 'running'
FOR UPDATE SKIP LOCKED"""

#: the rows of many ids at once (PostgreSQL: one array parameter)
PG_GET_RUNS = f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ANY(CAST(:ids AS text[]))"

#: newest first; every filter is optional (NULL disables it; the casts tell PostgreSQL its type)
QUERY_RUNS = f"""
SELECT {RUN_COLUMNS}
FROM runs
WHERE (CAST(:before AS BIGINT) IS NULL OR seq < :before)
  AND (CAST(:status AS TEXT) IS NULL OR status = :status)
  AND (CAST(:task AS TEXT) IS NULL OR task = :task)
  AND (CAST(:since AS DOUBLE PRECISION) IS NULL OR created_at >= :since)
ORDER BY seq DESC
LIMIT :limit"""

#: the counts by status and the totals in one statement, so in one snapshot: read apart, a
#: run inserted between them shows in the totals and not yet in the counts
COUNTS = """
SELECT 'status', status, COUNT(*) FROM runs GROUP BY status
UNION ALL
SELECT 'total', name, value FROM totals"""

ADD_TOTAL = "UPDATE totals SET value = value + :delta WHERE name = :name"

PRUNE_OLDER = f"DELETE FROM runs WHERE {FINISHED} AND finished_at < :cutoff"

#: the runs that ended last, whatever their place in the queue: read newest first off the
#: runs_finished index, which stops at the limit
RECENTLY_FINISHED = f"SELECT {RUN_COLUMNS} FROM runs WHERE {FINISHED} ORDER BY finished_at DESC, seq DESC LIMIT :limit"

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

NODE_COLUMNS = "node, incarnation, version, started_at, last_heartbeat, running, stopped_at, cpu_percent, rss_bytes"

GET_NODE = f"SELECT {NODE_COLUMNS} FROM nodes WHERE incarnation = :incarnation"
#: nodes that ran on the store a moment ago (a migration must not change the schema under them)
LIVE_NODES = "SELECT DISTINCT node FROM nodes WHERE stopped_at IS NULL AND last_heartbeat >= :since ORDER BY node"

ALL_NODES = f"SELECT {NODE_COLUMNS} FROM nodes ORDER BY registered_seq"

#: also whether a later start of the node id registered since (the newest by ``started_at``,
#: registration order breaking ties, as ``gone_incarnations`` decides): the others then count
#: this incarnation gone, and it must stop claiming. A start time that is no time (changed by
#: hand: PostgreSQL's 'NaN' and 'Infinity' sort above every number, SQLite's text above every
#: number too) is no later start: below 1e308 in both, a time is a number
NODE_HEARTBEAT = """
UPDATE nodes SET last_heartbeat = :now, running = :running, cpu_percent = :cpu_percent, rss_bytes = :rss_bytes
WHERE incarnation = :incarnation
RETURNING EXISTS (SELECT 1 FROM nodes AS later
                  WHERE later.node = nodes.node AND later.incarnation <> nodes.incarnation
                    AND later.started_at < 1e308
                    AND (later.started_at > nodes.started_at
                         OR (later.started_at = nodes.started_at AND later.registered_seq > nodes.registered_seq)))"""

#: true when a later start of :incarnation's node id registered, as NODE_HEARTBEAT judges it:
#: every node counts it gone and recovers what it holds at once, so it may claim nothing (a
#: process resumed from a pause shorter than a lease would otherwise claim before its next
#: heartbeat told it, and its runs would run twice)
REPLACED_INCARNATION = """EXISTS (
    SELECT 1 FROM nodes AS me JOIN nodes AS later
        ON later.node = me.node AND later.incarnation <> me.incarnation
    WHERE me.incarnation = :incarnation
      AND later.started_at < 1e308
      AND (later.started_at > me.started_at
           OR (later.started_at = me.started_at AND later.registered_seq > me.registered_seq)))"""

#: whether the incarnation has not heartbeaten for ``node_ttl`` (a process paused, a network cut
#: off): it claims nothing until a heartbeat goes through (no row proves nothing)
LAPSED_INCARNATION = """EXISTS (
    SELECT 1 FROM nodes WHERE incarnation = :incarnation
    AND last_heartbeat < CAST(:now AS float8) - CAST(:node_ttl AS float8))"""

NODE_STOPPED = "UPDATE nodes SET stopped_at = :now, running = 0 WHERE incarnation = :incarnation"

#: incarnations that stopped, or fell silent and were replaced by a later start of the same
#: node id, before the cutoff (one silent and not replaced may still come back: it stays)
PRUNE_NODES = """
DELETE FROM nodes
WHERE (stopped_at IS NOT NULL AND stopped_at < :cutoff)
   OR (stopped_at IS NULL AND last_heartbeat < :cutoff
       AND EXISTS (SELECT 1 FROM nodes AS later
                   WHERE later.node = nodes.node AND later.registered_seq > nodes.registered_seq))"""

# ---------------------------------------------------------------- small durable state

GET_PERIODIC = "SELECT last_fire FROM periodic WHERE name = :name"

SET_PERIODIC = """
INSERT INTO periodic (name, last_fire) VALUES (:name, :fired_at)
ON CONFLICT (name) DO UPDATE SET last_fire = excluded.last_fire"""

TRIGGER_KEY_COLUMNS = "count, captured, first_seen_at, last_run_at, run_id, last_run_id, last_status"

#: the incarnations holding saved keys of a trigger ('' for rows saved before keys had holders)
TRIGGER_HOLDERS = "SELECT DISTINCT holder FROM trigger_keys WHERE trigger_name = :trigger"

#: the keys of a trigger other holders than one have saved
TRIGGER_KEYS_ELSEWHERE = (
    "SELECT DISTINCT counter_key FROM trigger_keys WHERE trigger_name = :trigger AND holder <> :holder"
)

#: the keys of a trigger one holder has saved rows of
TRIGGER_KEYS_HELD = "SELECT counter_key FROM trigger_keys WHERE trigger_name = :trigger AND holder = :holder"

#: one holder's saved keys of a trigger
HELD_TRIGGER_KEYS = f"""
SELECT counter_key, {TRIGGER_KEY_COLUMNS} FROM trigger_keys WHERE trigger_name = :trigger AND holder = :holder"""

#: one key of a trigger as one holder saved it
HELD_TRIGGER_KEY = f"""
SELECT {TRIGGER_KEY_COLUMNS} FROM trigger_keys
WHERE trigger_name = :trigger AND holder = :holder AND counter_key = :key"""

#: every saved key of the holders taken up (PostgreSQL): rows another node is taking up right now
#: are locked, and skipped, so each row has one taker
PG_TAKE_TRIGGER_KEYS = f"""
SELECT holder, counter_key, {TRIGGER_KEY_COLUMNS} FROM trigger_keys
WHERE trigger_name = :trigger AND holder = ANY(CAST(:holders AS text[]))
FOR UPDATE SKIP LOCKED"""

#: the rows this incarnation's adoption of this nonce wrote, committed by a try whose answer a cut lost
PG_TRIGGER_KEYS_ADOPTED_AS = f"""
SELECT counter_key, {TRIGGER_KEY_COLUMNS} FROM trigger_keys
WHERE trigger_name = :trigger AND holder = :holder AND nonce = :nonce"""

#: this incarnation's own rows of some keys (PostgreSQL), to merge what it takes up into
PG_HELD_TRIGGER_KEYS_OF = f"""
SELECT counter_key, {TRIGGER_KEY_COLUMNS} FROM trigger_keys
WHERE trigger_name = :trigger AND holder = :holder AND counter_key = ANY(CAST(:keys AS text[]))
FOR UPDATE"""

SAVE_TRIGGER_KEY = f"""
INSERT INTO trigger_keys (trigger_name, holder, counter_key, {TRIGGER_KEY_COLUMNS}, nonce)
VALUES (:trigger, :holder, :key, :count, :captured, :first_seen_at, :last_run_at, :run_id, :last_run_id,
        :last_status, :nonce)
ON CONFLICT (trigger_name, holder, counter_key) DO UPDATE SET
    count = excluded.count, captured = excluded.captured, first_seen_at = excluded.first_seen_at,
    last_run_at = excluded.last_run_at, run_id = excluded.run_id, last_run_id = excluded.last_run_id,
    last_status = excluded.last_status, nonce = excluded.nonce"""

FORGET_TRIGGER_KEY = (
    "DELETE FROM trigger_keys WHERE trigger_name = :trigger AND holder = :holder AND counter_key = :key"
)

#: every row of a holder taken up (SQLite: its write transaction keeps others out meanwhile)
FORGET_TRIGGER_HOLDER = "DELETE FROM trigger_keys WHERE trigger_name = :trigger AND holder = :holder"

# ---------------------------------------------------------------- queue jobs

PUT_JOB = """
INSERT INTO queue_jobs (queue, job, incarnation, created_at) VALUES (:queue, :job, :incarnation, :now)
RETURNING id"""

DONE_JOB = "DELETE FROM queue_jobs WHERE id = :id"

QUEUE_JOBS = """
SELECT id, job, incarnation, handovers FROM queue_jobs WHERE queue = :queue ORDER BY id
/*LOCK*/"""

ADOPT_JOB = "UPDATE queue_jobs SET incarnation = :incarnation, handovers = handovers + 1 WHERE id = :id"

#: PUT_JOB, QUEUE_JOBS and ADOPT_JOB with the nonce of the call that writes (PostgreSQL): a
#: put or an adoption tried again after a cut finds the rows its first try wrote
PG_PUT_JOB = """
INSERT INTO queue_jobs (queue, job, incarnation, created_at, nonce) VALUES (:queue, :job, :incarnation, :now, :nonce)
RETURNING id"""
PG_JOBS_PUT_AS = "SELECT id FROM queue_jobs WHERE queue = :queue AND nonce = :nonce ORDER BY id"
PG_QUEUE_JOBS = """
SELECT id, job, incarnation, nonce, handovers FROM queue_jobs WHERE queue = :queue ORDER BY id
FOR UPDATE SKIP LOCKED"""
PG_ADOPT_JOB = """
UPDATE queue_jobs SET incarnation = :incarnation, nonce = :nonce, handovers = handovers + 1 WHERE id = :id"""


def for_sqlite(sql: str) -> str:
    """SQLite locks the whole database per write transaction: no row locks to ask for."""
    return sql.replace("/*LOCK*/", "")


# ---------------------------------------------------------------- cluster (both dialects)

#: take a periodic slot: returns a row only for the first node to record ``slot``, and only
#: if the last slot recorded is more than ``gap`` seconds before it, or is no time: ``latest``
#: is a day after ``slot`` (rows.FIRE_AHEAD), and PostgreSQL's 'NaN' and 'Infinity', SQLite's
#: text (changed by hand) and a time past it (a clock that ran ahead) are not below it; each
#: would hold the task's slots on every node, for good or until that time
CLAIM_PERIODIC = """
INSERT INTO periodic (name, last_fire) VALUES (:name, :slot)
ON CONFLICT (name) DO UPDATE SET last_fire = excluded.last_fire
WHERE periodic.last_fire < excluded.last_fire - :gap
   OR NOT (periodic.last_fire < :latest)
RETURNING last_fire"""

#: a run of ``task`` not finished yet (on any node): a periodic slot then passes without one.
#: Two probes, each on a partial index (the pending ones by task; the running ones, few, by
#: status), so a long history of finished runs costs nothing here
UNFINISHED_OF_TASK = """
SELECT id FROM (SELECT id FROM runs WHERE status = 'pending' AND task = :task LIMIT 1) AS waiting
UNION ALL
SELECT id FROM (SELECT id FROM runs WHERE status = 'running' AND task = :task LIMIT 1) AS going
LIMIT 1"""

# ---------------------------------------------------------------- PostgreSQL only

#: CLAIM_PERIODIC recording the claim's nonce. The row this very call wrote is taken again
#: (unchanged): a claim tried again after a cut, whose first try was committed, still wins
#: its slot, and a slot another call took is not mistaken for its own. Judged on the row as
#: committed once its lock is had, so a first try that commits while the second waits is seen
PG_CLAIM_PERIODIC = """
INSERT INTO periodic (name, last_fire, nonce) VALUES (:name, :slot, :nonce)
ON CONFLICT (name) DO UPDATE SET last_fire = excluded.last_fire, nonce = excluded.nonce
WHERE periodic.last_fire < excluded.last_fire - :gap
   OR NOT (periodic.last_fire < :latest)
   OR (periodic.nonce = excluded.nonce AND periodic.last_fire = excluded.last_fire)
RETURNING last_fire"""

#: one lock for every node migrating at once (CREATE TABLE IF NOT EXISTS races otherwise)
PG_MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(7418990301)"

#: serialises inserts that check ``max_pending``, so two nodes cannot both fill the last slot
PG_PENDING_LOCK = "SELECT pg_advisory_xact_lock(7418990302)"

PG_NOW = "SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8"

#: serialises the claims of tasks with a cluster-wide concurrency limit, one lock per task
#: (taken in sorted order, so two claims never wait on each other's locks in a cycle); a claim
#: that holds it counts the task's running runs after every earlier claim of it has committed
PG_TASK_LOCKS = """
SELECT pg_advisory_xact_lock(74189903, hashtext(s.task))
FROM (SELECT DISTINCT u.task FROM unnest(CAST(:tasks AS text[])) AS u(task) ORDER BY u.task) AS s"""

#: claim up to :slots due runs, oldest first, at most :limits[i] of :tasks[i], and for a task
#: with a cluster-wide cap (:caps[i] not NULL) no more than leaves it at that many running;
#: rows another node is claiming are skipped, not waited for. Tokens are "<seq>.<nonce>":
#: one nonce per call. Each claim starts an attempt with no progress (see CLAIM_TAKE).
PG_CLAIM = """
UPDATE runs
SET status = 'running', owner_node = :node, owner_incarnation = :incarnation,
    claim_token = runs.seq::text || '.' || :nonce, lease_until = :lease_until,
    started_at = :now, dedup_slot = NULL,
    progress_done = 0, progress_total = NULL, progress_message = ''
WHERE runs.seq IN (
    SELECT c.seq
    FROM unnest(CAST(:tasks AS text[]), CAST(:limits AS int[]), CAST(:caps AS int[])) AS t(task, n, cap)
    CROSS JOIN LATERAL (
        SELECT seq FROM runs AS r
        WHERE r.status = 'pending' AND r.task = t.task AND r.run_after <= :now
        ORDER BY r.seq
        LIMIT CASE
            WHEN t.cap IS NULL THEN t.n
            ELSE GREATEST(0, LEAST(t.n, t.cap - (
                SELECT COUNT(*) FROM runs AS x WHERE x.status = 'running' AND x.task = t.task
            )))
        END
        FOR UPDATE SKIP LOCKED
    ) AS c
    -- evaluated once per statement: a replaced incarnation, or one whose registration has
    -- lapsed (the others may count it gone and recover what it holds), locks no row at all
    WHERE NOT """ + REPLACED_INCARNATION + """ AND NOT """ + LAPSED_INCARNATION + """
    ORDER BY c.seq
    LIMIT :slots
) AND runs.status = 'pending'
RETURNING seq, id, task, params, attempt, max_attempts, created_at, dedup_key, source, lost_count,
          error, claim_token"""

#: the runs a claim with this nonce already took: a claim tried again after its connection
#: was cut may have been committed before the cut (same columns as PG_CLAIM's RETURNING)
PG_CLAIMED_WITH_NONCE = """
SELECT seq, id, task, params, attempt, max_attempts, created_at, dedup_key, source, lost_count,
       error, claim_token
FROM runs
WHERE owner_incarnation = :incarnation AND status = 'running' AND claim_token LIKE '%.' || :nonce"""

#: what an earlier try of a write cut off after its commit left: runs it ended (at its own
#: ``now``, to the microsecond), or a retry it re-queued (with its own due time and error)
PG_ENDED_AT = """
SELECT seq, id, status FROM runs
WHERE seq = ANY(CAST(:seqs AS bigint[])) AND finished_at = :now AND claim_token IS NULL"""
PG_REQUEUED_AS = "SELECT 1 FROM runs WHERE seq = :seq AND run_after = :run_after AND error = :error"

#: the ids of a batch of new runs that are in the table already (an insert tried again after
#: its connection was cut: the first try may have been committed before the cut)
PG_IDS_PRESENT = "SELECT id, task, created_at FROM runs WHERE id = ANY(CAST(:ids AS text[]))"

#: ``PG_CLAIM`` for the tasks without a cap (:caps all NULL), and in the same round trip the
#: capped tasks of :peek that have due runs waiting, as rows whose id is NULL: only those are
#: then claimed under their locks (``PG_TASK_LOCKS``), so a node with capped tasks pays for
#: the locks only while such runs wait
PG_CLAIM_AND_PEEK = f"""
WITH claimed AS ({PG_CLAIM})
SELECT seq, id, task, params, attempt, max_attempts, created_at, dedup_key, source, lost_count, error,
       claim_token
FROM claimed
UNION ALL
SELECT NULL::bigint, NULL::text, p.task, NULL::text, NULL::int, NULL::int, NULL::float8, NULL::text,
       NULL::text, NULL::int, NULL::text, NULL::text
FROM unnest(CAST(:peek AS text[])) AS p(task)
WHERE EXISTS (
    SELECT 1 FROM runs AS w WHERE w.status = 'pending' AND w.task = p.task AND w.run_after <= :now
)"""

#: insert many runs in one statement (``INSERT_RUN`` for each element of the arrays) and count
#: them in the totals; with :max_pending, nothing is inserted if the pending runs would then
#: be more than that. Returns how many were inserted.
PG_INSERT_MANY = """
WITH inserted AS (
    INSERT INTO runs (id, task, params, status, max_attempts, created_at, run_after,
                      dedup_key, dedup_slot, source, on_lost)
    SELECT r.id, r.task, r.params, 'pending', r.max_attempts, r.created_at, r.run_after,
           r.key, r.key, r.source, r.on_lost
    FROM unnest(CAST(:ids AS text[]), CAST(:tasks AS text[]), CAST(:params AS text[]),
                CAST(:max_attempts AS int[]), CAST(:created_ats AS float8[]), CAST(:run_afters AS float8[]),
                CAST(:keys AS text[]), CAST(:sources AS text[]), CAST(:on_losts AS text[]))
         AS r(id, task, params, max_attempts, created_at, run_after, key, source, on_lost)
    WHERE CAST(:max_pending AS bigint) IS NULL
       OR (SELECT COUNT(*) FROM runs WHERE status = 'pending') + cardinality(CAST(:ids AS text[]))
          <= :max_pending
    RETURNING 1
), counted AS (
    UPDATE totals SET value = value + (SELECT COUNT(*) FROM inserted)
    WHERE name = 'inserted' AND EXISTS (SELECT 1 FROM inserted)
)
SELECT COUNT(*) FROM inserted"""

#: extend many claims of one incarnation; a token not returned was lost. Like the finishes
#: below, it locks its rows in seq order first: two statements that each update many of the
#: same rows (a heartbeat crossing a batch of finishes) would otherwise deadlock
PG_HEARTBEAT_MANY = """
WITH renewing AS MATERIALIZED (
    -- a row another session holds (a cancel in its transaction, say) is not waited for: one
    -- stuck lock must not keep every other claim of this node from being renewed
    SELECT seq FROM runs WHERE seq = ANY(CAST(:seqs AS bigint[])) ORDER BY seq FOR UPDATE SKIP LOCKED
), renewed AS (
    UPDATE runs
    SET lease_until = :lease_until,
        progress_done = CASE WHEN b.has THEN b.done ELSE runs.progress_done END,
        progress_total = CASE WHEN b.has THEN b.total ELSE runs.progress_total END,
        progress_message = CASE WHEN b.has THEN b.message ELSE runs.progress_message END
    FROM unnest(CAST(:seqs AS bigint[]), CAST(:tokens AS text[]), CAST(:has AS bool[]),
                CAST(:dones AS float8[]), CAST(:totals AS float8[]), CAST(:messages AS text[]))
         AS b(seq, token, has, done, total, message), renewing
    WHERE runs.seq = b.seq AND renewing.seq = b.seq AND runs.claim_token = b.token
      AND runs.owner_incarnation = :incarnation AND runs.status = 'running'
    RETURNING b.token, runs.cancel_requested, runs.cancel_reason
)
SELECT token, cancel_requested, cancel_reason, true FROM renewed
UNION ALL
-- the rows skipped as locked that were still this node's at their last commit: held, not renewed
SELECT b.token, 0, NULL, false
FROM unnest(CAST(:seqs AS bigint[]), CAST(:tokens AS text[])) AS b(seq, token)
JOIN runs ON runs.seq = b.seq
WHERE b.seq NOT IN (SELECT seq FROM renewing) AND runs.claim_token = b.token
  AND runs.owner_incarnation = :incarnation AND runs.status = 'running'"""

#: end many claimed runs at once (succeeded, failed, cancelled) and count them in the totals,
#: in one statement (so in one round trip, without a transaction around it); a token not
#: returned was stale
PG_END_MANY = """
WITH ending AS MATERIALIZED (
    SELECT seq FROM runs WHERE seq = ANY(CAST(:seqs AS bigint[])) ORDER BY seq FOR UPDATE
), ended AS (
    UPDATE runs
    SET status = b.status, finished_at = :now, result = b.result,
        error = COALESCE(b.error, runs.error), cancel_reason = COALESCE(b.reason, runs.cancel_reason),
        claim_token = NULL, lease_until = NULL, dedup_slot = NULL,
        progress_done = CASE WHEN b.has THEN b.done ELSE runs.progress_done END,
        progress_total = CASE WHEN b.has THEN b.total ELSE runs.progress_total END,
        progress_message = CASE WHEN b.has THEN b.message ELSE runs.progress_message END
    FROM unnest(CAST(:seqs AS bigint[]), CAST(:tokens AS text[]), CAST(:statuses AS text[]),
                CAST(:results AS text[]), CAST(:errors AS text[]), CAST(:reasons AS text[]),
                CAST(:has AS bool[]), CAST(:dones AS float8[]), CAST(:totals AS float8[]),
                CAST(:messages AS text[]))
         AS b(seq, token, status, result, error, reason, has, done, total, message), ending
    WHERE runs.seq = b.seq AND ending.seq = b.seq AND runs.claim_token = b.token AND runs.status = 'running'
    RETURNING b.token, runs.id, runs.status
), counted AS (
    UPDATE totals SET value = totals.value + c.n
    FROM (SELECT status, COUNT(*) AS n FROM ended GROUP BY status) AS c
    WHERE totals.name = c.status
)
SELECT token, id, status FROM ended"""

PG_NOTIFY = "SELECT pg_notify(:channel, :payload)"

# ---------------------------------------------------------------- cluster events (PostgreSQL)

#: one writer of events at a time, from taking ids to its commit: ids then commit in order,
#: so a reader that has read up to id N never finds a lower id committed after that
PG_EVENTS_LOCK = "SELECT pg_advisory_xact_lock(7418990304)"

#: one batch of one node's events, ids in the batch's order; events of the batch already
#: stored (the batch written again after its commit answer was lost) are left out
PG_INSERT_EVENTS = """
INSERT INTO events (node, bus, seq, skipped, ts, body, stored_at)
SELECT :node, :bus, e.seq, e.skipped, e.ts, e.body, extract(epoch FROM clock_timestamp())
FROM unnest(CAST(:seqs AS bigint[]), CAST(:skipped AS int[]), CAST(:tss AS float8[]), CAST(:bodies AS text[]))
     WITH ORDINALITY AS e(seq, skipped, ts, body, n)
ORDER BY e.n
ON CONFLICT (node, bus, seq) DO NOTHING"""

#: the events after the last one a reader has read, oldest first
EVENTS_AFTER = "SELECT id, skipped, body, bus FROM events WHERE id > :after ORDER BY id LIMIT :n"

LAST_EVENT_ID = "SELECT COALESCE(MAX(id), 0) FROM events"

#: a node's newest lease events stored before a time: the terms it held by then
PG_LEASE_EVENTS_BEFORE = """
SELECT body FROM events
WHERE node = :node AND COALESCE(stored_at, ts) < :before AND body LIKE '%"kind":"lease.%'
ORDER BY id DESC LIMIT :limit"""

#: keep the newest :keep events (about: ids may have holes) and none stored before :cutoff
#: (the server's time; rows written before migration 7 have only the emitter's time stamp)
PRUNE_EVENTS = (
    "DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - :keep OR COALESCE(stored_at, ts) < :cutoff"
)

_NAME = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


def for_postgres(sql: str) -> tuple[str, tuple[str, ...]]:
    """``sql`` with ``:name`` turned into ``$n`` (a name used twice is one parameter) and the
    lock marker into row locks that skip rows another node holds; and the names in ``$n`` order."""
    names: list[str] = []

    def number(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    return _NAME.sub(number, sql.replace("/*LOCK*/", "FOR UPDATE SKIP LOCKED")), tuple(names)


def postgres_ddl(sql: str) -> str:
    """A migration statement of :data:`MIGRATIONS` in PostgreSQL's dialect."""
    return sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
