//! `airlock snapshot`: take, list, inspect, delete, restore and fork sandbox
//! snapshots, in this process on the home, or through the server that owns
//! it (`airlock serve`, reached over the home's socket as the other sandbox
//! commands do).
//!
//! A snapshot holds a sandbox's workspace, its container's writable layer
//! (installed packages, files outside `/workspace`) and its configuration;
//! not its running processes or interpreter contexts (docs/API.md,
//! "Snapshots").

use std::process::ExitCode;

use airlock::runtime::{Runtime, SnapshotInfo};
use anyhow::{Context, Result, bail};
use hyper::Method;
use serde_json::{Value, json};

use crate::remote::{ApiClient, encode_path};
use crate::sandbox_cli::{Home, HomeArgs};

#[derive(Debug, clap::Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a sandbox (its container is frozen for the moment the
    /// filesystem takes it; processes and open streams go on) and print its id.
    Create(CreateArgs),
    /// List snapshots, newest first: all, or one sandbox's.
    Ls(LsArgs),
    /// Print one snapshot's record as JSON (size, created, parent, configuration, ...).
    Inspect(IdArgs),
    /// Delete a snapshot (sandboxes restored or forked from it keep their files).
    Rm(IdArgs),
    /// Put the sandbox the snapshot was taken of back as it was then: files and
    /// installed packages. Its processes end and its interpreter contexts go;
    /// its container is made anew. A damaged snapshot is refused, nothing changed.
    Restore(IdArgs),
    /// Make new sandboxes from a snapshot, each with its files, packages and
    /// configuration and a running container; print each one's name and id.
    Fork(ForkArgs),
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The sandbox.
    name: String,
    /// A label of your own (at most 256 bytes).
    #[arg(long, value_name = "LABEL")]
    label: Option<String>,
    #[command(flatten)]
    home: HomeArgs,
}

#[derive(Debug, clap::Args)]
pub struct LsArgs {
    /// Only this sandbox's snapshots.
    name: Option<String>,
    /// Print the records as a JSON array instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    home: HomeArgs,
}

#[derive(Debug, clap::Args)]
pub struct IdArgs {
    /// The snapshot's id (`snap-` and 32 hex digits).
    id: String,
    #[command(flatten)]
    home: HomeArgs,
}

#[derive(Debug, clap::Args)]
pub struct ForkArgs {
    /// The snapshot's id.
    id: String,
    /// The new sandboxes' names (1 to 64, none taken).
    #[arg(required = true, value_name = "NEW_NAME")]
    names: Vec<String>,
    #[command(flatten)]
    home: HomeArgs,
}

