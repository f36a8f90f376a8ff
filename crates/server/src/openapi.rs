//! The OpenAPI 3.1 document of the API, served at `GET /v1/openapi.json`.
//!
//! Generated from the code: the request and answer types derive
//! `utoipa::ToSchema` where they are defined (so a request struct's
//! `deny_unknown_fields` becomes `additionalProperties: false`), and each
//! route is described below by a `#[utoipa::path]` on a stub with the route's
//! name. The handlers stay as they are; `tests/http_openapi.rs` checks that
//! every route the router serves is in the document and that the document
//! names no route the router lacks.
//!
//! The error answers every route shares (a bad request, a missing token, no
//! such sandbox, the server's own fault, capacity) are added to every
//! operation in one place ([`add_shared_answers`]); the answers only some
//! routes give (`409`, `413`, `415`, `416`) are listed on those routes.
//!
//! Types of the runtime crates (`SandboxConfig`, `SandboxInfo`, `FileEntry`,
//! a context's info, an evaluation's value and error, a placement, a
//! termination) are described as JSON objects (or any value) here, with their
//! shape in `docs/API.md`: the runtime crates carry no OpenAPI dependency.
//!
//! **The document needs a token.** It is under `/v1`, and every `/v1` route
//! needs a bearer token: the auth layer has no exception to audit, and a
//! caller without a token learns nothing about the server, not even its
//! routes. Any live token reads it (not only an admin's).

#![allow(dead_code)] // The stubs below exist for their `#[utoipa::path]` only.

use axum::Json;
use axum::response::IntoResponse;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder, SecurityRequirement};
use utoipa::{Modify, OpenApi};

use crate::PROBLEM_JSON;
use crate::exec::{CodeAnswer, CodeBody, ContextBody, ContextCreated, DisplayView, ExecAnswer, ExecBody, RunBody};
use crate::files::{MkdirBody, RenameBody};
use crate::git::{GitCheckoutAnswer, GitCheckoutBody};
use crate::network::{NetworkPolicyDoc, SecretBody, SecretView};
use crate::ops::{Health, Readiness, UsageView};
use crate::problem::Problem;
use crate::processes::{Killed, LogsAnswer, ProcessView, SignalBody, StartBody};
use crate::sandboxes::CreateSandbox;

/// The name of the bearer security scheme in the document.
pub const BEARER_SCHEME: &str = "bearer";

/// `GET /v1/openapi.json`: the document (any live token).
pub(crate) async fn document() -> impl IntoResponse {
    Json(openapi())
}

