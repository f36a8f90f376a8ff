//! A sandbox's outbound network policy: which hosts it may reach, on which
//! ports and with which methods, and which headers (credentials) are added on
//! the way out. Deny-all by default; a denied host always wins over an allowed
//! one. The same policy governs both tiers: the egress proxy for containers
//! and the outbound HTTP hook for isolates (`airlock-egress`).
//!
//! This module only decides; it never connects. Header values are never kept
//! here: a rule names a secret in the runtime's secret store.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Where a sandbox container sees its egress directory (bind-mounted
/// read-only from the host): the proxy's socket and the trust bundle.
pub const EGRESS_GUEST_DIR: &str = "/run/airlock/egress";
/// The egress proxy's Unix socket, in the egress directory.
pub const EGRESS_SOCKET_FILE: &str = "proxy.sock";
/// The system's CA certificates plus the runtime's egress CA (PEM), in the
/// egress directory; `SSL_CERT_FILE` and its kin point here.
pub const EGRESS_CA_BUNDLE_FILE: &str = "ca-bundle.pem";
/// The loopback port inside a container where the agent presents the proxy
/// socket as TCP (`HTTP_PROXY=http://127.0.0.1:<port>`): squid's port, the
/// one proxies conventionally use, and one dev servers rarely take.
pub const EGRESS_PROXY_PORT: u16 = 3128;

/// Allowed-host rules one policy may hold: bounds the work of every decision.
pub const MAX_ALLOW_RULES: usize = 256;
/// Denied-host patterns one policy may hold.
pub const MAX_DENY_RULES: usize = 256;
/// Header rules one allowed host may carry.
pub const MAX_HEADER_RULES: usize = 16;
/// The longest host pattern (a DNS name is at most 253 characters; `*.` adds two).
pub const MAX_HOST_PATTERN_LEN: usize = 255;
/// Methods one rule may list.
pub const MAX_METHODS: usize = 16;
/// Ports one rule may list.
pub const MAX_PORTS: usize = 64;
/// Ports a rule allows when it lists none: plain HTTP and HTTPS.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];

