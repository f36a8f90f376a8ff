//! The registry: sandboxes and the usage ledger in embedded SQLite
//! (`$AIRLOCK_HOME/airlock.db`, WAL).
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

use crate::config::SandboxConfig;
use crate::error::{Error, Result};

/// How long a write waits for another connection's lock (another process on
/// the same home) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
const SCHEMA_VERSION: i64 = 1;

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
        let connection = Connection::open(path).map_err(Error::store(path))?;
        connection.busy_timeout(BUSY_TIMEOUT).map_err(Error::store(path))?;
        let mode: String =
            connection.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0)).map_err(Error::store(path))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Store { path: path.to_path_buf(), reason: format!("journal mode is {mode}, not WAL") });
        }
        connection.execute_batch("PRAGMA synchronous = NORMAL;").map_err(Error::store(path))?;
        let version: i64 =
            connection.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(Error::store(path))?;
        if version > SCHEMA_VERSION {
            return Err(Error::Store {
                path: path.to_path_buf(),
                reason: format!("schema version {version} is newer than this Airlock's ({SCHEMA_VERSION})"),
            });
        }
        connection.execute_batch(SCHEMA).map_err(Error::store(path))?;
        connection.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}")).map_err(Error::store(path))?;
        Ok(Self { path: path.to_path_buf(), connection: Mutex::new(connection) })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.connection.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn err(&self) -> impl FnOnce(rusqlite::Error) -> Error + '_ {
        Error::store(&self.path)
    }

    /// Adds a sandbox; `Ok(false)` when the name is taken.
    pub fn insert(&self, record: &SandboxRecord) -> Result<bool> {
        let config = serde_json::to_string(&record.config)
            .map_err(|e| Error::Invalid { what: "sandbox config", reason: e.to_string() })?;
        let inserted = self.lock().execute(
            "INSERT INTO sandboxes (id, name, created_at_ms, config, state, escalated, container_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (name) DO NOTHING",
            params![
                record.id.to_string(),
                record.name.as_str(),
                millis(record.created_at),
                config,
                record.state.as_str(),
                record.escalated,
                record.container_id
            ],
        );
        Ok(inserted.map_err(self.err())? == 1)
    }

    pub fn by_name(&self, name: &SandboxName) -> Result<Option<SandboxRecord>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached(
                "SELECT id, name, created_at_ms, config, state, escalated, container_id FROM sandboxes WHERE name = ?1",
            )
            .map_err(self.err())?;
        let row = statement.query_row(params![name.as_str()], read_row).optional().map_err(self.err())?;
        row.transpose()
    }

    pub fn list(&self) -> Result<Vec<SandboxRecord>> {
        let connection = self.lock();
        let mut statement = connection
            .prepare_cached(
                "SELECT id, name, created_at_ms, config, state, escalated, container_id FROM sandboxes ORDER BY name",
            )
            .map_err(self.err())?;
        let rows = statement.query_map([], read_row).map_err(self.err())?;
        let mut records = Vec::new();
        for row in rows {
            records.push(row.map_err(self.err())??);
        }
        Ok(records)
    }

    pub fn delete(&self, id: SandboxId) -> Result<()> {
        self.lock().execute("DELETE FROM sandboxes WHERE id = ?1", params![id.to_string()]).map_err(self.err())?;
        Ok(())
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

type Row = (String, String, i64, String, String, Option<String>, Option<String>);

fn read_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Result<SandboxRecord>> {
    let raw: Row = (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?, row.get(6)?);
    Ok(decode(raw))
}

fn decode((id, name, created_at, config, state, escalated, container_id): Row) -> Result<SandboxRecord> {
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
    })
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

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("airlock.db");
        Connection::open(&path).unwrap().execute_batch("PRAGMA user_version = 99").unwrap();
        let error = Store::open(&path).unwrap_err().to_string();
        assert!(error.contains("newer"), "{error}");
    }
}
