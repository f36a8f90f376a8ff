//! The registry: sandboxes, the usage ledger and the API's bearer tokens in
//! embedded SQLite (`$AIRLOCK_HOME/airlock.db`, WAL).
//!
//! Every change is one transaction committed before the call returns, so what
//! a caller was told is done survives the process being killed (kill -9):
//! WAL with `synchronous=NORMAL` is durable against a process crash; a power
//! loss may lose the last transactions.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use airlock_core::{SandboxId, SandboxName, TierKind};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::SandboxConfig;
use crate::error::{Error, Result};

/// How long a write waits for another connection's lock (another process on
/// the same home) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Version 1: sandboxes and executions. Version 2 adds, without touching what
/// is there: the sandboxes' `owner` column and the `tokens` table. Version 3
/// adds the `previews` table (exposed ports). Version 4 adds the `secrets`
/// table (the egress credentials; see `secrets.rs`). Version 5 adds the
/// `egress` table (every decision of the egress proxy). Version 6 adds the
/// `snapshots` and `snapshot_origins` tables (`snapshot.rs`). Version 7 adds
/// the `contexts` and `context_history` tables (interpreter contexts kept
/// across sleep and restarts, see [`SCHEMA_CONTEXTS`]).
const SCHEMA_VERSION: i64 = 7;

/// Version 1, as it was made: kept so that a new home passes through the same
/// migrations as an old one.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL,
    config TEXT NOT NULL,
    state TEXT NOT NULL,
    escalated TEXT,
    container_id TEXT
);
CREATE TABLE IF NOT EXISTS executions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox_id TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    tier TEXT NOT NULL,
    wall_us INTEGER NOT NULL,
    cpu_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS executions_by_sandbox ON executions (sandbox_id, started_at_ms);
";

/// Version 2's new table: API tokens, by id, with the SHA-256 of the whole
/// token (never the token). A revoked token keeps its row (and its id, which
/// its sandboxes' `owner` names) with `revoked_at_ms` set; a live token's
/// name is unique among live tokens.
const SCHEMA_TOKENS: &str = "
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash BLOB NOT NULL,
    admin INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    revoked_at_ms INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS tokens_live_name ON tokens (name) WHERE revoked_at_ms IS NULL;
";

/// Version 3's new table: a sandbox's exposed ports (preview URLs), with the
/// SHA-256 of each one's preview token (never the token). Rows go with their
/// sandbox ([`Store::delete`]).
const SCHEMA_PREVIEWS: &str = "
CREATE TABLE IF NOT EXISTS previews (
    sandbox_id TEXT NOT NULL,
    port INTEGER NOT NULL,
    hash BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (sandbox_id, port)
);
";

/// Version 4's new table: the runtime's secrets (credentials the egress
/// proxy adds to requests), by name. The value is kept as given: the home is
/// private to the runtime's user ([`crate::PRIVATE_DIR_MODE`]) and no
/// sandbox directory holds it. Deleted rows are overwritten (`secure_delete`).
const SCHEMA_SECRETS: &str = "
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
";

/// Version 5's new table: one row per decision of the egress proxy (a
/// request, or a tunnel), for usage and audit. Kept after their sandbox is
/// destroyed, as its executions are: they are its usage history.
const SCHEMA_EGRESS: &str = "
CREATE TABLE IF NOT EXISTS egress (
    sandbox_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    method TEXT,
    verdict TEXT NOT NULL,
    status INTEGER,
    bytes_up INTEGER NOT NULL,
    bytes_down INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS egress_by_sandbox ON egress (sandbox_id, at_ms);
";

/// Version 7's new tables: a sandbox's interpreter contexts (`contexts.rs`),
/// one row each, and the code each ran successfully, one row per kept
/// evaluation, numbered by `seq`, to be replayed when the context is rebuilt
/// (after a sleep or a restart) or forked. The rows of a context are bounded
/// by the history's caps ([`crate::MAX_REPLAY_EVALUATIONS`],
/// [`crate::MAX_REPLAY_BYTES`], and the side effects an evaluation records),
/// and the contexts of a sandbox by its `max_contexts`. They go with their
/// context and with their sandbox.
const SCHEMA_CONTEXTS: &str = "
CREATE TABLE IF NOT EXISTS contexts (
    sandbox_id TEXT NOT NULL,
    id TEXT NOT NULL,
    language TEXT NOT NULL,
    options TEXT NOT NULL,
    tier TEXT NOT NULL,
    truncated INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (sandbox_id, id)
);
CREATE TABLE IF NOT EXISTS context_history (
    sandbox_id TEXT NOT NULL,
    context_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    code TEXT NOT NULL,
    side_effects TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, context_id, seq)
);
";

/// One interpreter context as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredContext {
    pub id: String,
    pub language: airlock_core::Language,
    pub options: crate::contexts::ContextOptions,
    /// Where it lives (and is rebuilt): isolate, or container once it moved.
    pub tier: TierKind,
    /// Earlier evaluations were dropped by the caps.
    pub truncated: bool,
    /// Its history, oldest first, with sequence numbers.
    pub history: Vec<(u64, crate::contexts::Replayable)>,
}

fn tier_text(tier: TierKind) -> &'static str {
    match tier {
        TierKind::Container => "container",
        _ => "isolate",
    }
}

fn seq_value(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

/// Opens `path` in WAL mode and brings its schema to [`SCHEMA_VERSION`], in
/// one immediate transaction (two processes opening one home at once migrate
/// it once). Migrations only add: a home made by an older Airlock opens with
/// everything it had.
fn open_connection(path: &Path) -> Result<Connection> {
    let connection = Connection::open(path).map_err(Error::store(path))?;
    connection.busy_timeout(BUSY_TIMEOUT).map_err(Error::store(path))?;
    let mode: String =
        connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).map_err(Error::store(path))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Store { path: path.to_path_buf(), reason: format!("journal mode is {mode}, not WAL") });
    }
    // secure_delete: a removed or replaced secret's bytes are overwritten in
    // the database file, not left in a free page.
    connection.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA secure_delete = ON;").map_err(Error::store(path))?;
    connection.execute_batch("BEGIN IMMEDIATE").map_err(Error::store(path))?;
    match migrate(&connection, path) {
        Ok(()) => connection.execute_batch("COMMIT").map_err(Error::store(path))?,
        Err(error) => {
            let _ = connection.execute_batch("ROLLBACK");
            return Err(error);
        }
    }
    Ok(connection)
}

