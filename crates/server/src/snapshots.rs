//! Sandbox snapshots: take and list a sandbox's (`/v1/sandboxes/{name}/snapshots`),
//! look at, delete, restore and fork one (`/v1/snapshots/{id}`).
//!
//! A tenant sees the snapshots of its own sandboxes only (the owner recorded
//! with the snapshot, kept after its sandbox is destroyed); another tenant's
//! is answered exactly as one that does not exist. Forks belong to the
//! caller. A damaged snapshot is `409` with the file it found changed or
//! missing, and nothing is changed. A home without the btrfs disk is `503`.

use airlock_runtime::{Error, SandboxInfo, SnapshotInfo};
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::auth::Scope;
use crate::problem::Problem;
use crate::{ApiError, AppState, Code, StrictJson};

/// Routes under `/v1` (behind the bearer token).
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/sandboxes/{name}/snapshots", post(create).get(list_of_sandbox))
        .route("/snapshots", get(list_all))
        .route("/snapshots/{id}", get(info).delete(delete))
        .route("/snapshots/{id}/restore", post(restore))
        .route("/snapshots/{id}/fork", post(fork))
}

/// `POST /v1/sandboxes/{name}/snapshots`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateSnapshot {
    /// A label of your own (at most 256 bytes, no control characters).
    #[serde(default)]
    label: Option<String>,
}

/// `POST /v1/snapshots/{id}/fork`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ForkSnapshot {
    /// The new sandboxes' names (1 to 64, none taken).
    names: Vec<String>,
}

/// Snapshot errors as answers: a missing or unseen snapshot is `404`, a
/// damaged one `409`; the rest as every route answers them.
fn answer(error: Error) -> ApiError {
    match error {
        Error::NoSuchSnapshot(id) => ApiError::not_found(format!("no snapshot {id}")),
        Error::SnapshotDamaged { .. } => ApiError::new(StatusCode::CONFLICT, Code::Conflict, error.to_string()),
        // Its reason names host paths: the answer says what, not why.
        Error::SnapshotsUnavailable(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Code::Unavailable,
            "snapshots need the home's btrfs disk (the one disk quotas use), and this server's home does not have it",
        ),
        other => other.into(),
    }
}

/// Snapshot `id`, if the caller may see it.
fn visible(state: &Scope, id: &str) -> Result<SnapshotInfo, ApiError> {
    let info = state.runtime().snapshot_info(id).map_err(answer)?;
    if state.caller().may_see(info.owner.as_deref()) {
        Ok(info)
    } else {
        Err(ApiError::not_found(format!("no snapshot {id}")))
    }
}

pub(crate) async fn create(
    state: Scope,
    Path(name): Path<String>,
    StrictJson(request): StrictJson<CreateSnapshot>,
) -> Result<(StatusCode, Json<SnapshotInfo>), ApiError> {
    let sandbox = state.sandbox(&name)?;
    let info = sandbox.snapshot(request.label.as_deref()).await.map_err(answer)?;
    Ok((StatusCode::CREATED, Json(info)))
}

pub(crate) async fn list_of_sandbox(
    state: Scope,
    Path(name): Path<String>,
) -> Result<Json<Vec<SnapshotInfo>>, ApiError> {
    Ok(Json(state.sandbox(&name)?.snapshots().map_err(answer)?))
}

pub(crate) async fn list_all(state: Scope) -> Result<Json<Vec<SnapshotInfo>>, ApiError> {
    let mut all = state.runtime().snapshots(None).map_err(answer)?;
    all.retain(|info| state.caller().may_see(info.owner.as_deref()));
    Ok(Json(all))
}

pub(crate) async fn info(state: Scope, Path(id): Path<String>) -> Result<Json<SnapshotInfo>, ApiError> {
    Ok(Json(visible(&state, &id)?))
}

pub(crate) async fn delete(state: Scope, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let info = visible(&state, &id)?;
    state.runtime().delete_snapshot(&info.id).await.map_err(answer)?;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn restore(state: Scope, Path(id): Path<String>) -> Result<Json<SandboxInfo>, ApiError> {
    let info = visible(&state, &id)?;
    let sandbox = state.runtime().get(&info.sandbox_name).ok().flatten();
    // Its own sandbox only: the one it was taken of, still there.
    let sandbox = match sandbox {
        Some(sandbox) if sandbox.id().to_string() == info.sandbox_id => state.sandbox(&info.sandbox_name)?,
        _ => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                Code::Conflict,
                format!("the sandbox snapshot {} was taken of is gone; fork the snapshot instead", info.id),
            ));
        }
    };
    sandbox.restore(&info.id).await.map_err(answer)?;
    Ok(Json(sandbox.info()))
}

pub(crate) async fn fork(
    state: Scope,
    Path(id): Path<String>,
    StrictJson(body): StrictJson<ForkSnapshot>,
) -> Result<(StatusCode, Json<Vec<SandboxInfo>>), ApiError> {
    let info = visible(&state, &id)?;
    let forks = state.runtime().fork_snapshot(&info.id, &body.names, state.caller().owner()).await.map_err(answer)?;
    Ok((StatusCode::CREATED, Json(forks.iter().map(|sandbox| sandbox.info()).collect())))
}