/// The document, built from the annotations below.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut document = ApiDoc::openapi();
    add_shared_answers(&mut document);
    document
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Airlock",
        description = "Sandboxes for untrusted code: isolates and containers behind one HTTP API. \
            Every `/v1` route needs `Authorization: Bearer <token>`; errors are `application/problem+json`."
    ),
    paths(
        create_sandbox, list_sandboxes, get_sandbox, delete_sandbox,
        exec, code, run, create_context, list_contexts, delete_context, fork_context,
        list_root, get_file, put_file, delete_file, mkdir, rename,
        start_process, list_processes, kill_processes, get_process, kill_process, process_logs,
        write_stdin, close_stdin, signal_process,
        pty, events, expose_port, list_ports, unexpose_port, preview, preview_root, preview_rest,
        usage, openapi_json, healthz, readyz, metrics,
        get_network, put_network, list_secrets, put_secret, delete_secret,
        git_checkout,
        crate::snapshots::create_snapshot_doc, crate::snapshots::list_sandbox_snapshots_doc,
        crate::snapshots::list_snapshots_doc, crate::snapshots::get_snapshot_doc, crate::snapshots::delete_snapshot_doc,
        crate::snapshots::restore_snapshot_doc, crate::snapshots::fork_snapshot_doc,
    ),
    components(schemas(Problem, DisplayView)),
    modifiers(&Security),
    tags(
        (name = "sandboxes", description = "Sandboxes by name"),
        (name = "execution", description = "Commands and code"),
        (name = "files", description = "The sandbox's workspace"),
        (name = "git", description = "Repositories cloned into the workspace, through the egress proxy"),
        (name = "processes", description = "Background processes"),
        (name = "previews", description = "Ports exposed as preview URLs"),
        (name = "network", description = "A sandbox's outbound network policy, and the runtime's secrets (admin)"),
        (name = "snapshots", description = "Sandbox snapshots: take, list, delete, restore, fork"),
        (name = "operations", description = "Health, readiness, metrics, usage and this document"),
    )
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(BEARER_SCHEME, SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// Adds to every operation the problem answers all routes share, and the
/// bearer requirement to every route but the health checks.
fn add_shared_answers(document: &mut utoipa::openapi::OpenApi) {
    let problem = |description: &str| -> RefOr<utoipa::openapi::Response> {
        RefOr::T(
            ResponseBuilder::new()
                .description(description)
                .content(PROBLEM_JSON, ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build())
                .build(),
        )
    };
    for (path, item) in document.paths.paths.iter_mut() {
        // The preview URLs' capability is their own token, not an API token.
        let open = path == "/healthz" || path == "/readyz" || path.starts_with("/preview/");
        let names_sandbox = path.contains("{name}");
        let operations = [
            item.get.as_mut(),
            item.put.as_mut(),
            item.post.as_mut(),
            item.delete.as_mut(),
            item.patch.as_mut(),
            item.head.as_mut(),
        ];
        for operation in operations.into_iter().flatten() {
            let answers = &mut operation.responses.responses;
            let mut add = |status: &str, description: &str| {
                answers.entry(status.to_owned()).or_insert_with(|| problem(description));
            };
            if open {
                continue;
            }
            operation.security = Some(vec![SecurityRequirement::new(BEARER_SCHEME, Vec::<String>::new())]);
            add("400", "The request is malformed: bad JSON, an unknown field, an invalid name, value or workspace path");
            add("401", "No valid bearer token (with `WWW-Authenticate: Bearer`)");
            if names_sandbox {
                add("404", "No such sandbox (or another tenant's), or no such item in it");
            }
            add("500", "The server's own fault; its log says why");
            add("503", "At capacity (with `Retry-After`), something needed is unavailable, or shutting down");
            add("504", "The operation ran past its time limit");
            add("default", "Any other refusal, as a problem");
        }
    }
}

// The stubs. Each one's name is the route's operation id.

#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", request_body = CreateSandbox,
    responses(
        (status = 201, description = "The sandbox was made (its `SandboxInfo`)", body = Object),
        (status = 409, description = "The name is taken", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not a JSON body", body = Problem, content_type = "application/problem+json"),
    ))]
fn create_sandbox() {}

#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    responses((status = 200, description = "The caller's sandboxes (`SandboxInfo` each)", body = Vec<Object>)))]
fn list_sandboxes() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}", tag = "sandboxes", params(("name" = String, Path, description = "The sandbox's name")),
    responses((status = 200, description = "The sandbox (`SandboxInfo`)", body = Object)))]
fn get_sandbox() {}

#[utoipa::path(delete, path = "/v1/sandboxes/{name}", tag = "sandboxes", params(("name" = String, Path, description = "The sandbox's name")),
    responses((status = 204, description = "The sandbox, its workspace and its container are gone")))]
fn delete_sandbox() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/exec", tag = "execution", request_body = ExecBody,
    params(("name" = String, Path, description = "The sandbox's name")),
    responses(
        (status = 200, description = "The command ran. With `Accept: text/event-stream`, named events instead: \
            `stdout`/`stderr` (base64 data), then exactly one `exit` (an `ExecAnswer` without output) or `error` (a problem)",
            content(
                (ExecAnswer = "application/json"),
                (String = "text/event-stream"),
            )),
        (status = 409, description = "The command needs a tier the sandbox may not use", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not a JSON body", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "A per-sandbox limit is reached", body = Problem, content_type = "application/problem+json"),
    ))]
fn exec() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/code", tag = "execution", request_body = CodeBody,
    params(("name" = String, Path, description = "The sandbox's name")),
    responses(
        (status = 200, description = "The code ran (its result says how it ended), with its display outputs and side effects. \
            With `Accept: text/event-stream`, named events instead: `stdout`/`stderr` as the code writes them (base64 data), \
            one `display` per display output (a `DisplayOutput` as JSON), then exactly one `result` (a `CodeAnswer` without \
            stdout, stderr and displays) or `error` (a problem)",
            content(
                (CodeAnswer = "application/json"),
                (String = "text/event-stream"),
            )),
        (status = 413, description = "The body is too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not a JSON body", body = Problem, content_type = "application/problem+json"),
    ))]