fn migrate(connection: &Connection, path: &Path) -> Result<()> {
    let version: i64 = connection.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(Error::store(path))?;
    if version > SCHEMA_VERSION {
        return Err(Error::Store {
            path: path.to_path_buf(),
            reason: format!("schema version {version} is newer than this Airlock's ({SCHEMA_VERSION})"),
        });
    }
    connection.execute_batch(SCHEMA).map_err(Error::store(path))?;
    // Version 2: the tenant that made a sandbox through the API (a token's id).
    let has_owner: bool = connection
        .query_row("SELECT COUNT(*) FROM pragma_table_info('sandboxes') WHERE name = 'owner'", [], |row| row.get(0))
        .map_err(Error::store(path))?;
    if !has_owner {
        connection.execute_batch("ALTER TABLE sandboxes ADD COLUMN owner TEXT").map_err(Error::store(path))?;
    }
    connection.execute_batch(SCHEMA_TOKENS).map_err(Error::store(path))?;
    connection.execute_batch(SCHEMA_PREVIEWS).map_err(Error::store(path))?;
    connection.execute_batch(SCHEMA_SECRETS).map_err(Error::store(path))?;
    connection.execute_batch(SCHEMA_EGRESS).map_err(Error::store(path))?;
    connection.execute_batch(crate::snapshot::SCHEMA_SNAPSHOTS).map_err(Error::store(path))?;
    connection.execute_batch(SCHEMA_CONTEXTS).map_err(Error::store(path))?;
    connection.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}")).map_err(Error::store(path))?;
    Ok(())
}

/// Whether a sandbox is up or asleep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Active,
    /// Its container is stopped and its contexts dropped; the next request wakes it.
    Sleeping,
}

impl SandboxState {
    fn as_str(self) -> &'static str {
        match self {
            SandboxState::Active => "active",
            SandboxState::Sleeping => "sleeping",
        }
    }

    fn parse(text: &str) -> Self {
        if text == "sleeping" { SandboxState::Sleeping } else { SandboxState::Active }
    }
}

/// One sandbox as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SandboxRecord {
    pub id: SandboxId,
    pub name: SandboxName,
    pub created_at: SystemTime,
    pub config: SandboxConfig,
    pub state: SandboxState,
    /// Why the sandbox first escalated to the container tier, once it has.
    pub escalated: Option<String>,
    pub container_id: Option<String>,
    /// The id of the API token it was created with; `None` for a sandbox made
    /// in process (the CLI, an embedding program), which only admin tokens see.
    pub owner: Option<String>,
}

/// What kind of request an execution was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionKind {
    Exec,
    Code,
}

/// One row of the usage ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutionRecord {
    pub sandbox_id: SandboxId,
    pub started_at: SystemTime,
    pub kind: ExecutionKind,
    pub tier: TierKind,
    pub wall_time: Duration,
    pub cpu_time: Duration,
}

/// Totals over a set of executions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct UsageTotals {
    pub executions: u64,
    pub cpu_time: Duration,
    pub wall_time: Duration,
}

#[derive(Debug)]
pub(crate) struct Store {
    path: PathBuf,
    connection: Mutex<Connection>,
}

fn millis(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)).unwrap_or(0)
}

