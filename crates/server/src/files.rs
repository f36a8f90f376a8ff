//! `/v1/sandboxes/{name}/files/{path}`: raw bytes in and out, streamed.
//!
//! `GET` streams a file (one `Range` at most: `206`, or `416` when the file
//! cannot satisfy it; a request with several ranges gets the whole file),
//! `GET ?list` lists a directory, `GET ?stat` says what is at a path, `PUT`
//! streams the body into the file (it replaces the old one only once every
//! byte is written), `DELETE` removes a file or a directory with everything
//! in it. `POST /mkdir` and `POST /rename` take JSON. Every path is relative
//! to the workspace (`/workspace/...` is accepted too) and goes through the
//! runtime's confined layer: no `..`, no link followed.

use std::io::SeekFrom;

use airlock_runtime::FileEntry;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::auth::Scope;
use crate::{ApiError, Code, StrictJson};

/// Size of the chunks a download is sent in.
const DOWNLOAD_CHUNK_BYTES: usize = 256 * 1024;

/// The query of `GET .../files/{path}`: nothing (the bytes), `?list`, or `?stat`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileQuery {
    list: Option<String>,
    stat: Option<String>,
}

pub(crate) async fn get_root(
    state: Scope,
    Path(name): Path<String>,
    query: Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    get(state, Path((name, String::new())), query, headers).await
}

pub(crate) async fn get(
    state: Scope,
    Path((name, path)): Path<(String, String)>,
    query: Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let sandbox = state.sandbox(&name)?;
    match (query.list, query.stat) {
        (Some(_), Some(_)) => Err(ApiError::invalid("ask for list or stat, not both")),
        (Some(_), None) => Ok(Json(sandbox.list_files(&path).await?).into_response()),
        (None, Some(_)) => Ok(Json(sandbox.stat_file(&path).await?).into_response()),
        (None, None) => download(&sandbox, &path, &headers).await,
    }
}

/// A byte range, inclusive at both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ByteRange {
    first: u64,
    last: u64,
}

/// What a `Range` header asks of a file of `size` bytes: `Ok(None)` for the
/// whole file (no header, another unit, several ranges or a malformed one,
/// which RFC 9110 lets a server ignore), `Err` when it cannot be satisfied.
fn requested_range(headers: &HeaderMap, size: u64) -> Result<Option<ByteRange>, ApiError> {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else { return Ok(None) };
    let Some(spec) = value.trim().strip_prefix("bytes=") else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((start, end)) = spec.trim().split_once('-') else { return Ok(None) };
    let (start, end) = (start.trim(), end.trim());
    let parse = |text: &str| text.parse::<u64>().ok();
    let range = match (start.is_empty(), end.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match parse(end) {
            Some(0) => None,
            Some(suffix) if size > 0 => Some(ByteRange { first: size.saturating_sub(suffix), last: size - 1 }),
            Some(_) => None,
            None => return Ok(None),
        },
        (false, _) => {
            let Some(first) = parse(start) else { return Ok(None) };
            let last = if end.is_empty() {
                size.saturating_sub(1)
            } else {
                match parse(end) {
                    Some(last) if last >= first => last.min(size.saturating_sub(1)),
                    _ => return Ok(None),
                }
            };
            (first < size).then_some(ByteRange { first, last })
        }
        (true, true) => return Ok(None),
    };
    match range {
        Some(range) => Ok(Some(range)),
        None => Err(ApiError {
            content_range: Some(format!("bytes */{size}")),
            ..ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                Code::RangeNotSatisfiable,
                format!("the range {value:?} is outside the file's {size} bytes"),
            )
        }),
    }
}

async fn download(sandbox: &airlock_runtime::Sandbox, path: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    let (mut file, entry) = sandbox.open_file(path).await?;
    let size = entry.size;
    let range = requested_range(headers, size)?;
    let (status, first, length) = match range {
        Some(ByteRange { first, last }) => (StatusCode::PARTIAL_CONTENT, first, last - first + 1),
        None => (StatusCode::OK, 0, size),
    };
    if first > 0 {
        file.seek(SeekFrom::Start(first)).await.map_err(|e| ApiError::internal(&e))?;
    }
    // At most the length announced, even if the file grows meanwhile.
    let body = Body::from_stream(ReaderStream::with_capacity(file.take(length), DOWNLOAD_CHUNK_BYTES));
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if let Some(ByteRange { first, last }) = range
        && let Ok(value) = HeaderValue::from_str(&format!("bytes {first}-{last}/{size}"))
    {
        headers.insert(header::CONTENT_RANGE, value);
    }
    Ok(response)
}

pub(crate) async fn put(
    state: Scope,
    Path((name, path)): Path<(String, String)>,
    body: Body,
) -> Result<(StatusCode, Json<FileEntry>), ApiError> {
    let sandbox = state.sandbox(&name)?;
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let mut reader = StreamReader::new(stream);
    sandbox.write_file_from(&path, &mut reader).await?;
    Ok((StatusCode::OK, Json(sandbox.stat_file(&path).await?)))
}

pub(crate) async fn delete(
    state: Scope,
    Path((name, path)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.sandbox(&name)?.remove_file(&path).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/sandboxes/{name}/mkdir`: makes the directory and any missing parents.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MkdirBody {
    path: String,
}

pub(crate) async fn mkdir(
    state: Scope,
    Path(name): Path<String>,
    StrictJson(body): StrictJson<MkdirBody>,
) -> Result<(StatusCode, Json<FileEntry>), ApiError> {
    let sandbox = state.sandbox(&name)?;
    sandbox.mkdir(&body.path).await?;
    Ok((StatusCode::CREATED, Json(sandbox.stat_file(&body.path).await?)))
}

/// `POST /v1/sandboxes/{name}/rename`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RenameBody {
    from: String,
    to: String,
}

pub(crate) async fn rename(
    state: Scope,
    Path(name): Path<String>,
    StrictJson(body): StrictJson<RenameBody>,
) -> Result<Json<FileEntry>, ApiError> {
    let sandbox = state.sandbox(&name)?;
    sandbox.rename_file(&body.from, &body.to).await?;
    Ok(Json(sandbox.stat_file(&body.to).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(value: &str, size: u64) -> Result<Option<ByteRange>, ApiError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, HeaderValue::from_str(value).unwrap());
        requested_range(&headers, size)
    }

    #[test]
    fn ranges_are_read_as_rfc_9110_says() {
        assert_eq!(range("bytes=0-9", 100).unwrap(), Some(ByteRange { first: 0, last: 9 }));
        assert_eq!(range("bytes=90-", 100).unwrap(), Some(ByteRange { first: 90, last: 99 }));
        assert_eq!(range("bytes=90-500", 100).unwrap(), Some(ByteRange { first: 90, last: 99 }));
        assert_eq!(range("bytes=-10", 100).unwrap(), Some(ByteRange { first: 90, last: 99 }));
        assert_eq!(range("bytes=-500", 100).unwrap(), Some(ByteRange { first: 0, last: 99 }));
        // Ignored: the whole file.
        assert_eq!(range("bytes=0-1,5-6", 100).unwrap(), None);
        assert_eq!(range("items=0-1", 100).unwrap(), None);
        assert_eq!(range("bytes=5-1", 100).unwrap(), None);
        assert_eq!(range("bytes=x-1", 100).unwrap(), None);
        // Not satisfiable.
        let refused = range("bytes=100-", 100).unwrap_err();
        assert_eq!(refused.status, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(refused.content_range.as_deref(), Some("bytes */100"));
        assert!(range("bytes=-0", 100).is_err());
        assert!(range("bytes=0-", 0).is_err());
    }
}