fn code() {}

#[utoipa::path(post, path = "/v1/run", tag = "execution", request_body = RunBody,
    responses(
        (status = 200, description = "The code ran in a fresh isolate, no sandbox kept (with its display outputs and side effects)", body = CodeAnswer),
        (status = 413, description = "The body is too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not a JSON body", body = Problem, content_type = "application/problem+json"),
    ))]
fn run() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/contexts", tag = "execution", request_body = ContextBody,
    params(("name" = String, Path, description = "The sandbox's name")),
    responses(
        (status = 201, description = "The context was made", body = ContextCreated),
        (status = 415, description = "Not a JSON body", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The sandbox's context limit is reached", body = Problem, content_type = "application/problem+json"),
    ))]
fn create_context() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/contexts", tag = "execution",
    params(("name" = String, Path, description = "The sandbox's name")),
    responses((status = 200, description = "The sandbox's contexts", body = Vec<ContextInfoDoc>)))]
fn list_contexts() {}

#[utoipa::path(delete, path = "/v1/sandboxes/{name}/contexts/{id}", tag = "execution",
    params(("name" = String, Path, description = "The sandbox's name"), ("id" = String, Path, description = "The context's id")),
    responses((status = 204, description = "The context is gone")))]
fn delete_context() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/contexts/{id}/fork", tag = "execution",
    params(("name" = String, Path, description = "The sandbox's name"), ("id" = String, Path, description = "The context to fork")),
    responses(
        (status = 201, description = "A new context holding the source's variables, functions and imports, made by replaying its history (the source is unchanged)", body = ContextForkDoc),
        (status = 404, description = "No such sandbox or context", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The sandbox's context limit is reached", body = Problem, content_type = "application/problem+json"),
    ))]
fn fork_context() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/files", tag = "files",
    params(
        ("name" = String, Path, description = "The sandbox's name"),
        ("list" = Option<String>, Query, description = "List the directory (any value; its entries, not recursive)"),
        ("stat" = Option<String>, Query, description = "The entry's metadata"),
    ),
    responses((status = 200, description = "The workspace root: its listing (`?list`) or its entry (`?stat`)", body = ListingOrEntry)))]
fn list_root() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/files/{path}", tag = "files",
    params(
        ("name" = String, Path, description = "The sandbox's name"),
        ("path" = String, Path, description = "A path relative to the workspace"),
        ("list" = Option<String>, Query, description = "List the directory (any value; its entries, not recursive)"),
        ("stat" = Option<String>, Query, description = "The entry's metadata"),
        ("Range" = Option<String>, Header, description = "One byte range, `bytes=a-b`"),
    ),
    responses(
        (status = 200, description = "The file's bytes, or with `?list`/`?stat` its listing or entry as JSON",
            content((Vec<u8> = "application/octet-stream"), (ListingOrEntry = "application/json"))),
        (status = 206, description = "The range asked for", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 409, description = "Not a file (a directory)", body = Problem, content_type = "application/problem+json"),
        (status = 416, description = "The range cannot be satisfied", body = Problem, content_type = "application/problem+json"),
    ))]
fn get_file() {}

#[utoipa::path(put, path = "/v1/sandboxes/{name}/files/{path}", tag = "files",
    params(("name" = String, Path, description = "The sandbox's name"), ("path" = String, Path, description = "A path relative to the workspace")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The file's bytes, streamed"),
    responses(
        (status = 200, description = "The file was written (its entry)", body = EntryDoc),
        (status = 409, description = "A directory is in the way", body = Problem, content_type = "application/problem+json"),
        (status = 507, description = "The sandbox's disk quota is used up", body = Problem, content_type = "application/problem+json"),
    ))]
fn put_file() {}

#[utoipa::path(delete, path = "/v1/sandboxes/{name}/files/{path}", tag = "files",
    params(("name" = String, Path, description = "The sandbox's name"), ("path" = String, Path, description = "A path relative to the workspace")),
    responses(
        (status = 204, description = "The file or directory (with what is in it) is gone"),
    ))]