fn from_millis(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        let connection = open_connection(path)?;
        Ok(Self { path: path.to_path_buf(), connection: Mutex::new(connection) })
    }

    /// The connection, for the snapshot records' own queries (`snapshot.rs`).
    pub(crate) fn connection(&self) -> MutexGuard<'_, Connection> {
        self.lock()
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn err(&self) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
        Error::store(&self.path)
    }

    /// Adds a sandbox; `Ok(false)` when the name is taken. Refused with
    /// [`Error::NoSuchSecret`] when its network policy names a secret the
    /// store does not hold (checked in the same transaction).
    pub fn insert(&self, record: &SandboxRecord) -> Result<bool> {
        let config = serde_json::to_string(&record.config)
            .map_err(|e| Error::Invalid { what: "sandbox config", reason: e.to_string() })?;
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(self.err())?;
        require_secrets(&transaction, &record.config, &self.path)?;
        let inserted = transaction.execute(
            "INSERT INTO sandboxes (id, name, created_at_ms, config, state, escalated, container_id, owner)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (name) DO NOTHING",
            params![
                record.id.to_string(),
                record.name.as_str(),
                millis(record.created_at),
                config,
                record.state.as_str(),
                record.escalated,
                record.container_id,
                record.owner
            ],
        );
        let inserted = inserted.map_err(Error::store(&self.path))? == 1;
        transaction.commit().map_err(self.err())?;
        Ok(inserted)
    }

    /// Replaces the stored configuration of sandbox `id` (a new network
    /// policy), after checking in the same transaction that every secret it
    /// names exists. `Ok(false)` when the sandbox is gone.
    pub(crate) fn set_config(&self, id: SandboxId, config: &SandboxConfig) -> Result<bool> {
        let text = serde_json::to_string(config)
            .map_err(|e| Error::Invalid { what: "sandbox config", reason: e.to_string() })?;
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(self.err())?;
        require_secrets(&transaction, config, &self.path)?;
        let updated = transaction
            .execute("UPDATE sandboxes SET config = ?2 WHERE id = ?1", params![id.to_string(), text])
            .map_err(Error::store(&self.path))?;
        transaction.commit().map_err(self.err())?;
        Ok(updated == 1)
    }

    /// Stores `value` as the secret `name` (replacing its value, keeping when
    /// it was first made).
    pub(crate) fn set_secret(&self, name: &str, value: &str, now: SystemTime) -> Result<()> {
        self.lock()
            .execute(
                "INSERT INTO secrets (name, value, created_at_ms, updated_at_ms) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_at_ms = excluded.updated_at_ms",
                params![name, value, millis(now)],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// The value of secret `name`.
    pub(crate) fn secret(&self, name: &str) -> Result<Option<String>> {
        let connection = self.lock();
        let mut statement =
            connection.prepare_cached("SELECT value FROM secrets WHERE name = ?1").map_err(self.err())?;
        statement.query_row(params![name], |row| row.get(0)).optional().map_err(self.err())
    }

    /// Every secret's name, when it was made and when its value last changed (never a value), by name.
    pub(crate) fn secrets(&self) -> Result<Vec<(String, SystemTime, SystemTime)>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached("SELECT name, created_at_ms, updated_at_ms FROM secrets ORDER BY name")
            .map_err(self.err())?;
        let rows = statement
            .query_map([], |row| Ok((row.get(0)?, from_millis(row.get(1)?), from_millis(row.get(2)?))))
            .map_err(self.err())?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(self.err())
    }

    /// Removes secret `name`; `Ok(false)` when there is none. Refused with
    /// [`Error::SecretInUse`] while a sandbox's stored policy names it
    /// (checked in the same transaction as the removal).
    pub(crate) fn remove_secret(&self, name: &str) -> Result<bool> {
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(self.err())?;
        let mut users = Vec::new();
        {
            let mut statement =
                transaction.prepare_cached("SELECT name, config FROM sandboxes ORDER BY name").map_err(self.err())?;
            let rows = statement
                .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)))
                .map_err(Error::store(&self.path))?;
            for row in rows {
                let (sandbox, config) = row.map_err(Error::store(&self.path))?;
                let config: SandboxConfig = serde_json::from_str(&config).map_err(|e| Error::Invalid {
                    what: "registry row",
                    reason: format!("config of {sandbox}: {e}"),
                })?;
                if config.policy.network.secret_names().any(|used| used == name) {
                    users.push(sandbox);
                }
            }
        }
        if !users.is_empty() {
            return Err(Error::SecretInUse { name: name.to_string(), sandboxes: users });
        }
        let removed = transaction.execute("DELETE FROM secrets WHERE name = ?1", params![name]).map_err(self.err())?;
        transaction.commit().map_err(Error::store(&self.path))?;
        Ok(removed > 0)
    }

    pub fn by_name(&self, name: &SandboxName) -> Result<Option<SandboxRecord>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached(
                "SELECT id, name, created_at_ms, config, state, escalated, container_id, owner FROM sandboxes WHERE name = ?1",
            )
            .map_err(self.err())?;
        let row = statement.query_row(params![name.as_str()], read_row).optional().map_err(self.err())?;
        row.transpose()
    }

    pub fn list(&self) -> Result<Vec<SandboxRecord>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached(
                "SELECT id, name, created_at_ms, config, state, escalated, container_id, owner FROM sandboxes ORDER BY name",
            )
            .map_err(self.err())?;
        let rows = statement.query_map([], read_row).map_err(self.err())?;
        let mut records = Vec::new();
        for row in rows {
            records.push(row.map_err(self.err())??);
        }
        Ok(records)
    }

    /// Removes a sandbox, its exposed ports and its contexts, in one transaction.
    pub fn delete(&self, id: SandboxId) -> Result<()> {
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(self.err())?;
        transaction
            .execute("DELETE FROM previews WHERE sandbox_id = ?1", params![id.to_string()])
            .map_err(self.err())?;
        transaction
            .execute("DELETE FROM context_history WHERE sandbox_id = ?1", params![id.to_string()])
            .map_err(self.err())?;
        transaction
            .execute("DELETE FROM contexts WHERE sandbox_id = ?1", params![id.to_string()])
            .map_err(self.err())?;
        transaction.execute("DELETE FROM sandboxes WHERE id = ?1", params![id.to_string()]).map_err(self.err())?;
        transaction.commit().map_err(self.err())?;
        Ok(())
    }

    /// Adds a context of sandbox `sandbox` with its history (a fork's copy;
    /// empty for a new context), in one transaction.
    pub(crate) fn insert_context(&self, sandbox: SandboxId, context: &StoredContext) -> Result<()> {
        let options = serde_json::to_string(&context.options)
            .map_err(|e| Error::Invalid { what: "context options", reason: e.to_string() })?;
        let sandbox = sandbox.to_string();
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(self.err())?;
        transaction
            .execute(
                "INSERT INTO contexts (sandbox_id, id, language, options, tier, truncated, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    sandbox,
                    context.id,
                    context.language.as_str(),
                    options,
                    tier_text(context.tier),
                    context.truncated,
                    millis(SystemTime::now())
                ],
            )
            .map_err(self.err())?;
        for (seq, entry) in &context.history {
            insert_history(&transaction, &sandbox, &context.id, *seq, entry).map_err(self.err())?;
        }
        transaction.commit().map_err(self.err())?;
        Ok(())
    }

    /// Keeps evaluation `seq` of a context and drops its entries before
    /// `keep_from` (the caps), in one transaction.
    pub(crate) fn add_context_history(
        &self,
        sandbox: SandboxId,
        context: &str,
        seq: u64,
        entry: &crate::contexts::Replayable,
        keep_from: u64,
        truncated: bool,
    ) -> Result<()> {
        let sandbox = sandbox.to_string();
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(self.err())?;
        insert_history(&transaction, &sandbox, context, seq, entry).map_err(self.err())?;
        transaction
            .execute(
                "DELETE FROM context_history WHERE sandbox_id = ?1 AND context_id = ?2 AND seq < ?3",
                params![sandbox, context, seq_value(keep_from)],
            )
            .map_err(self.err())?;
        transaction
            .execute(
                "UPDATE contexts SET truncated = ?3 WHERE sandbox_id = ?1 AND id = ?2",
                params![sandbox, context, truncated],
            )
            .map_err(self.err())?;
        transaction.commit().map_err(self.err())?;
        Ok(())
    }

    /// Empties a context's history (it lost its state).
    pub(crate) fn clear_context_history(&self, sandbox: SandboxId, context: &str) -> Result<()> {
        let sandbox = sandbox.to_string();
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(self.err())?;
        transaction
            .execute("DELETE FROM context_history WHERE sandbox_id = ?1 AND context_id = ?2", params![sandbox, context])
            .map_err(self.err())?;
        transaction
            .execute("UPDATE contexts SET truncated = 0 WHERE sandbox_id = ?1 AND id = ?2", params![sandbox, context])
            .map_err(self.err())?;
        transaction.commit().map_err(self.err())?;
        Ok(())
    }

    /// Records where a context lives now (it moved to the container).
    pub(crate) fn set_context_tier(&self, sandbox: SandboxId, context: &str, tier: TierKind) -> Result<()> {
        self.lock()
            .execute(
                "UPDATE contexts SET tier = ?3 WHERE sandbox_id = ?1 AND id = ?2",
                params![sandbox.to_string(), context, tier_text(tier)],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Removes a context and its history.
    pub(crate) fn delete_context(&self, sandbox: SandboxId, context: &str) -> Result<()> {
        let sandbox = sandbox.to_string();
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(self.err())?;
        transaction
            .execute("DELETE FROM context_history WHERE sandbox_id = ?1 AND context_id = ?2", params![sandbox, context])
            .map_err(self.err())?;
        transaction
            .execute("DELETE FROM contexts WHERE sandbox_id = ?1 AND id = ?2", params![sandbox, context])
            .map_err(self.err())?;
        transaction.commit().map_err(self.err())?;
        Ok(())
    }

    /// Removes every context of sandbox `sandbox` and their histories.
    pub(crate) fn delete_contexts(&self, sandbox: SandboxId) -> Result<()> {
        let sandbox = sandbox.to_string();
        let mut connection = self.lock();
        let transaction = connection.transaction().map_err(self.err())?;
        transaction
            .execute("DELETE FROM context_history WHERE sandbox_id = ?1", params![sandbox])
            .map_err(self.err())?;
        transaction.execute("DELETE FROM contexts WHERE sandbox_id = ?1", params![sandbox]).map_err(self.err())?;
        transaction.commit().map_err(self.err())?;
        Ok(())
    }

    /// The contexts of sandbox `sandbox`, oldest first, without their
    /// histories (read with [`context_history`](Self::context_history) when
    /// one is rebuilt: a sleeping context holds no history in memory).
    pub(crate) fn contexts(&self, sandbox: SandboxId) -> Result<Vec<StoredContext>> {
        let sandbox = sandbox.to_string();
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached(
                "SELECT id, language, options, tier, truncated FROM contexts WHERE sandbox_id = ?1
                 ORDER BY created_at_ms, id",
            )
            .map_err(self.err())?;
        let rows = statement
            .query_map(params![sandbox], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, String>(3)?,
                    row.get::<_, bool>(4)?,
                ))
            })
            .map_err(self.err())?;
        let rows = rows.collect::<rusqlite::Result<Vec<_>>>().map_err(self.err())?;
        let mut contexts = Vec::with_capacity(rows.len());
        for (id, language, options, tier, truncated) in rows {
            let language = language.parse().map_err(|e| bad_context("language", &id, format!("{e}")))?;
            let options = serde_json::from_str(&options).map_err(|e| bad_context("options", &id, e.to_string()))?;
            let tier = if tier == "container" { TierKind::Container } else { TierKind::Isolate };
            contexts.push(StoredContext { id, language, options, tier, truncated, history: Vec::new() });
        }
        Ok(contexts)
    }

    /// A context's kept history, oldest first, and whether its caps dropped
    /// earlier entries.
    pub(crate) fn context_history(
        &self,
        sandbox: SandboxId,
        context: &str,
    ) -> Result<(Vec<(u64, crate::contexts::Replayable)>, bool)> {
        let sandbox = sandbox.to_string();
        let connection = self.lock();
        let truncated: bool = connection
            .prepare_cached("SELECT truncated FROM contexts WHERE sandbox_id = ?1 AND id = ?2")
            .map_err(self.err())?
            .query_row(params![sandbox, context], |row| row.get(0))
            .optional()
            .map_err(self.err())?
            .unwrap_or(false);
        let mut statement = connection
            .prepare_cached(
                "SELECT seq, code, side_effects FROM context_history WHERE sandbox_id = ?1 AND context_id = ?2
                 ORDER BY seq",
            )
            .map_err(self.err())?;
        let entries = statement
            .query_map(params![sandbox, context], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?))
            })
            .map_err(self.err())?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(self.err())?;
        let mut kept = Vec::with_capacity(entries.len());
        for (seq, code, effects) in entries {
            let side_effects =
                serde_json::from_str(&effects).map_err(|e| bad_context("side effects", context, e.to_string()))?;
            kept.push((u64::try_from(seq).unwrap_or(0), crate::contexts::Replayable { code, side_effects }));
        }
        Ok((kept, truncated))
    }

    /// Records `port` of sandbox `id` as exposed, with the SHA-256 of its
    /// preview token; an earlier exposure of the port is replaced (its token
    /// stops working).
    pub(crate) fn expose(&self, id: SandboxId, port: u16, hash: &[u8], created_at: SystemTime) -> Result<()> {
        self.lock()
            .execute(
                "INSERT INTO previews (sandbox_id, port, hash, created_at_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (sandbox_id, port) DO UPDATE SET hash = excluded.hash, created_at_ms = excluded.created_at_ms",
                params![id.to_string(), port, hash, millis(created_at)],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Forgets the exposure of `port`; `Ok(false)` when it was not exposed.
    pub(crate) fn unexpose(&self, id: SandboxId, port: u16) -> Result<bool> {
        let removed = self
            .lock()
            .execute("DELETE FROM previews WHERE sandbox_id = ?1 AND port = ?2", params![id.to_string(), port])
            .map_err(self.err())?;
        Ok(removed > 0)
    }

    /// The exposed ports of sandbox `id`, with when each was exposed, by port.
    pub(crate) fn exposed(&self, id: SandboxId) -> Result<Vec<(u16, SystemTime)>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached("SELECT port, created_at_ms FROM previews WHERE sandbox_id = ?1 ORDER BY port")
            .map_err(self.err())?;
        let rows = statement
            .query_map(params![id.to_string()], |row| Ok((row.get::<_, u16>(0)?, from_millis(row.get(1)?))))
            .map_err(self.err())?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(self.err())
    }

    /// Whether `port` of sandbox `id` is exposed with a token whose SHA-256
    /// is `hash` (compared in constant time).
    pub(crate) fn preview_allows(&self, id: SandboxId, port: u16, hash: &[u8]) -> Result<bool> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached("SELECT hash FROM previews WHERE sandbox_id = ?1 AND port = ?2")
            .map_err(self.err())?;
        let stored: Option<Vec<u8>> =
            statement.query_row(params![id.to_string(), port], |row| row.get(0)).optional().map_err(self.err())?;
        Ok(stored.is_some_and(|stored| same_digest(&stored, hash)))
    }

    pub fn set_state(&self, id: SandboxId, state: SandboxState) -> Result<()> {
        self.lock()
            .execute("UPDATE sandboxes SET state = ?2 WHERE id = ?1", params![id.to_string(), state.as_str()])
            .map_err(self.err())?;
        Ok(())
    }

    pub fn set_container(&self, id: SandboxId, container_id: Option<&str>) -> Result<()> {
        self.lock()
            .execute("UPDATE sandboxes SET container_id = ?2 WHERE id = ?1", params![id.to_string(), container_id])
            .map_err(self.err())?;
        Ok(())
    }

    /// Records the first escalation's reason; later ones keep the first.
    pub fn set_escalated(&self, id: SandboxId, reason: &str) -> Result<()> {
        self.lock()
            .execute(
                "UPDATE sandboxes SET escalated = ?2 WHERE id = ?1 AND escalated IS NULL",
                params![id.to_string(), reason],
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub fn record_execution(&self, record: &ExecutionRecord) -> Result<()> {
        let kind = match record.kind {
            ExecutionKind::Exec => "exec",
            ExecutionKind::Code => "code",
        };
        self.lock()
            .execute(
                "INSERT INTO executions (sandbox_id, started_at_ms, kind, tier, wall_us, cpu_us) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    record.sandbox_id.to_string(),
                    millis(record.started_at),
                    kind,
                    record.tier.to_string(),
                    micros(record.wall_time),
                    micros(record.cpu_time)
                ],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Totals of the executions of `sandbox` (all when `None`) that started in `[since, until)`.
    pub fn usage(
        &self,
        sandbox: Option<SandboxId>,
        since: SystemTime,
        until: SystemTime,
        tier: Option<TierKind>,
    ) -> Result<UsageTotals> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached(
                "SELECT COUNT(*), COALESCE(SUM(cpu_us), 0), COALESCE(SUM(wall_us), 0) FROM executions
                 WHERE (?1 IS NULL OR sandbox_id = ?1) AND started_at_ms >= ?2 AND started_at_ms < ?3
                   AND (?4 IS NULL OR tier = ?4)",
            )
            .map_err(self.err())?;
        let (count, cpu, wall): (i64, i64, i64) = statement
            .query_row(
                params![sandbox.map(|id| id.to_string()), millis(since), millis(until), tier.map(|t| t.to_string())],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )
            .map_err(self.err())?;
        Ok(UsageTotals {
            executions: u64::try_from(count).unwrap_or(0),
            cpu_time: Duration::from_micros(u64::try_from(cpu).unwrap_or(0)),
            wall_time: Duration::from_micros(u64::try_from(wall).unwrap_or(0)),
        })
    }
}

/// One decision of the egress proxy, as recorded.
#[derive(Debug, Clone)]
pub(crate) struct EgressRecord {
    pub sandbox_id: SandboxId,
    pub at: SystemTime,
    pub host: String,
    pub port: u16,
    pub method: Option<String>,
    /// `allowed`, or the denial's label (`policy_denied`, `forbidden_address`, ...).
    pub verdict: String,
    pub status: Option<u16>,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// Totals over a set of egress decisions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EgressTotals {
    /// Requests (and tunnels) the proxy let through.
    pub allowed: u64,
    /// Requests (and tunnels) it refused.
    pub denied: u64,
    /// Bytes from the sandbox to upstreams.
    pub bytes_up: u64,
    /// Bytes from upstreams to the sandbox.
    pub bytes_down: u64,
}

impl Store {
    pub(crate) fn record_egress(&self, record: &EgressRecord) -> Result<()> {
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.lock()
            .prepare_cached(
                "INSERT INTO egress (sandbox_id, at_ms, host, port, method, verdict, status, bytes_up, bytes_down)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .and_then(|mut statement| {
                statement.execute(params![
                    record.sandbox_id.to_string(),
                    millis(record.at),
                    record.host,
                    record.port,
                    record.method,
                    record.verdict,
                    record.status,
                    clamp(record.bytes_up),
                    clamp(record.bytes_down)
                ])
            })
            .map_err(self.err())?;
        Ok(())
    }

    /// Totals of the egress decisions for `sandbox` (all when `None`) in `[since, until)`.
    pub(crate) fn egress_usage(&self, sandbox: Option<SandboxId>, since: SystemTime, until: SystemTime) -> Result<EgressTotals> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached(
                "SELECT COALESCE(SUM(verdict = 'allowed'), 0), COALESCE(SUM(verdict != 'allowed'), 0),
                        COALESCE(SUM(bytes_up), 0), COALESCE(SUM(bytes_down), 0) FROM egress
                 WHERE (?1 IS NULL OR sandbox_id = ?1) AND at_ms >= ?2 AND at_ms < ?3",
            )
            .map_err(self.err())?;
        let (allowed, denied, up, down): (i64, i64, i64, i64) = statement
            .query_row(params![sandbox.map(|id| id.to_string()), millis(since), millis(until)], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
            })
            .map_err(self.err())?;
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(EgressTotals { allowed: count(allowed), denied: count(denied), bytes_up: count(up), bytes_down: count(down) })
    }
}

