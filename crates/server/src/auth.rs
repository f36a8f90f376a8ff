//! Who is asking: a bearer token on every `/v1` route, and the tenant it is.
//!
//! Tokens live in the home's registry ([`airlock_runtime::TokenStore`]: only
//! their SHA-256, compared in constant time) and are managed with `airlock
//! token create|list|revoke`. [`require_token`] guards every `/v1` route: a
//! request without a live token gets `401` with `WWW-Authenticate: Bearer`
//! before any handler runs, so it learns nothing about sandboxes. A request
//! that passes carries its [`Caller`].
//!
//! A token is a tenant: it sees only the sandboxes made with it (their
//! `owner` is its id). An admin token sees every sandbox. A request through
//! the home's own Unix socket ([`crate::LocalCaller`]) is the home's owner:
//! admin, and what it makes belongs to no tenant, like what the CLI makes in
//! process. Handlers that name a sandbox take [`Scope`] and look it up with
//! [`Scope::sandbox`], the one lookup that applies this; another tenant's
//! sandbox is answered exactly as one that does not exist.

use std::fs::OpenOptions;
use std::io::Write;
use std::ops::Deref;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use airlock_runtime::{Runtime, Sandbox, TokenInfo, TokenStore};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{Extensions, HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::{ApiError, AppState, Code, LocalCaller};

/// The file in the home where `airlock serve` writes the admin token it makes
/// on first start (mode [`ADMIN_TOKEN_MODE`]).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The admin token file's mode, set when it is created (never widened after):
/// only the home's user may read it.
pub const ADMIN_TOKEN_MODE: u32 = 0o600;
/// The name the first admin token gets (`airlock token list` shows it).
const ADMIN_TOKEN_NAME: &str = "admin";
/// Names tried for the first admin token when a live token already has the
/// plain name (`admin-2`, `admin-3`, ...): bounds the retries.
const ADMIN_TOKEN_NAME_TRIES: u32 = 9;
/// The realm of every `WWW-Authenticate` challenge.
const REALM: &str = "airlock";

/// Who a request comes from, once its token is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's id; `None` for the home's owner on the local socket.
    token: Option<String>,
    /// The token's name, for logs (never the token itself).
    name: String,
    admin: bool,
}

impl Caller {
    /// The home's own user, through the home's Unix socket: admin, no tenant.
    pub fn local() -> Self {
        Self { token: None, name: "local".to_string(), admin: true }
    }

    fn of_token(token: TokenInfo) -> Self {
        Self { token: Some(token.id), name: token.name, admin: token.admin }
    }

    /// The id of the caller's token (`None` for the local socket).
    pub fn token_id(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The token's name (`local` for the local socket): fit for logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// An admin sees every sandbox, whoever made it.
    pub fn is_admin(&self) -> bool {
        self.admin
    }

    /// The owner recorded on a sandbox this caller makes.
    pub fn owner(&self) -> Option<&str> {
        self.token_id()
    }

    /// Whether this caller may see a sandbox whose owner is `owner`: an admin
    /// sees all; a tenant only its own (never one that belongs to no tenant).
    pub fn may_see(&self, owner: Option<&str>) -> bool {
        self.admin || (owner.is_some() && owner == self.token_id())
    }
}

/// Why a request was refused before its handler ran.
#[derive(Debug)]
enum Refusal {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A token that is malformed, unknown or revoked (one answer for all three).
    Invalid,
    /// A live token without the rights the route needs.
    NotAdmin,
    /// The registry could not be read.
    Failed(ApiError),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (error, challenge) = match self {
            Refusal::Missing => (
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    Code::Unauthorized,
                    "this route needs a bearer token (Authorization: Bearer <token>)",
                ),
                format!("Bearer realm=\"{REALM}\""),
            ),
            Refusal::Invalid => (
                ApiError::new(StatusCode::UNAUTHORIZED, Code::Unauthorized, "the bearer token is not valid"),
                format!("Bearer realm=\"{REALM}\", error=\"invalid_token\""),
            ),
            Refusal::NotAdmin => (
                ApiError::new(StatusCode::FORBIDDEN, Code::Forbidden, "this route needs an admin token"),
                format!("Bearer realm=\"{REALM}\", error=\"insufficient_scope\""),
            ),
            Refusal::Failed(error) => return error.into_response(),
        };
        let mut response = error.into_response();
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
        }
        response
    }
}

/// The caller of a request: the local socket's owner, or the live token in
/// its `Authorization: Bearer` header.
fn identify(state: &AppState, extensions: &Extensions, headers: &HeaderMap) -> Result<Caller, Refusal> {
    if let Some(caller) = extensions.get::<Caller>() {
        return Ok(caller.clone());
    }
    if extensions.get::<LocalCaller>().is_some() {
        return Ok(Caller::local());
    }
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        // None, or more than one (which is which would be a guess).
        return if headers.contains_key(header::AUTHORIZATION) { Err(Refusal::Invalid) } else { Err(Refusal::Missing) };
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|text| text.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or(Refusal::Invalid)?;
    match state.runtime().tokens().verify(token) {
        Ok(Some(info)) => Ok(Caller::of_token(info)),
        Ok(None) => Err(Refusal::Invalid),
        Err(error) => Err(Refusal::Failed(ApiError::internal(&error))),
    }
}