fn delete_file() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/mkdir", tag = "files", request_body = MkdirBody,
    params(("name" = String, Path, description = "The sandbox's name")),
    responses(
        (status = 201, description = "The directory exists (its entry)", body = EntryDoc),
        (status = 409, description = "A file is in the way", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not a JSON body", body = Problem, content_type = "application/problem+json"),
    ))]
fn mkdir() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/rename", tag = "files", request_body = RenameBody,
    params(("name" = String, Path, description = "The sandbox's name")),
    responses(
        (status = 200, description = "Renamed (the entry at its new path)", body = EntryDoc),
        (status = 409, description = "The target is in the way", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not a JSON body", body = Problem, content_type = "application/problem+json"),
    ))]
fn rename() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/processes", tag = "processes", request_body = StartBody,
    params(("name" = String, Path, description = "The sandbox's name")),
    responses(
        (status = 201, description = "The process was started", body = ProcessView),
        (status = 415, description = "Not a JSON body", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The sandbox's process limit is reached", body = Problem, content_type = "application/problem+json"),
    ))]
fn start_process() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/processes", tag = "processes",
    params(("name" = String, Path, description = "The sandbox's name")),
    responses((status = 200, description = "The sandbox's processes", body = Vec<ProcessView>)))]
fn list_processes() {}

#[utoipa::path(delete, path = "/v1/sandboxes/{name}/processes", tag = "processes",
    params(("name" = String, Path, description = "The sandbox's name")),
    responses((status = 200, description = "Every running process was killed, with its tree", body = Killed)))]
fn kill_processes() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/processes/{id}", tag = "processes",
    params(("name" = String, Path, description = "The sandbox's name"), ("id" = String, Path, description = "The process's id")),
    responses((status = 200, description = "The process", body = ProcessView)))]
fn get_process() {}

#[utoipa::path(delete, path = "/v1/sandboxes/{name}/processes/{id}", tag = "processes",
    params(("name" = String, Path, description = "The sandbox's name"), ("id" = String, Path, description = "The process's id")),
    responses((status = 200, description = "The process's tree was killed (the process, once its exit is seen)", body = ProcessView)))]
fn kill_process() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/processes/{id}/logs", tag = "processes",
    params(
        ("name" = String, Path, description = "The sandbox's name"),
        ("id" = String, Path, description = "The process's id"),
        ("offset" = Option<u64>, Query, description = "The first output byte wanted"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume a followed stream after this offset"),
    ),
    responses((status = 200, description = "The output from the offset as JSON; with `Accept: text/event-stream`, \
        followed: `stdout`/`stderr` events (ids are offsets), then `exit`",
        content((LogsAnswer = "application/json"), (String = "text/event-stream")))))]
fn process_logs() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/processes/{id}/stdin", tag = "processes",
    params(("name" = String, Path, description = "The sandbox's name"), ("id" = String, Path, description = "The process's id")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "Bytes for the process's stdin"),
    responses(
        (status = 204, description = "Written"),
        (status = 409, description = "The process's stdin is not open", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large", body = Problem, content_type = "application/problem+json"),
    ))]
fn write_stdin() {}

#[utoipa::path(delete, path = "/v1/sandboxes/{name}/processes/{id}/stdin", tag = "processes",
    params(("name" = String, Path, description = "The sandbox's name"), ("id" = String, Path, description = "The process's id")),
    responses((status = 204, description = "The process's stdin is closed")))]
fn close_stdin() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/processes/{id}/signal", tag = "processes", request_body = SignalBody,
    params(("name" = String, Path, description = "The sandbox's name"), ("id" = String, Path, description = "The process's id")),
    responses(
        (status = 204, description = "The signal went to the process's whole tree"),
        (status = 415, description = "Not a JSON body", body = Problem, content_type = "application/problem+json"),
    ))]
fn signal_process() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/pty", tag = "execution",
    params(
        ("name" = String, Path, description = "The sandbox's name"),
        ("command" = Option<String>, Query, description = "The program (default `bash`)"),
        ("cwd" = Option<String>, Query, description = "Absolute, inside the sandbox (default `/workspace`)"),
        ("cols" = Option<u16>, Query, description = "Columns"),
        ("rows" = Option<u16>, Query, description = "Rows"),
    ),
    responses(
        (status = 101, description = "A WebSocket: binary frames carry the terminal's bytes; JSON text frames `resize`, `ready` and `exit`"),
        (status = 426, description = "Not a WebSocket upgrade", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The sandbox's terminal limit is reached", body = Problem, content_type = "application/problem+json"),
    ))]