/// What every API token starts with: says what it is to a reader and to secret scanners.
pub const TOKEN_PREFIX: &str = "airlock_";
/// Random bytes of a token's id. The id is not secret (`airlock token list`
/// shows it, a sandbox's `owner` names it); it finds the row to compare with.
const TOKEN_ID_BYTES: usize = 8;
/// Random bytes of a token's secret part, from the OS: 256 bits, so guessing
/// is hopeless and a plain SHA-256 (no salt, no stretching) is a safe thing to store.
const TOKEN_SECRET_BYTES: usize = 32;
/// Longest token a request may present: the real ones are far shorter; a
/// longer header value is refused before it is hashed.
pub const MAX_TOKEN_BYTES: usize = 256;
/// Longest token name (chosen by whoever makes the token, shown by `list`).
pub const MAX_TOKEN_NAME: usize = 64;

/// An API token as the registry keeps it: never its secret, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// Public and stable: `token list` shows it; sandboxes made with the token name it as their owner.
    pub id: String,
    pub name: String,
    /// An admin token sees every sandbox, whoever made it.
    pub admin: bool,
    pub created_at: SystemTime,
    /// When it was revoked; a revoked token is refused from then on.
    pub revoked_at: Option<SystemTime>,
}

/// A token just made: the only time its secret exists outside its holder.
pub struct NewToken {
    pub info: TokenInfo,
    secret: String,
}