/// Why a policy is refused. Nothing is applied when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error("host pattern {pattern:?} is invalid: {reason}")]
    Host { pattern: String, reason: &'static str },
    #[error("method {method:?} is invalid: a method is 1-32 of A-Z")]
    Method { method: String },
    #[error("header {name:?} is invalid: {reason}")]
    Header { name: String, reason: &'static str },
    #[error("secret name {name:?} is invalid: 1-64 of a-z, 0-9, '-', '_' and '.'")]
    SecretName { name: String },
    #[error("port 0 is not a port")]
    Port,
    #[error("{what}: {count} given, the limit is {limit}")]
    TooMany { what: &'static str, count: usize, limit: usize },
}

/// A host pattern: an exact DNS name (`pypi.org`), a suffix (`*.github.com`,
/// which matches any name below it but not `github.com` itself), an IP
/// literal (`127.0.0.1`, `::1`), or `*` for every name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPattern(String);

impl HostPattern {
    /// Validates and normalises `pattern` (lower case, no trailing dot).
    pub fn new(pattern: &str) -> Result<Self, PolicyError> {
        let invalid = |reason| PolicyError::Host { pattern: pattern.to_owned(), reason };
        if pattern.len() > MAX_HOST_PATTERN_LEN {
            return Err(invalid("longer than 255 characters"));
        }
        let lowered = pattern.strip_suffix('.').unwrap_or(pattern).to_ascii_lowercase();
        if pattern == "*" {
            return Ok(Self(lowered));
        }
        let literal = lowered.trim_start_matches('[').trim_end_matches(']');
        if let Ok(address) = literal.parse::<IpAddr>() {
            return Ok(Self(address.to_string()));
        }
        let name = lowered.strip_prefix("*.").unwrap_or(&lowered);
        if !is_dns_name(name) {
            return Err(invalid("a host is a DNS name of labels of a-z, 0-9 and '-', optionally after '*.', an IP address, or '*'"));
        }
        Ok(Self(lowered))
    }

    /// Does this pattern cover `host` (already normalised by [`normalize_host`])?
    pub fn matches(&self, host: &str) -> bool {
        if self.0 == "*" {
            return true;
        }
        match self.0.strip_prefix("*.") {
            Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(suffix) && host.as_bytes()[host.len() - suffix.len() - 1] == b'.',
            None => self.0 == host,
        }
    }

    /// The IP address this pattern names literally, if it is one.
    pub fn address(&self) -> Option<IpAddr> {
        self.0.parse().ok()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for HostPattern {
    type Error = PolicyError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(&value)
    }
}

impl From<HostPattern> for String {
    fn from(pattern: HostPattern) -> Self {
        pattern.0
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lower case, no trailing dot, no brackets around an IPv6 literal: the form
/// [`HostPattern::matches`] compares against. `None` for a host that is not a
/// DNS name or an IP address (it can match no rule).
pub fn normalize_host(host: &str) -> Option<String> {
    let lowered = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let literal = lowered.trim_start_matches('[').trim_end_matches(']');
    if let Ok(address) = literal.parse::<IpAddr>() {
        return Some(address.to_string());
    }
    (lowered.len() <= 253 && is_dns_name(&lowered)).then_some(lowered)
}

fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// One header set on requests to an allowed host, from a named secret. The
/// sandbox never sees the value: for HTTPS the proxy terminates TLS to add it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderRule {
    /// The header's name (`Authorization`); replaces any the sandbox sent.
    pub name: String,
    /// The secret whose value becomes the header's value.
    pub secret: String,
    /// Written before the secret's value (`"Bearer "`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

/// Headers a rule may not set: they frame the request or address the proxy,
/// and setting them would let a rule break the exchange rather than add to it.
const RESERVED_HEADERS: [&str; 8] =
    ["host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer", "keep-alive"];

impl HeaderRule {
    fn validate(&self) -> Result<(), PolicyError> {
        let name = self.name.to_ascii_lowercase();
        let invalid = |reason| PolicyError::Header { name: self.name.clone(), reason };
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(invalid("a header name is 1-64 of A-Z, a-z, 0-9, '-' and '_'"));
        }
        if RESERVED_HEADERS.contains(&name.as_str()) || name.starts_with("proxy-") {
            return Err(invalid("it frames the request or addresses the proxy, so a rule may not set it"));
        }
        if self.prefix.len() > 64 || !self.prefix.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(invalid("a prefix is at most 64 printable ASCII characters"));
        }
        validate_secret_name(&self.secret)
    }
}

/// A secret's name: 1-64 of `a-z`, `0-9`, `-`, `_` and `.`.
pub fn validate_secret_name(name: &str) -> Result<(), PolicyError> {
    let valid = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
    if valid { Ok(()) } else { Err(PolicyError::SecretName { name: name.to_owned() }) }
}

/// Hosts a sandbox may reach, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRule {
    pub host: HostPattern,
    /// Ports allowed; empty means [`DEFAULT_PORTS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Methods allowed (upper case); empty means any. On HTTPS a method can
    /// only be seen inside TLS, so a rule that lists methods is terminated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Headers set on every request this rule allows; for HTTPS the proxy
    /// terminates TLS to set them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderRule>,
    /// Connect here instead of resolving the name (like curl's `--resolve`).
    /// Naming an address is what lets a rule reach loopback or a private
    /// network; resolved addresses in those ranges are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_to: Option<SocketAddr>,
}

impl HostRule {
    /// A rule allowing `host` on the default ports, any method, no headers.
    pub fn allow(host: HostPattern) -> Self {
        Self { host, ports: Vec::new(), methods: Vec::new(), headers: Vec::new(), connect_to: None }
    }

    /// Does the rule allow `port`?
    pub fn allows_port(&self, port: u16) -> bool {
        if self.ports.is_empty() { DEFAULT_PORTS.contains(&port) } else { self.ports.contains(&port) }
    }

    /// Does the rule allow `method` (`None`: not known yet, as for a tunnel)?
    pub fn allows_method(&self, method: Option<&str>) -> bool {
        match method {
            None => true,
            Some(method) => self.methods.is_empty() || self.methods.iter().any(|allowed| allowed.eq_ignore_ascii_case(method)),
        }
    }

    /// Must HTTPS to this host be terminated (headers to add, or methods to check)?
    pub fn needs_termination(&self) -> bool {
        !self.headers.is_empty() || !self.methods.is_empty()
    }

    /// Does the rule name this address, so that it may be dialled even in a
    /// range the proxy otherwise refuses (loopback, private, link-local)?
    pub fn names_address(&self, address: IpAddr) -> bool {
        self.host.address() == Some(address) || self.connect_to.is_some_and(|target| target.ip() == address)
    }

    fn validate(&self) -> Result<(), PolicyError> {
        count("ports in a rule", self.ports.len(), MAX_PORTS)?;
        count("methods in a rule", self.methods.len(), MAX_METHODS)?;
        count("headers in a rule", self.headers.len(), MAX_HEADER_RULES)?;
        if self.ports.contains(&0) || self.connect_to.is_some_and(|target| target.port() == 0) {
            return Err(PolicyError::Port);
        }
        for method in &self.methods {
            if !(1..=32).contains(&method.len()) || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(PolicyError::Method { method: method.clone() });
            }
        }
        self.headers.iter().try_for_each(HeaderRule::validate)
    }
}

/// A sandbox's outbound policy. The default allows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetworkPolicy {
    /// Hosts that may be reached; the first rule matching host and port applies.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<HostRule>,
    /// Hosts that may never be reached, whatever `allow` says.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<HostPattern>,
}

