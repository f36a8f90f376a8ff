//! `git_checkout`: a repository cloned into the workspace, in the sandbox's
//! container, through its egress proxy.
//!
//! Credentials never enter the sandbox: a private repository is reached
//! through a host rule of the network policy that adds the header at the
//! proxy. So a URL carrying credentials (`https://user:token@host/...`) is
//! refused (git would write it into `.git/config`), and git is told never to
//! prompt and to use only HTTP(S), so a hostile repository's submodules cannot
//! switch it to `ext::` or `file::` transports.

use std::time::Duration;

use airlock_core::{ExecRequest, WORKSPACE_GUEST_PATH};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sandbox::{RunOutcome, Sandbox};

/// The longest repository URL accepted.
pub const MAX_GIT_URL_LEN: usize = 2048;
/// The longest branch or tag name accepted (git's own refs are shorter in practice).
pub const MAX_GIT_BRANCH_LEN: usize = 255;
/// The deepest shallow clone asked for; beyond it, ask for a full clone.
pub const MAX_GIT_DEPTH: u32 = 1_000_000;
/// The longest target directory (relative to the workspace).
pub const MAX_GIT_DIR_LEN: usize = 1024;
/// The shortest deadline a checkout may be given (less cannot even connect).
pub const MIN_GIT_CHECKOUT_DEADLINE: Duration = Duration::from_secs(1);
/// How long a checkout may take when the caller gives no deadline.
pub const DEFAULT_GIT_CHECKOUT_DEADLINE: Duration = Duration::from_secs(300);

/// What to clone, and where.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitCheckout {
    /// An `http://` or `https://` URL, without credentials.
    pub url: String,
    /// A branch or tag; `None` is the remote's default branch.
    #[serde(default)]
    pub branch: Option<String>,
    /// A shallow clone of this many commits; `None` is the whole history.
    #[serde(default)]
    pub depth: Option<u32>,
    /// The directory under `/workspace`; `None` is the repository's name.
    #[serde(default)]
    pub dir: Option<String>,
    /// Deadline for the clone; `None` is [`DEFAULT_GIT_CHECKOUT_DEADLINE`].
    #[serde(default, with = "optional_seconds", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

/// A finished checkout.
#[derive(Debug, Clone)]
pub struct GitCheckoutOutcome {
    /// Where the repository is, relative to the workspace.
    pub dir: String,
    /// The checked-out commit, when the clone succeeded.
    pub commit: Option<String>,
    /// git's own run: its exit status and output (errors are git's words).
    pub run: RunOutcome,
}

impl GitCheckout {
    /// Checks every field; returns the target directory relative to the workspace.
    pub fn validate(&self) -> Result<String> {
        let invalid = |what, reason: &str| Error::Invalid { what, reason: reason.to_owned() };
        let url = self.url.as_str();
        if url.len() > MAX_GIT_URL_LEN {
            return Err(invalid("git url", &format!("longer than {MAX_GIT_URL_LEN} bytes (MAX_GIT_URL_LEN)")));
        }
        if url.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(invalid("git url", "contains spaces or control characters"));
        }
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| invalid("git url", "only http:// and https:// URLs are cloned (through the egress proxy)"))?;
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        if authority.contains('@') {
            return Err(invalid(
                "git url",
                "credentials in the URL would be written into .git/config; give them as a header rule of the network policy",
            ));
        }
        if authority.is_empty() {
            return Err(invalid("git url", "has no host"));
        }
        if let Some(branch) = &self.branch {
            let valid = !branch.is_empty()
                && branch.len() <= MAX_GIT_BRANCH_LEN
                && !branch.starts_with('-')
                && !branch.contains("..")
                && branch.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
            if !valid {
                return Err(invalid("git branch", "1-255 of A-Z, a-z, 0-9, '.', '_', '/' and '-', not starting with '-', no '..'"));
            }
        }
        if let Some(depth) = self.depth
            && !(1..=MAX_GIT_DEPTH).contains(&depth)
        {
            return Err(invalid("git depth", &format!("between 1 and {MAX_GIT_DEPTH} (MAX_GIT_DEPTH)")));
        }
        // Checked here, before anything runs: a zero or a day-long clone is a mistake.
        if let Some(timeout) = self.timeout
            && !(MIN_GIT_CHECKOUT_DEADLINE..=airlock_core::limits::MAX_DEADLINE).contains(&timeout)
        {
            return Err(invalid(
                "git timeout",
                &format!(
                    "between {}s (MIN_GIT_CHECKOUT_DEADLINE) and {}s (MAX_DEADLINE)",
                    MIN_GIT_CHECKOUT_DEADLINE.as_secs(),
                    airlock_core::limits::MAX_DEADLINE.as_secs()
                ),
            ));
        }
        let dir = match &self.dir {
            Some(dir) => dir.trim_start_matches(&format!("{WORKSPACE_GUEST_PATH}/")).trim_end_matches('/').to_owned(),
            None => repository_name(rest).ok_or_else(|| invalid("git dir", "cannot be named from the URL; give one"))?,
        };
        let valid_dir = !dir.is_empty()
            && dir.len() <= MAX_GIT_DIR_LEN
            && !dir.starts_with(['/', '-'])
            && dir.split('/').all(|part| !part.is_empty() && part != "." && part != "..")
            && !dir.bytes().any(|b| b.is_ascii_control());
        if !valid_dir {
            return Err(invalid("git dir", "a relative path inside /workspace, without '.' or '..' parts, not starting with '-'"));
        }
        Ok(dir)
    }
}