// What the OpenAPI document says of these routes.

/// A snapshot of a sandbox: its workspace, its container's writable layer and its configuration.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = SnapshotInfo)]
#[allow(dead_code)] // Read by the OpenAPI document only.
pub(crate) struct SnapshotDoc {
    /// `snap-` and 32 hex digits.
    id: String,
    /// The sandbox it was taken of (which may since have been destroyed).
    sandbox_id: String,
    sandbox_name: String,
    /// The API token that owns it (its sandbox's), `null` for one made in process.
    owner: Option<String>,
    /// The snapshot its sandbox was last restored or forked from, else the sandbox's previous snapshot.
    parent: Option<String>,
    label: Option<String>,
    /// Milliseconds since the Unix epoch.
    created_at_ms: u64,
    /// Files of every type in the workspace and the container layer.
    files: u64,
    /// Bytes of its regular files (shared copy-on-write with its sandbox and other snapshots, not what it adds to the disk).
    bytes: u64,
    /// Whether the container's writable layer (installed packages, files outside `/workspace`) is in it.
    layer: bool,
    /// The image its layer sits on.
    image: Option<String>,
    /// The sandbox's configuration when it was taken (forks get it).
    #[schema(value_type = Object)]
    config: serde_json::Value,
    /// SHA-256 of its manifest, checked before every restore or fork.
    manifest_sha256: String,
    /// How long the container was frozen while it was taken, in microseconds.
    paused_us: u64,
}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/snapshots", tag = "snapshots", request_body = CreateSnapshot,
    params(("name" = String, Path, description = "The sandbox's name")),
    responses(
        (status = 201, description = "Taken: the container was frozen for the moment the filesystem took it; processes and open streams go on", body = SnapshotDoc),
        (status = 415, description = "Not a JSON body", body = Problem, content_type = "application/problem+json"),
    ))]
#[allow(dead_code)] // Read by the OpenAPI document only.
pub(crate) fn create_snapshot_doc() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/snapshots", tag = "snapshots",
    params(("name" = String, Path, description = "The sandbox's name")),
    responses((status = 200, description = "The sandbox's snapshots, newest first", body = Vec<SnapshotDoc>)))]
#[allow(dead_code)] // Read by the OpenAPI document only.
pub(crate) fn list_sandbox_snapshots_doc() {}

#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots",
    responses((status = 200, description = "Every snapshot the caller may see, newest first", body = Vec<SnapshotDoc>)))]
#[allow(dead_code)] // Read by the OpenAPI document only.
pub(crate) fn list_snapshots_doc() {}

#[utoipa::path(get, path = "/v1/snapshots/{id}", tag = "snapshots",
    params(("id" = String, Path, description = "The snapshot's id")),
    responses(
        (status = 200, description = "The snapshot", body = SnapshotDoc),
        (status = 404, description = "No such snapshot (or another tenant's)", body = Problem, content_type = "application/problem+json"),
    ))]
#[allow(dead_code)] // Read by the OpenAPI document only.
pub(crate) fn get_snapshot_doc() {}

#[utoipa::path(delete, path = "/v1/snapshots/{id}", tag = "snapshots",
    params(("id" = String, Path, description = "The snapshot's id")),
    responses(
        (status = 204, description = "Deleted; sandboxes restored or forked from it keep their files"),
        (status = 404, description = "No such snapshot (or another tenant's)", body = Problem, content_type = "application/problem+json"),
    ))]
#[allow(dead_code)] // Read by the OpenAPI document only.
pub(crate) fn delete_snapshot_doc() {}

#[utoipa::path(post, path = "/v1/snapshots/{id}/restore", tag = "snapshots",
    params(("id" = String, Path, description = "The snapshot's id")),
    responses(
        (status = 200, description = "The sandbox it was taken of is back as it was then (files and installed packages; \
            its processes ended, its contexts dropped, its container new)", body = Object),
        (status = 404, description = "No such snapshot (or another tenant's)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The snapshot is damaged (the detail names a changed or missing file) or its sandbox is gone; nothing changed",
            body = Problem, content_type = "application/problem+json"),
    ))]
#[allow(dead_code)] // Read by the OpenAPI document only.
pub(crate) fn restore_snapshot_doc() {}

#[utoipa::path(post, path = "/v1/snapshots/{id}/fork", tag = "snapshots", request_body = ForkSnapshot,
    params(("id" = String, Path, description = "The snapshot's id")),
    responses(
        (status = 201, description = "The new sandboxes (the caller's), each with the snapshot's files, packages and configuration, its container running", body = Vec<Object>),
        (status = 404, description = "No such snapshot (or another tenant's)", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The snapshot is damaged; no sandbox was made", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not a JSON body", body = Problem, content_type = "application/problem+json"),
    ))]
#[allow(dead_code)] // Read by the OpenAPI document only.
pub(crate) fn fork_snapshot_doc() {}