fn pty() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/events", tag = "sandboxes",
    params(("name" = String, Path, description = "The sandbox's name")),
    responses((status = 200, description = "The sandbox's file, process and lifecycle events, as an event stream",
        content_type = "text/event-stream", body = String)))]
fn events() {}

#[utoipa::path(get, path = "/v1/usage", tag = "operations",
    params(
        ("sandbox" = Option<String>, Query, description = "One sandbox by name; all the caller's when absent"),
        ("since_ms" = Option<u64>, Query, description = "From this time (inclusive), Unix milliseconds"),
        ("until_ms" = Option<u64>, Query, description = "Until this time (exclusive), Unix milliseconds"),
    ),
    responses((status = 200, description = "Active-CPU usage by tier, and its cost", body = UsageView)))]
fn usage() {}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "This document (OpenAPI 3.1)", body = Object)))]
fn openapi_json() {}

#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process is alive (no token needed)", body = Health)))]
fn healthz() {}

#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready (no token needed)", body = Readiness),
        (status = 503, description = "Not ready: the body says which check failed", body = Readiness),
    ))]
fn readyz() {}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text format (an admin token)", content_type = "text/plain", body = String),
        (status = 403, description = "The token is not an admin's", body = Problem, content_type = "application/problem+json"),
    ))]
fn metrics() {}

/// `POST /v1/sandboxes/{name}/ports` (described here: the route's own type is in `preview.rs`).
#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = ExposePort)]
struct ExposePortDoc {
    /// The port inside the sandbox (1 to 65535), on its loopback.
    #[schema(minimum = 1, maximum = 65535)]
    port: u16,
}

/// A port just exposed: the only answer that carries its token.
#[derive(utoipa::ToSchema)]
#[schema(as = Exposure)]
struct ExposureDoc {
    port: u16,
    /// Host form: `http://<port>-<sandbox>-<token>.<preview domain>[:<server port>]/`.
    url: String,
    /// Path form, for clients that cannot set a host.
    path_url: String,
    /// The preview token (exposing the port again replaces it).
    token: String,
}

/// An exposed port in a list (its token is not kept, so not shown).
#[derive(utoipa::ToSchema)]
#[schema(as = ExposedPort)]
struct ExposedPortDoc {
    port: u16,
    /// When it was exposed, in milliseconds since the Unix epoch.
    created_at_ms: u64,
}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/ports", tag = "previews", request_body = ExposePortDoc,
    params(("name" = String, Path, description = "The sandbox's name")),
    responses(
        (status = 201, description = "The port is exposed: its preview URLs and token", body = ExposureDoc),
        (status = 415, description = "Not a JSON body", body = Problem, content_type = "application/problem+json"),
    ))]
fn expose_port() {}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/ports", tag = "previews",
    params(("name" = String, Path, description = "The sandbox's name")),
    responses((status = 200, description = "The sandbox's exposed ports", body = Vec<ExposedPortDoc>)))]
fn list_ports() {}

#[utoipa::path(delete, path = "/v1/sandboxes/{name}/ports/{port}", tag = "previews",
    params(("name" = String, Path, description = "The sandbox's name"),
        ("port" = u16, Path, minimum = 1, maximum = 65535, description = "The exposed port")),
    responses((status = 204, description = "The port is no longer exposed; its token is revoked")))]
fn unexpose_port() {}

#[utoipa::path(get, path = "/preview/{sandbox}/{port}/{token}", tag = "previews",
    params(("sandbox" = String, Path, description = "The sandbox's name"), ("port" = u16, Path, description = "The exposed port"),
        ("token" = String, Path, description = "The preview token")),
    responses(
        (status = "default", description = "The dev server's own answer (any method is forwarded; a WebSocket upgrade too)"),
        (status = 404, description = "No such preview: unknown sandbox, port not exposed or wrong token alike", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Nothing answers on the port", body = Problem, content_type = "application/problem+json"),
    ))]
fn preview() {}