pub async fn snapshot(command: SnapshotCommand) -> Result<ExitCode> {
    match command {
        SnapshotCommand::Create(args) => {
            let info = match args.home.reach("snapshot create").await? {
                Home::Local(runtime) => {
                    let sandbox = runtime.get(&args.name)?.with_context(|| format!("no sandbox named {}", args.name))?;
                    to_value(&sandbox.snapshot(args.label.as_deref()).await?)?
                }
                Home::Served(api) => {
                    let path = format!("/sandboxes/{}/snapshots", encode_path(&args.name));
                    api.json(Method::POST, &path, Some(&json!({ "label": args.label }))).await?
                }
            };
            println!("{}", text(&info, "id"));
        }
        SnapshotCommand::Ls(args) => {
            let infos = match args.home.reach("snapshot ls").await? {
                Home::Local(runtime) => runtime
                    .snapshots(args.name.as_deref())?
                    .iter()
                    .map(to_value)
                    .collect::<Result<Vec<_>>>()?,
                Home::Served(api) => {
                    let path = match &args.name {
                        Some(name) => format!("/sandboxes/{}/snapshots", encode_path(name)),
                        None => "/snapshots".to_string(),
                    };
                    match api.json(Method::GET, &path, None).await? {
                        Value::Array(infos) => infos,
                        other => bail!("the server listed snapshots as {other}"),
                    }
                }
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&infos)?);
            } else {
                print!("{}", table(&infos));
            }
        }
        SnapshotCommand::Inspect(args) => {
            let info = match args.home.reach("snapshot inspect").await? {
                Home::Local(runtime) => to_value(&runtime.snapshot_info(&args.id)?)?,
                Home::Served(api) => api.json(Method::GET, &snapshot_path(&args.id, ""), None).await?,
            };
            println!("{}", serde_json::to_string_pretty(&info)?);
        }
        SnapshotCommand::Rm(args) => match args.home.reach("snapshot rm").await? {
            Home::Local(runtime) => runtime.delete_snapshot(&args.id).await?,
            Home::Served(api) => {
                api.json(Method::DELETE, &snapshot_path(&args.id, ""), None).await?;
            }
        },
        SnapshotCommand::Restore(args) => {
            let name = match args.home.reach("snapshot restore").await? {
                Home::Local(runtime) => restore_local(&runtime, &args.id).await?,
                Home::Served(api) => {
                    let info = api.json(Method::POST, &snapshot_path(&args.id, "/restore"), None).await?;
                    text(&info, "name")
                }
            };
            eprintln!("airlock: sandbox {name} restored from {}", args.id);
        }
        SnapshotCommand::Fork(args) => {
            let forks: Vec<(String, String)> = match args.home.reach("snapshot fork").await? {
                Home::Local(runtime) => runtime
                    .fork_snapshot(&args.id, &args.names, None)
                    .await?
                    .iter()
                    .map(|sandbox| (sandbox.name().to_string(), sandbox.id().to_string()))
                    .collect(),
                Home::Served(api) => fork_remote(&api, &args).await?,
            };
            for (name, id) in forks {
                println!("{name} {id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Restores snapshot `id` into the sandbox it was taken of, which must still
/// be there (the same sandbox, not a new one under its name); its name.
async fn restore_local(runtime: &Runtime, id: &str) -> Result<String> {
    let info = runtime.snapshot_info(id)?;
    let sandbox = runtime
        .get(&info.sandbox_name)?
        .filter(|sandbox| sandbox.id().to_string() == info.sandbox_id)
        .with_context(|| {
            format!("the sandbox snapshot {} was taken of is gone; fork the snapshot instead", info.id)
        })?;
    sandbox.restore(&info.id).await?;
    Ok(info.sandbox_name)
}

async fn fork_remote(api: &ApiClient, args: &ForkArgs) -> Result<Vec<(String, String)>> {
    let body = json!({ "names": args.names });
    match api.json(Method::POST, &snapshot_path(&args.id, "/fork"), Some(&body)).await? {
        Value::Array(forks) => Ok(forks.iter().map(|fork| (text(fork, "name"), text(fork, "id"))).collect()),
        other => bail!("the server answered a fork with {other}"),
    }
}

/// `/snapshots/{id}{rest}`, the id encoded (the server checks it).
fn snapshot_path(id: &str, rest: &str) -> String {
    format!("/snapshots/{}{rest}", encode_path(id).replace('/', "%2F"))
}

fn to_value(info: &SnapshotInfo) -> Result<Value> {
    Ok(serde_json::to_value(info)?)
}

fn text(value: &Value, key: &str) -> String {
    match &value[key] {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The listing: one line per snapshot, a header first.
fn table(infos: &[Value]) -> String {
    let mut out = format!(
        "{:<37} {:<24} {:<20} {:>8} {:>10} {:<5} {}\n",
        "ID", "SANDBOX", "CREATED (UTC)", "FILES", "SIZE", "LAYER", "LABEL"
    );
    for info in infos {
        let created = info["created_at_ms"].as_u64().map(utc).unwrap_or_default();
        let size = info["bytes"].as_u64().map(airlock::limits::format_size).unwrap_or_default();
        let layer = if info["layer"].as_bool() == Some(true) { "yes" } else { "no" };
        out.push_str(&format!(
            "{:<37} {:<24} {:<20} {:>8} {:>10} {:<5} {}\n",
            text(info, "id"),
            text(info, "sandbox_name"),
            created,
            text(info, "files"),
            size,
            layer,
            text(info, "label"),
        ));
    }
    out
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc(ms: u64) -> String {
    let seconds = ms / 1000;
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rest / 3600, rest % 3600 / 60, rest % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_print_as_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        // 2026-12-03 18:44:42 UTC.
        assert_eq!(utc(1_796_323_482_000), "2026-12-03 18:44:42");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
    }

    #[test]
    fn an_id_stays_one_path_segment() {
        assert_eq!(snapshot_path("../x", "/restore"), "/snapshots/..%2Fx/restore");
        assert_eq!(snapshot_path("snap-00", ""), "/snapshots/snap-00");
    }
}