/// The outcome of asking a policy about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    Allow(&'a HostRule),
    Deny(DenyReason),
}

/// Why a request is denied, for the error the sandbox sees and the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenyReason {
    /// No allow rule names the host.
    NotAllowed,
    /// A deny rule names it.
    Denied,
    /// A rule names the host, but not this port.
    Port,
    /// A rule names host and port, but not this method.
    Method,
    /// The host is not a DNS name or an IP address.
    InvalidHost,
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotAllowed => "no rule of the sandbox's network policy allows this host",
            Self::Denied => "the sandbox's network policy denies this host",
            Self::Port => "the sandbox's network policy does not allow this port for this host",
            Self::Method => "the sandbox's network policy does not allow this method for this host",
            Self::InvalidHost => "not a valid host name",
        })
    }
}

impl NetworkPolicy {
    /// Deny everything (the default).
    pub fn deny_all() -> Self {
        Self::default()
    }

    /// Checks limits and every rule.
    pub fn validate(&self) -> Result<(), PolicyError> {
        count("allow rules", self.allow.len(), MAX_ALLOW_RULES)?;
        count("deny rules", self.deny.len(), MAX_DENY_RULES)?;
        self.allow.iter().try_for_each(HostRule::validate)
    }

    /// Decides a request to `host:port`. `method` is `None` where it cannot be
    /// known (a CONNECT tunnel that will not be terminated).
    pub fn decide(&self, host: &str, port: u16, method: Option<&str>) -> Verdict<'_> {
        let Some(host) = normalize_host(host) else {
            return Verdict::Deny(DenyReason::InvalidHost);
        };
        if self.deny.iter().any(|pattern| pattern.matches(&host)) {
            return Verdict::Deny(DenyReason::Denied);
        }
        let mut reason = DenyReason::NotAllowed;
        for rule in self.allow.iter().filter(|rule| rule.host.matches(&host)) {
            if !rule.allows_port(port) {
                reason = DenyReason::Port;
            } else if !rule.allows_method(method) {
                reason = DenyReason::Method;
            } else {
                return Verdict::Allow(rule);
            }
        }
        Verdict::Deny(reason)
    }

    /// Every secret name the policy refers to.
    pub fn secret_names(&self) -> impl Iterator<Item = &str> {
        self.allow.iter().flat_map(|rule| rule.headers.iter().map(|header| header.secret.as_str()))
    }
}