#[utoipa::path(get, path = "/preview/{sandbox}/{port}/{token}/", tag = "previews",
    params(("sandbox" = String, Path, description = "The sandbox's name"), ("port" = u16, Path, description = "The exposed port"),
        ("token" = String, Path, description = "The preview token")),
    responses(
        (status = "default", description = "The dev server's own answer for `/`"),
        (status = 404, description = "No such preview", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Nothing answers on the port", body = Problem, content_type = "application/problem+json"),
    ))]
fn preview_root() {}

#[utoipa::path(get, path = "/preview/{sandbox}/{port}/{token}/{rest}", tag = "previews",
    params(("sandbox" = String, Path, description = "The sandbox's name"), ("port" = u16, Path, description = "The exposed port"),
        ("token" = String, Path, description = "The preview token"), ("rest" = String, Path, description = "The path on the dev server")),
    responses(
        (status = "default", description = "The dev server's own answer"),
        (status = 404, description = "No such preview", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "Nothing answers on the port", body = Problem, content_type = "application/problem+json"),
    ))]
fn preview_rest() {}

/// One workspace entry (the runtime's `FileEntry`; links are not followed).
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = FileEntry)]
struct EntryDoc {
    name: String,
    kind: EntryKindDoc,
    size: u64,
    /// Permission bits.
    mode: u32,
    /// Last modification, in milliseconds since the Unix epoch.
    modified_ms: i64,
}

/// What a workspace entry is.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = FileKind)]
enum EntryKindDoc {
    File,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    Unknown,
}

/// `?list`: the directory's entries; `?stat`: the one entry.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
enum ListingOrEntry {
    Listing(Vec<EntryDoc>),
    Entry(EntryDoc),
}

/// Something an evaluation did that outlives it, which running the same code
/// again would do twice.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case", tag = "kind")]
#[schema(as = SideEffect)]
pub(crate) enum SideEffectDoc {
    /// A file or directory changed: `operation` is `write`, `remove`,
    /// `rename`, `mkdir`, ...; `path` as the code named it.
    File { operation: String, path: String },
    /// An outbound HTTP request.
    Request { method: String, url: String },
}

/// What happened to a context that moved from its isolate to a kernel in the
/// container, in the answer of the evaluation that moved it.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = ContextMove)]
pub(crate) struct ContextMoveDoc {
    /// Whether earlier evaluations were replayed; `false` when the context was
    /// made with `replay_on_escalation: false` (it started fresh: its earlier
    /// variables are gone).
    replayed: bool,
    /// How many earlier evaluations ran again in the container.
    replayed_evaluations: u64,
    /// What those evaluations had done in the isolate and so did again.
    repeated_side_effects: Vec<SideEffectDoc>,
    /// Earlier evaluations past the history's caps were not kept: the
    /// replayed state may be partial.
    history_truncated: bool,
    /// Replayed evaluations that failed in the container, each `#N: what it said`.
    replay_failures: Vec<String>,
}

/// What ran a request, where, and why there.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = Placement)]
pub(crate) struct PlacementDoc {
    tier: TierDoc,
    reason: String,
    /// Set when an isolate answered needs-escalation and the request ran again
    /// in the container: `{"reason": "missing-module", "name": "numpy"}`,
    /// `{"reason": "subprocess"}`, ...
    #[schema(value_type = Option<Object>)]
    escalated: Option<JsonObject>,
    /// Set when this evaluation moved its context to the container.
    context_moved: Option<ContextMoveDoc>,
    /// Set on a context's first evaluation after its sandbox slept or the
    /// server restarted: the context was rebuilt by replaying its history.
    context_restored: Option<ContextReplayDoc>,
}

/// What replaying a context's kept history did: when it was rebuilt after a
/// sleep or a restart, or forked. Replay runs the code again: side effects
/// repeat, and time, randomness and the workspace may give other values.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = ContextReplay)]
pub(crate) struct ContextReplayDoc {
    /// Where the context was rebuilt: `isolate`, or `container` (a new kernel).
    tier: TierDoc,
    /// `false` for a context made with `replay_on_escalation: false`: it came back empty.
    replayed: bool,
    /// How many earlier evaluations ran again.
    replayed_evaluations: u64,
    /// What those evaluations had done the first time, and so did again.
    repeated_side_effects: Vec<SideEffectDoc>,
    /// Earlier evaluations past the history's caps were not kept: the state may be partial.
    history_truncated: bool,
    /// Replayed evaluations that failed this time, each `#N: what it said`.
    replay_failures: Vec<String>,
}