/// Middleware on every `/v1` route: refuses a request without a live token
/// (`401`, `WWW-Authenticate: Bearer`) before routing it any further, and
/// hands the [`Caller`] to the handler.
pub(crate) async fn require_token(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    match identify(&state, request.extensions(), request.headers()) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(refusal) => refusal.into_response(),
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        identify(state, &parts.extensions, &parts.headers).map_err(IntoResponse::into_response)
    }
}

/// An extractor for routes only an admin may use (such as `/metrics`, outside
/// `/v1`): `401` without a live token, `403` with a tenant's.
#[derive(Debug, Clone)]
pub struct RequireAdmin(pub Caller);

impl FromRequestParts<AppState> for RequireAdmin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let caller = identify(state, &parts.extensions, &parts.headers).map_err(IntoResponse::into_response)?;
        if caller.is_admin() { Ok(Self(caller)) } else { Err(Refusal::NotAdmin.into_response()) }
    }
}

/// The state as one caller sees it: the extractor of every handler that
/// names a sandbox, in place of `State(state): State<AppState>`. It derefs to
/// [`AppState`]; its [`Scope::sandbox`] is the only sandbox lookup handlers use.
#[derive(Debug, Clone)]
pub struct Scope {
    state: AppState,
    caller: Caller,
}

impl Scope {
    /// The sandbox named `name`, if this caller may see it; another tenant's
    /// is answered exactly as one that does not exist (`404`, `not-found`).
    pub fn sandbox(&self, name: &str) -> Result<Sandbox, ApiError> {
        self.state.sandbox(&self.caller, name)
    }

    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// Whether this caller may see `sandbox` (for lists and totals over many).
    pub fn sees(&self, sandbox: &airlock_runtime::SandboxInfo) -> bool {
        self.caller.may_see(sandbox.owner.as_deref())
    }
}

impl Deref for Scope {
    type Target = AppState;

    fn deref(&self) -> &AppState {
        &self.state
    }
}

impl FromRequestParts<AppState> for Scope {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        Ok(Self { state: state.clone(), caller })
    }
}

/// Setting up the admin token failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The registry failed.
    #[error(transparent)]
    Store(#[from] airlock_runtime::Error),
    /// The admin token file could not be written.
    #[error("writing the admin token file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What [`ensure_admin_token`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AdminToken {
    /// There was no live admin token: one was made and written to this file.
    Created(PathBuf),
    /// A live admin token exists, and this file (written when it was made) is there.
    Kept(PathBuf),
    /// A live admin token exists, and its file is gone (moved away by its owner).
    FileGone(PathBuf),
}

impl AdminToken {
    /// The admin token file's path.
    pub fn path(&self) -> &Path {
        match self {
            AdminToken::Created(path) | AdminToken::Kept(path) | AdminToken::FileGone(path) => path,
        }
    }
}

/// Makes sure the runtime's home has a live admin token, as `airlock serve`
/// does on start: when there is none (the first start, or every admin token
/// was revoked), makes one and writes it to [`ADMIN_TOKEN_FILE`] in the home,
/// created with mode [`ADMIN_TOKEN_MODE`] and `O_EXCL` (an older file, whose
/// token is revoked, is removed first). A live admin token's file is never
/// rewritten. The token itself is never logged.
pub fn ensure_admin_token(runtime: &Runtime) -> Result<AdminToken, AuthError> {
    let path = runtime.home().join(ADMIN_TOKEN_FILE);
    let tokens = runtime.tokens();
    if tokens.has_live_admin()? {
        return Ok(if path.exists() { AdminToken::Kept(path) } else { AdminToken::FileGone(path) });
    }
    let token = create_admin(tokens)?;
    let written = match write_private(&path, token.secret()) {
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            // Left by an admin token since revoked: it opens nothing now.
            std::fs::remove_file(&path).and_then(|()| write_private(&path, token.secret()))
        }
        other => other,
    };
    if let Err(source) = written {
        // Nobody could learn it: take it back, so the next start makes another.
        let _ = tokens.revoke(&token.info.id);
        return Err(AuthError::File { path, source });
    }
    tracing::info!(token = %token.info.id, file = %path.display(), "made the admin token");
    Ok(AdminToken::Created(path))
}

fn create_admin(tokens: &TokenStore) -> Result<airlock_runtime::NewToken, AuthError> {
    let mut attempt = 1;
    loop {
        let name = if attempt == 1 { ADMIN_TOKEN_NAME.to_string() } else { format!("{ADMIN_TOKEN_NAME}-{attempt}") };
        match tokens.create(&name, true) {
            Err(airlock_runtime::Error::Invalid { .. }) if attempt < ADMIN_TOKEN_NAME_TRIES => attempt += 1,
            other => return Ok(other?),
        }
    }
}

/// Writes `secret` and a newline to a new file at `path`, made with mode
/// [`ADMIN_TOKEN_MODE`] and `O_EXCL` (an existing file or link there is an
/// error, never followed or truncated), and syncs it.
fn write_private(path: &Path, secret: &str) -> std::io::Result<()> {
    let mut file = OpenOptions::new().write(true).create_new(true).mode(ADMIN_TOKEN_MODE).open(path)?;
    file.write_all(secret.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}