/// `https://host/org/repo.git` → `repo`.
fn repository_name(url_rest: &str) -> Option<String> {
    let path = url_rest.split(['?', '#']).next()?;
    let last = path.trim_end_matches('/').rsplit('/').next()?;
    let name = last.strip_suffix(".git").unwrap_or(last);
    let valid = !name.is_empty()
        && name != ".."
        && name != "."
        && !name.starts_with('-')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    (valid && path.contains('/')).then(|| name.to_owned())
}

impl Sandbox {
    /// Clones `checkout.url` into the workspace, in the sandbox's container,
    /// through its egress proxy (the network policy must allow the host).
    /// Git's own failure (an unknown branch, a refused host) comes back as
    /// its exit status and stderr in the outcome.
    pub async fn git_checkout(&self, checkout: &GitCheckout) -> Result<GitCheckoutOutcome> {
        let dir = checkout.validate()?;
        let target = format!("{WORKSPACE_GUEST_PATH}/{dir}");
        let mut args: Vec<String> = [
            // Only HTTP(S): no `ext::`, `file::` or ssh from the repository's submodules.
            "-c",
            "protocol.allow=never",
            "-c",
            "protocol.http.allow=always",
            "-c",
            "protocol.https.allow=always",
            // No helper may store what it never sees anyway.
            "-c",
            "credential.helper=",
            "clone",
            "--quiet",
        ]
        .map(String::from)
        .to_vec();
        if let Some(depth) = checkout.depth {
            args.extend(["--depth".into(), depth.to_string()]);
        }
        if let Some(branch) = &checkout.branch {
            args.extend(["--branch".into(), branch.clone()]);
        }
        args.extend(["--".into(), checkout.url.clone(), target.clone()]);
        let mut request = ExecRequest::new("git").args(args);
        request.env = vec![("GIT_TERMINAL_PROMPT".into(), "0".into()), ("GIT_ASKPASS".into(), "/bin/false".into())];
        request.limits = self.config().limits;
        request.limits.deadline = checkout.timeout.unwrap_or(DEFAULT_GIT_CHECKOUT_DEADLINE);
        let run = self.exec(request.clone()).await?;
        let commit = if run.outcome.exit_code() == Some(0) {
            let mut head = ExecRequest::new("git").args(["-C", target.as_str(), "rev-parse", "HEAD"]);
            head.limits = request.limits;
            let head = self.exec(head).await?;
            (head.outcome.exit_code() == Some(0))
                .then(|| String::from_utf8_lossy(&head.outcome.stdout).trim().to_owned())
                .filter(|commit| !commit.is_empty())
        } else {
            None
        };
        Ok(GitCheckoutOutcome { dir, commit, run })
    }
}

mod optional_seconds {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(duration) => serializer.serialize_f64(duration.as_secs_f64()),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
        let seconds = Option::<f64>::deserialize(deserializer)?;
        seconds
            .map(|s| Duration::try_from_secs_f64(s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkout(url: &str) -> GitCheckout {
        GitCheckout { url: url.into(), ..GitCheckout::default() }
    }

    #[test]
    fn the_directory_defaults_to_the_repository_name() {
        assert_eq!(checkout("https://git.test/org/tool.git").validate().unwrap(), "tool");
        assert_eq!(checkout("http://git.test:8080/org/tool/").validate().unwrap(), "tool");
        let named = GitCheckout { dir: Some("/workspace/src/tool/".into()), ..checkout("https://git.test/a/b") };
        assert_eq!(named.validate().unwrap(), "src/tool");
    }

    #[test]
    fn a_timeout_outside_its_bounds_is_refused_before_anything_runs() {
        for timeout in [Duration::ZERO, Duration::from_millis(999), airlock_core::limits::MAX_DEADLINE + Duration::from_secs(1)] {
            let asked = GitCheckout { timeout: Some(timeout), ..checkout("https://git.test/org/tool.git") };
            assert!(matches!(asked.validate(), Err(Error::Invalid { what: "git timeout", .. })), "{timeout:?}");
        }
        for timeout in [Duration::from_secs(1), airlock_core::limits::MAX_DEADLINE] {
            let asked = GitCheckout { timeout: Some(timeout), ..checkout("https://git.test/org/tool.git") };
            assert_eq!(asked.validate().unwrap(), "tool", "{timeout:?}");
        }
    }

    #[test]
    fn credentials_in_the_url_and_other_transports_are_refused() {
        for url in [
            "https://user:token@git.test/org/tool.git",
            "https://token@git.test/org/tool.git",
            "ssh://git.test/org/tool.git",
            "file:///etc",
            "ext::sh -c touch% /tmp/x",
            "https:///nohost",
        ] {
            assert!(matches!(checkout(url).validate(), Err(Error::Invalid { what: "git url", .. })), "{url}");
        }
    }

    #[test]
    fn options_that_git_would_read_as_flags_are_refused() {
        let bad_branch = GitCheckout { branch: Some("--upload-pack=touch /tmp/x".into()), ..checkout("https://g.test/a/b") };
        assert!(matches!(bad_branch.validate(), Err(Error::Invalid { what: "git branch", .. })));
        for dir in ["../out", "a/../../b", "-x", "/etc/x/../..", "a//b", "./"] {
            let bad_dir = GitCheckout { dir: Some(dir.into()), ..checkout("https://g.test/a/b") };
            assert!(matches!(bad_dir.validate(), Err(Error::Invalid { what: "git dir", .. })), "{dir}");
        }
        let bad_depth = GitCheckout { depth: Some(0), ..checkout("https://g.test/a/b") };
        assert!(matches!(bad_depth.validate(), Err(Error::Invalid { what: "git depth", .. })));
    }
}