/// A context made by forking another, by replay.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = ContextFork)]
pub(crate) struct ContextForkDoc {
    /// The new context's id.
    id: String,
    /// The context it was forked from (unchanged).
    source: String,
    /// `python` or `javascript`.
    language: String,
    #[serde(flatten)]
    replay: ContextReplayDoc,
}

/// Any JSON object (for documentation only).
type JsonObject = serde_json::Map<String, serde_json::Value>;

/// How a context behaves, chosen when it is made.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = ContextOptions)]
pub(crate) struct ContextOptionsDoc {
    /// Replay earlier evaluations when the context moves to the container.
    replay_on_escalation: bool,
}

/// One context as the sandbox lists it.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = ContextInfo)]
pub(crate) struct ContextInfoDoc {
    id: String,
    /// `python` or `javascript`.
    language: String,
    /// Where it lives now: `isolate`, or `container` once it escalated.
    tier: TierDoc,
    evaluations: u64,
    /// How many times it lost its state to a limit or a crash.
    resets: u64,
    options: ContextOptionsDoc,
}

/// Which tier ran something.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
#[schema(as = TierKind)]
pub(crate) enum TierDoc {
    /// A WebAssembly isolate.
    Isolate,
    /// A Linux container.
    Container,
}

#[utoipa::path(get, path = "/v1/sandboxes/{name}/network", tag = "network",
    params(("name" = String, Path, description = "The sandbox's name")),
    responses((status = 200, description = "The sandbox's network policy (deny-all is `{}`)", body = NetworkPolicyDoc)))]
fn get_network() {}

#[utoipa::path(put, path = "/v1/sandboxes/{name}/network", tag = "network", request_body = NetworkPolicyDoc,
    params(("name" = String, Path, description = "The sandbox's name")),
    responses(
        (status = 200, description = "The policy is in force from the sandbox's next request (the policy as stored)", body = NetworkPolicyDoc),
        (status = 403, description = "The policy names a secret, and the token is not an admin's", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not a JSON body", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Not a valid policy, or it names a secret that does not exist (`invalid-policy`); nothing changed",
            body = Problem, content_type = "application/problem+json"),
    ))]
fn put_network() {}

#[utoipa::path(get, path = "/v1/secrets", tag = "network",
    responses(
        (status = 200, description = "The runtime's secrets: names and times, never values (an admin token)", body = Vec<SecretView>),
        (status = 403, description = "The token is not an admin's", body = Problem, content_type = "application/problem+json"),
    ))]
fn list_secrets() {}

#[utoipa::path(put, path = "/v1/secrets/{name}", tag = "network", request_body = SecretBody,
    params(("name" = String, Path, description = "The secret's name (1-64 of a-z, 0-9, '-', '_', '.')")),
    responses(
        (status = 204, description = "Stored (a value there before is replaced; the next request that uses it gets the new one)"),
        (status = 403, description = "The token is not an admin's", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not a JSON body", body = Problem, content_type = "application/problem+json"),
    ))]
fn put_secret() {}

#[utoipa::path(delete, path = "/v1/secrets/{name}", tag = "network",
    params(("name" = String, Path, description = "The secret's name")),
    responses(
        (status = 204, description = "The secret is gone"),
        (status = 403, description = "The token is not an admin's", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such secret", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "A sandbox's network policy names it (the detail says which)", body = Problem, content_type = "application/problem+json"),
    ))]
fn delete_secret() {}

#[utoipa::path(post, path = "/v1/sandboxes/{name}/git/checkout", tag = "git", request_body = GitCheckoutBody,
    params(("name" = String, Path, description = "The sandbox's name")),
    responses(
        (status = 200, description = "git ran in the sandbox's container: `exit_code` is git's. On success `commit` is the \
            checked-out commit; on git's own failure (an unknown branch, a refused or denied host) `commit` is `null` \
            and `stderr` says why", body = GitCheckoutAnswer),
        (status = 409, description = "The sandbox may not use the container tier", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The body is too large", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not a JSON body", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Refused before anything ran (`invalid-request`): credentials in the URL, a scheme \
            other than http(s), or a branch, directory, depth or timeout out of range", body = Problem, content_type = "application/problem+json"),
    ))]
fn git_checkout() {}