impl NewToken {
    /// The whole token, to hand to its holder once (the registry keeps only its hash).
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken").field("info", &self.info).field("secret", &"<redacted>").finish()
    }
}

/// The API's bearer tokens, in the home's registry (`airlock.db`), over a
/// connection of its own: `airlock token` uses it beside a running server
/// (WAL lets both at the file), and a revocation holds from the server's
/// next request.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    connection: Mutex<Connection>,
}

impl TokenStore {
    /// The tokens of the home `home` (which must exist), migrating its registry when older.
    pub fn open(home: &Path) -> Result<Self> {
        let path = home.join(crate::runtime::DATABASE_FILE);
        let connection = open_connection(&path)?;
        Ok(Self { path, connection: Mutex::new(connection) })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Makes a token named `name` (unique among live tokens: letters, digits,
    /// `.`, `_`, `-`, at most [`MAX_TOKEN_NAME`]) with fresh randomness from
    /// the OS, and stores its hash.
    pub fn create(&self, name: &str, admin: bool) -> Result<NewToken> {
        check_token_name(name)?;
        let id = random_hex(TOKEN_ID_BYTES)?;
        let secret = format!("{TOKEN_PREFIX}{id}_{}", random_hex(TOKEN_SECRET_BYTES)?);
        let hash = Sha256::digest(secret.as_bytes()).to_vec();
        // Kept to the millisecond, as the registry keeps it.
        let created_at = from_millis(millis(SystemTime::now()));
        let inserted = self.lock().execute(
            "INSERT INTO tokens (id, name, hash, admin, created_at_ms, revoked_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
            params![id, name, hash, admin, millis(created_at)],
        );
        match inserted {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(failure, _))
                if failure.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                return Err(Error::Invalid {
                    what: "token name",
                    reason: format!("a live token is named {name:?} already"),
                });
            }
            Err(other) => return Err(Error::store(&self.path)(other)),
        }
        Ok(NewToken { info: TokenInfo { id, name: name.to_string(), admin, created_at, revoked_at: None }, secret })
    }

    /// Every token, revoked ones too, oldest first.
    pub fn list(&self) -> Result<Vec<TokenInfo>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached(
                "SELECT id, name, admin, created_at_ms, revoked_at_ms FROM tokens ORDER BY created_at_ms, id",
            )
            .map_err(Error::store(&self.path))?;
        let rows = statement.query_map([], read_token).map_err(Error::store(&self.path))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(Error::store(&self.path))
    }

    /// Revokes the live token whose id (first) or name is `which`; `None` when
    /// no live token has it. Its row stays, so its sandboxes keep their owner
    /// (only admin tokens see them from now on).
    pub fn revoke(&self, which: &str) -> Result<Option<TokenInfo>> {
        let connection = self.lock();
        let live = |column: &str| {
            connection
                .query_row(
                    &format!(
                        "SELECT id, name, admin, created_at_ms, revoked_at_ms FROM tokens
                         WHERE {column} = ?1 AND revoked_at_ms IS NULL"
                    ),
                    params![which],
                    read_token,
                )
                .optional()
        };
        let found = match live("id").map_err(Error::store(&self.path))? {
            Some(token) => Some(token),
            None => live("name").map_err(Error::store(&self.path))?,
        };
        let Some(mut token) = found else { return Ok(None) };
        let now = from_millis(millis(SystemTime::now()));
        connection
            .execute(
                "UPDATE tokens SET revoked_at_ms = ?2 WHERE id = ?1 AND revoked_at_ms IS NULL",
                params![token.id, millis(now)],
            )
            .map_err(Error::store(&self.path))?;
        token.revoked_at = Some(now);
        Ok(Some(token))
    }

    /// The live token `presented` is, if it is one. The row is found by the
    /// token's id; the hashes are compared in constant time, so how long a
    /// refusal takes says nothing of how close the guess was.
    pub fn verify(&self, presented: &str) -> Result<Option<TokenInfo>> {
        if presented.len() > MAX_TOKEN_BYTES {
            return Ok(None);
        }
        let Some(id) = presented
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|rest| rest.split_once('_'))
            .map(|(id, _)| id)
            .filter(|id| id.len() == TOKEN_ID_BYTES * 2 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        else {
            return Ok(None);
        };
        let digest = Sha256::digest(presented.as_bytes());
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached(
                "SELECT id, name, admin, created_at_ms, revoked_at_ms, hash FROM tokens
                 WHERE id = ?1 AND revoked_at_ms IS NULL",
            )
            .map_err(Error::store(&self.path))?;
        let row = statement
            .query_row(params![id], |row| Ok((read_token(row)?, row.get::<_, Vec<u8>>(5)?)))
            .optional()
            .map_err(Error::store(&self.path))?;
        Ok(match row {
            Some((token, hash)) => same_digest(&digest, &hash).then_some(token),
            None => {
                // The same work as a wrong secret for a known id.
                let _ = same_digest(&digest, &[0; 32]);
                None
            }
        })
    }

    /// Whether a live admin token exists.
    pub fn has_live_admin(&self) -> Result<bool> {
        self.lock()
            .query_row("SELECT EXISTS (SELECT 1 FROM tokens WHERE admin = 1 AND revoked_at_ms IS NULL)", [], |row| {
                row.get(0)
            })
            .map_err(Error::store(&self.path))
    }
}