fn count(what: &'static str, count: usize, limit: usize) -> Result<(), PolicyError> {
    if count > limit { Err(PolicyError::TooMany { what, count, limit }) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> HostPattern {
        HostPattern::new(text).unwrap()
    }

    #[test]
    fn the_default_policy_denies_everything() {
        let policy = NetworkPolicy::default();
        assert_eq!(policy.decide("example.com", 443, None), Verdict::Deny(DenyReason::NotAllowed));
        assert_eq!(policy.decide("127.0.0.1", 80, Some("GET")), Verdict::Deny(DenyReason::NotAllowed));
    }

    #[test]
    fn suffix_patterns_match_names_below_only() {
        let suffix = pattern("*.Example.com.");
        assert!(suffix.matches("api.example.com"));
        assert!(suffix.matches("a.b.example.com"));
        assert!(!suffix.matches("example.com"));
        assert!(!suffix.matches("badexample.com"));
        assert!(!suffix.matches("example.com.evil.net"));
        let exact = pattern("pypi.org");
        assert!(exact.matches("pypi.org"));
        assert!(!exact.matches("files.pypi.org"));
    }

    #[test]
    fn a_denied_host_wins_over_an_allowed_one() {
        let policy = NetworkPolicy { allow: vec![HostRule::allow(pattern("*"))], deny: vec![pattern("*.evil.net")] };
        assert!(matches!(policy.decide("ok.org", 443, None), Verdict::Allow(_)));
        assert_eq!(policy.decide("x.evil.net", 443, None), Verdict::Deny(DenyReason::Denied));
        assert_eq!(policy.decide("X.EVIL.NET.", 443, None), Verdict::Deny(DenyReason::Denied));
    }

    #[test]
    fn ports_and_methods_narrow_a_rule() {
        let mut rule = HostRule::allow(pattern("api.test"));
        rule.methods = vec!["GET".into()];
        let policy = NetworkPolicy { allow: vec![rule], deny: vec![] };
        assert!(matches!(policy.decide("api.test", 443, Some("get")), Verdict::Allow(_)));
        assert_eq!(policy.decide("api.test", 8443, Some("GET")), Verdict::Deny(DenyReason::Port));
        assert_eq!(policy.decide("api.test", 443, Some("POST")), Verdict::Deny(DenyReason::Method));
        assert!(policy.allow[0].needs_termination());
    }

    #[test]
    fn ip_literals_are_normalised_and_named() {
        let rule = HostRule { connect_to: Some("10.0.0.5:8080".parse().unwrap()), ..HostRule::allow(pattern("[::1]")) };
        assert_eq!(rule.host.as_str(), "::1");
        assert!(rule.names_address("::1".parse().unwrap()));
        assert!(rule.names_address("10.0.0.5".parse().unwrap()));
        assert!(!rule.names_address("127.0.0.1".parse().unwrap()));
        assert_eq!(normalize_host("[::1]").as_deref(), Some("::1"));
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        for bad in ["", "exa mple.com", "-a.com", "a..com", "*.", "**.a.com", "a.*.com", "例.com"] {
            assert!(matches!(HostPattern::new(bad), Err(PolicyError::Host { .. })), "{bad:?}");
        }
        let header = |name: &str, secret: &str| HostRule {
            headers: vec![HeaderRule { name: name.into(), secret: secret.into(), prefix: String::new() }],
            ..HostRule::allow(pattern("a.test"))
        };
        for (name, secret) in [("Host", "s"), ("Proxy-Authorization", "s"), ("bad header", "s"), ("Authorization", "Bad/Name")] {
            let policy = NetworkPolicy { allow: vec![header(name, secret)], deny: vec![] };
            assert!(policy.validate().is_err(), "{name} {secret}");
        }
        let policy = NetworkPolicy { allow: vec![header("Authorization", "gh-token")], deny: vec![] };
        assert_eq!(policy.validate(), Ok(()));
        assert_eq!(policy.secret_names().collect::<Vec<_>>(), ["gh-token"]);
        let too_many = NetworkPolicy { allow: vec![HostRule::allow(pattern("a.test")); MAX_ALLOW_RULES + 1], deny: vec![] };
        assert!(matches!(too_many.validate(), Err(PolicyError::TooMany { limit: MAX_ALLOW_RULES, .. })));
        let port_zero = NetworkPolicy { allow: vec![HostRule { ports: vec![0], ..HostRule::allow(pattern("a.test")) }], deny: vec![] };
        assert_eq!(port_zero.validate(), Err(PolicyError::Port));
    }

    #[test]
    fn unknown_fields_are_refused_and_patterns_checked_when_parsed() {
        assert!(serde_json::from_str::<NetworkPolicy>(r#"{"allow":[{"host":"a.test","bogus":1}]}"#).is_err());
        assert!(serde_json::from_str::<NetworkPolicy>(r#"{"allow":[{"host":"a b"}]}"#).is_err());
        let parsed: NetworkPolicy = serde_json::from_str(r#"{"allow":[{"host":"*.A.test","ports":[8080]}],"deny":["b.a.test"]}"#).unwrap();
        assert_eq!(parsed.allow[0].host.as_str(), "*.a.test");
        assert_eq!(parsed.decide("b.a.test", 8080, None), Verdict::Deny(DenyReason::Denied));
        assert!(matches!(parsed.decide("c.a.test", 8080, None), Verdict::Allow(_)));
    }
}