fn read_token(row: &rusqlite::Row<'_>) -> rusqlite::Result<TokenInfo> {
    Ok(TokenInfo {
        id: row.get(0)?,
        name: row.get(1)?,
        admin: row.get(2)?,
        created_at: from_millis(row.get(3)?),
        revoked_at: row.get::<_, Option<i64>>(4)?.map(from_millis),
    })
}

fn check_token_name(name: &str) -> Result<()> {
    let invalid = |reason: &str| Err(Error::Invalid { what: "token name", reason: reason.to_string() });
    if name.is_empty() || name.len() > MAX_TOKEN_NAME {
        return invalid("it must have 1 to 64 characters");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return invalid("it may hold only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

/// Fails with [`Error::NoSuchSecret`] (the first missing one) unless every
/// secret `config`'s network policy names is in the store.
fn require_secrets(connection: &Connection, config: &SandboxConfig, path: &Path) -> Result<()> {
    let mut statement = connection
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM secrets WHERE name = ?1)")
        .map_err(Error::store(path))?;
    for name in config.policy.network.secret_names() {
        let exists: bool = statement.query_row(params![name], |row| row.get(0)).map_err(Error::store(path))?;
        if !exists {
            return Err(Error::NoSuchSecret(name.to_string()));
        }
    }
    Ok(())
}

/// Equal digests, in time that does not depend on where they differ.
fn same_digest(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// `bytes` bytes from the OS's random source (getrandom(2), waiting until it
/// is seeded), as lower-case hex.
pub(crate) fn random_hex(bytes: usize) -> Result<String> {
    let mut buffer = vec![0u8; bytes];
    let mut filled = 0;
    while filled < buffer.len() {
        match rustix::rand::getrandom(&mut buffer[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(read) => filled += read,
            Err(rustix::io::Errno::INTR) => {}
            Err(errno) => {
                return Err(Error::File {
                    operation: "read the OS random source",
                    path: "getrandom(2)".to_string(),
                    source: errno.into(),
                });
            }
        }
    }
    Ok(buffer.iter().map(|b| format!("{b:02x}")).collect())
}

type Row = (String, String, i64, String, String, Option<String>, Option<String>, Option<String>);

fn bad_context(what: &str, id: &str, reason: String) -> Error {
    Error::Invalid { what: "registry row", reason: format!("{what} of context {id}: {reason}") }
}

fn insert_history(
    connection: &Connection,
    sandbox: &str,
    context: &str,
    seq: u64,
    entry: &crate::contexts::Replayable,
) -> rusqlite::Result<usize> {
    let effects = serde_json::to_string(&entry.side_effects).unwrap_or_else(|_| "[]".to_string());
    // Only for a context that is still there: an evaluation that ends after
    // its context was deleted leaves no rows behind.
    connection.execute(
        "INSERT OR REPLACE INTO context_history (sandbox_id, context_id, seq, code, side_effects)
         SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS (SELECT 1 FROM contexts WHERE sandbox_id = ?1 AND id = ?2)",
        params![sandbox, context, seq_value(seq), entry.code, effects],
    )
}

fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<SandboxRecord>> {
    let raw: Row =
        (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?, row.get(6)?, row.get(7)?);
    Ok(decode(raw))
}

fn decode((id, name, created_at, config, state, escalated, container_id, owner): Row) -> Result<SandboxRecord> {
    let corrupt =
        |what: &str, reason: String| Error::Invalid { what: "registry row", reason: format!("{what}: {reason}") };
    Ok(SandboxRecord {
        id: id.parse().map_err(|e: airlock_core::NameError| corrupt("id", e.to_string()))?,
        name: SandboxName::new(name)?,
        created_at: from_millis(created_at),
        config: serde_json::from_str(&config).map_err(|e| corrupt("config", e.to_string()))?,
        state: SandboxState::parse(&state),
        escalated,
        container_id,
        owner,
    })
}

/// Homes as older Airlocks made them, for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) mod fixtures {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A version 3 registry at `path` (before secrets and per-host policies)
    /// holding one sandbox named `name` whose config says `"network": "deny-all"`,
    /// as the one-variant enum of that time was stored. Returns its id.
    pub fn version_3_home_with_legacy_sandbox(path: &Path, name: &str) -> SandboxId {
        let old = Connection::open(path).unwrap();
        old.execute_batch(SCHEMA).unwrap();
        old.execute_batch("ALTER TABLE sandboxes ADD COLUMN owner TEXT").unwrap();
        old.execute_batch(SCHEMA_TOKENS).unwrap();
        old.execute_batch(SCHEMA_PREVIEWS).unwrap();
        old.execute_batch("PRAGMA user_version = 3").unwrap();
        let mut config = serde_json::to_value(SandboxConfig::default()).unwrap();
        config["policy"] = serde_json::json!({ "network": "deny-all" });
        let id = SandboxId::new();
        old.execute(
            "INSERT INTO sandboxes (id, name, created_at_ms, config, state) VALUES (?1, ?2, 5, ?3, 'active')",
            params![id.to_string(), name, config.to_string()],
        )
        .unwrap();
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> SandboxRecord {
        SandboxRecord {
            id: SandboxId::new(),
            name: SandboxName::new(name).unwrap(),
            created_at: SystemTime::now(),
            config: SandboxConfig::default(),
            state: SandboxState::Active,
            escalated: None,
            container_id: None,
            owner: None,
        }
    }

    #[test]
    fn sandboxes_are_kept_by_name_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.db");
        let store = Store::open(&path).unwrap();
        let first = record("alpha");
        assert!(store.insert(&first).unwrap());
        assert!(!store.insert(&record("alpha")).unwrap(), "a second sandbox took the same name");
        store.set_escalated(first.id, "subprocess").unwrap();
        store.set_escalated(first.id, "later").unwrap();
        store.set_container(first.id, Some("c1")).unwrap();
        store.set_state(first.id, SandboxState::Sleeping).unwrap();
        drop(store);

        let store = Store::open(&path).unwrap();
        let found = store.by_name(&first.name).unwrap().unwrap();
        assert_eq!(found.id, first.id);
        assert_eq!(found.escalated.as_deref(), Some("subprocess"), "the first reason is kept");
        assert_eq!(found.container_id.as_deref(), Some("c1"));
        assert_eq!(found.state, SandboxState::Sleeping);
        assert_eq!(store.list().unwrap().len(), 1);
        store.delete(first.id).unwrap();
        assert!(store.by_name(&first.name).unwrap().is_none());
    }

    /// Contexts and their histories survive reopening, follow the caps'
    /// drops, and go with their context and their sandbox; a version 6 home
    /// (before contexts were kept) gains the tables.
    #[test]
    fn contexts_are_kept_with_their_history_and_go_with_their_sandbox() {
        use crate::contexts::{ContextOptions, Replayable};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.db");
        {
            let old = Connection::open(&path).unwrap();
            old.execute_batch(SCHEMA).unwrap();
            old.execute_batch("ALTER TABLE sandboxes ADD COLUMN owner TEXT").unwrap();
            old.execute_batch("PRAGMA user_version = 6").unwrap();
        }
        let store = Store::open(&path).unwrap();
        let sandbox = record("notebook");
        store.insert(&sandbox).unwrap();
        let entry = |code: &str| Replayable { code: code.into(), side_effects: Vec::new() };
        let context = StoredContext {
            id: "c1".into(),
            language: airlock_core::Language::Python,
            options: ContextOptions { replay_on_escalation: false },
            tier: TierKind::Isolate,
            truncated: false,
            history: vec![(0, entry("a = 1"))],
        };
        store.insert_context(sandbox.id, &context).unwrap();
        store.add_context_history(sandbox.id, "c1", 1, &entry("b = 2"), 1, true).unwrap();
        store.set_context_tier(sandbox.id, "c1", TierKind::Container).unwrap();
        store
            .insert_context(sandbox.id, &StoredContext { id: "c2".into(), history: Vec::new(), ..context.clone() })
            .unwrap();
        // A context deleted while its evaluation ran leaves no row behind.
        store.delete_context(sandbox.id, "c2").unwrap();
        store.add_context_history(sandbox.id, "c2", 0, &entry("late = 1"), 0, false).unwrap();
        drop(store);

        let store = Store::open(&path).unwrap();
        let kept = store.contexts(sandbox.id).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].tier, TierKind::Container);
        assert!(kept[0].truncated);
        assert!(!kept[0].options.replay_on_escalation);
        assert!(kept[0].history.is_empty(), "histories are read when a context is rebuilt");
        assert_eq!(store.context_history(sandbox.id, "c1").unwrap(), (vec![(1, entry("b = 2"))], true));
        let orphans: i64 = store
            .lock()
            .query_row("SELECT COUNT(*) FROM context_history WHERE context_id = 'c2'", [], |row| row.get(0))
            .unwrap();
        assert_eq!(orphans, 0);
        store.clear_context_history(sandbox.id, "c1").unwrap();
        assert_eq!(store.context_history(sandbox.id, "c1").unwrap(), (Vec::new(), false));
        store.add_context_history(sandbox.id, "c1", 2, &entry("c = 3"), 2, false).unwrap();
        store.delete(sandbox.id).unwrap();
        let rows: i64 = store
            .lock()
            .query_row("SELECT (SELECT COUNT(*) FROM contexts) + (SELECT COUNT(*) FROM context_history)", [], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(rows, 0);
    }

    #[test]
    fn usage_sums_by_sandbox_window_and_tier() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("airlock.db")).unwrap();
        let (a, b) = (SandboxId::new(), SandboxId::new());
        let now = SystemTime::now();
        for (sandbox, tier, cpu_ms, ago) in [
            (a, TierKind::Isolate, 10, 0),
            (a, TierKind::Container, 1000, 0),
            (b, TierKind::Container, 5, 0),
            (a, TierKind::Isolate, 7, 3600),
        ] {
            store
                .record_execution(&ExecutionRecord {
                    sandbox_id: sandbox,
                    started_at: now - Duration::from_secs(ago),
                    kind: ExecutionKind::Exec,
                    tier,
                    wall_time: Duration::from_millis(cpu_ms * 2),
                    cpu_time: Duration::from_millis(cpu_ms),
                })
                .unwrap();
        }
        let end = now + Duration::from_secs(1);
        let recent = store.usage(Some(a), now - Duration::from_secs(60), end, None).unwrap();
        assert_eq!(recent.executions, 2);
        assert_eq!(recent.cpu_time, Duration::from_millis(1010));
        assert_eq!(recent.wall_time, Duration::from_millis(2020));
        let all = store.usage(None, UNIX_EPOCH, end, None).unwrap();
        assert_eq!(all.executions, 4);
        let containers = store.usage(None, UNIX_EPOCH, end, Some(TierKind::Container)).unwrap();
        assert_eq!(containers.cpu_time, Duration::from_millis(1005));
    }

    /// A home made by schema version 1 (before tokens and owners) opens: its
    /// sandboxes stay, with no owner, and it gains the tokens table.
    #[test]
    fn a_version_1_home_opens_and_keeps_its_sandboxes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(SCHEMA).unwrap();
        old.execute_batch("PRAGMA user_version = 1").unwrap();
        let id = SandboxId::new();
        old.execute(
            "INSERT INTO sandboxes (id, name, created_at_ms, config, state) VALUES (?1, 'old-one', 5, ?2, 'active')",
            params![id.to_string(), serde_json::to_string(&SandboxConfig::default()).unwrap()],
        )
        .unwrap();
        drop(old);

        let store = Store::open(&path).unwrap();
        let found = store.by_name(&SandboxName::new("old-one").unwrap()).unwrap().unwrap();
        assert_eq!(found.id, id);
        assert_eq!(found.owner, None, "a sandbox from before tenants belongs to none");
        let mut owned = record("new-one");
        owned.owner = Some("0123456789abcdef".into());
        assert!(store.insert(&owned).unwrap());
        assert_eq!(store.by_name(&owned.name).unwrap().unwrap().owner.as_deref(), Some("0123456789abcdef"));
        let tokens = TokenStore::open(dir.path()).unwrap();
        assert!(tokens.list().unwrap().is_empty());
        drop((store, tokens));
        // Opening again migrates nothing twice.
        let store = Store::open(&path).unwrap();
        assert_eq!(store.list().unwrap().len(), 2);
        let version: i64 = store.lock().query_row("PRAGMA user_version", [], |row| row.get(0)).unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }

    #[test]
    fn tokens_verify_until_revoked_and_only_their_hash_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = TokenStore::open(dir.path()).unwrap();
        let admin = tokens.create("admin", true).unwrap();
        let tenant = tokens.create("ci", false).unwrap();
        assert!(admin.secret().starts_with(TOKEN_PREFIX));
        assert!(admin.secret().len() >= 80, "{} is short", admin.secret().len());
        assert_ne!(admin.secret(), tenant.secret());
        assert!(!format!("{tenant:?}").contains(tenant.secret()), "Debug shows the secret");

        assert_eq!(tokens.verify(admin.secret()).unwrap(), Some(admin.info.clone()));
        assert!(tokens.verify(tenant.secret()).unwrap().is_some_and(|t| !t.admin && t.name == "ci"));
        assert!(tokens.has_live_admin().unwrap());
        // A changed last character, the right id with another secret, garbage: none passes.
        let mut wrong = tenant.secret().to_string();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        let other_secret = format!("{TOKEN_PREFIX}{}_{}", tenant.info.id, "0".repeat(64));
        for presented in [wrong.as_str(), other_secret.as_str(), "", "airlock_", "Bearer x", &"a".repeat(10_000)] {
            assert_eq!(tokens.verify(presented).unwrap(), None, "{presented:.40} passed");
        }
        // A live name is taken; names are checked.
        assert!(tokens.create("ci", false).is_err());
        assert!(tokens.create("bad name", false).is_err());
        assert!(tokens.create("", false).is_err());

        let revoked = tokens.revoke("ci").unwrap().unwrap();
        assert_eq!(revoked.id, tenant.info.id);
        assert_eq!(tokens.verify(tenant.secret()).unwrap(), None, "a revoked token passed");
        assert_eq!(tokens.revoke("ci").unwrap(), None, "revoked twice");
        assert!(tokens.revoke(&admin.info.id).unwrap().is_some(), "revoked by id");
        assert!(!tokens.has_live_admin().unwrap());
        // The name is free again; the list keeps the revoked ones.
        tokens.create("ci", false).unwrap();
        let listed = tokens.list().unwrap();
        assert_eq!(listed.len(), 3);
        assert_eq!(listed.iter().filter(|t| t.revoked_at.is_some()).count(), 2);
        drop(tokens);

        // No secret anywhere in the home's files (the database, its WAL).
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            for secret in [admin.secret(), tenant.secret()] {
                let secret_part = secret.rsplit('_').next().unwrap().as_bytes();
                assert!(!bytes.windows(secret_part.len()).any(|w| w == secret_part), "a secret was stored");
            }
        }
    }

    /// Exposed ports: kept by hash, replaced on re-exposure, revocable, gone
    /// with their sandbox, and there after reopening (a version 2 home gains the table).
    #[test]
    fn previews_are_kept_replaced_revoked_and_go_with_their_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(SCHEMA).unwrap();
        old.execute_batch("ALTER TABLE sandboxes ADD COLUMN owner TEXT").unwrap();
        old.execute_batch(SCHEMA_TOKENS).unwrap();
        old.execute_batch("PRAGMA user_version = 2").unwrap();
        drop(old);
        let store = Store::open(&path).unwrap();
        let sandbox = record("web");
        assert!(store.insert(&sandbox).unwrap());
        let (first, second) = (Sha256::digest(b"one").to_vec(), Sha256::digest(b"two").to_vec());
        store.expose(sandbox.id, 8000, &first, SystemTime::now()).unwrap();
        assert!(store.preview_allows(sandbox.id, 8000, &first).unwrap());
        assert!(!store.preview_allows(sandbox.id, 8000, &second).unwrap());
        assert!(!store.preview_allows(sandbox.id, 8001, &first).unwrap());
        store.expose(sandbox.id, 8000, &second, SystemTime::now()).unwrap();
        assert!(!store.preview_allows(sandbox.id, 8000, &first).unwrap(), "re-exposing replaces the token");
        store.expose(sandbox.id, 3000, &first, SystemTime::now()).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        let ports: Vec<u16> = store.exposed(sandbox.id).unwrap().into_iter().map(|(port, _)| port).collect();
        assert_eq!(ports, [3000, 8000]);
        assert!(store.unexpose(sandbox.id, 3000).unwrap());
        assert!(!store.unexpose(sandbox.id, 3000).unwrap());
        assert!(!store.preview_allows(sandbox.id, 3000, &first).unwrap());
        store.delete(sandbox.id).unwrap();
        assert!(store.exposed(sandbox.id).unwrap().is_empty());
        assert!(!store.preview_allows(sandbox.id, 8000, &second).unwrap());
    }

    /// A version 3 home (before secrets and per-host policies), whose
    /// sandbox config says `"network": "deny-all"`, opens: the sandbox reads
    /// with the empty policy, and the home gains the secrets table.
    #[test]
    fn a_version_3_home_with_a_legacy_deny_all_config_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.db");
        fixtures::version_3_home_with_legacy_sandbox(&path, "legacy");

        let store = Store::open(&path).unwrap();
        let found = store.by_name(&SandboxName::new("legacy").unwrap()).unwrap().unwrap();
        assert_eq!(found.config.policy.network, airlock_core::NetworkPolicy::deny_all());
        assert!(store.secrets().unwrap().is_empty());
        store.set_secret("tok", "v1", SystemTime::now()).unwrap();
        assert_eq!(store.secret("tok").unwrap().as_deref(), Some("v1"));
    }

    /// A policy naming a missing secret is not stored (insert or update); a
    /// secret a stored policy names cannot be removed.
    #[test]
    fn policies_name_only_stored_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("airlock.db")).unwrap();
        let mut sandbox = record("user");
        let policy: airlock_core::NetworkPolicy = serde_json::from_value(serde_json::json!({
            "allow": [{ "host": "api.test", "headers": [{ "name": "Authorization", "secret": "tok" }] }]
        }))
        .unwrap();
        sandbox.config.policy.network = policy.clone();
        assert!(matches!(store.insert(&sandbox), Err(Error::NoSuchSecret(name)) if name == "tok"));
        assert!(store.by_name(&sandbox.name).unwrap().is_none(), "stored with a missing secret");
        store.set_secret("tok", "v1", SystemTime::now()).unwrap();
        assert!(store.insert(&sandbox).unwrap());
        match store.remove_secret("tok") {
            Err(Error::SecretInUse { name, sandboxes }) => {
                assert_eq!((name.as_str(), sandboxes), ("tok", vec!["user".to_string()]))
            }
            other => panic!("expected secret-in-use, got {other:?}"),
        }
        assert_eq!(store.secret("tok").unwrap().as_deref(), Some("v1"));
        let mut cleared = sandbox.config.clone();
        cleared.policy.network = airlock_core::NetworkPolicy::deny_all();
        assert!(store.set_config(sandbox.id, &cleared).unwrap());
        assert!(store.remove_secret("tok").unwrap());
        assert!(!store.remove_secret("tok").unwrap());
        assert!(matches!(store.set_config(sandbox.id, &sandbox.config), Err(Error::NoSuchSecret(_))));
        assert_eq!(store.by_name(&sandbox.name).unwrap().unwrap().config, cleared, "a refused update changed the row");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.db");
        Connection::open(&path).unwrap().execute_batch("PRAGMA user_version = 99").unwrap();
        let error = Store::open(&path).unwrap_err().to_string();
        assert!(error.contains("newer"), "{error}");
    }
}
