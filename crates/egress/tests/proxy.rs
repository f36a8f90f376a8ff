//! The egress proxy end to end, on loopback only: upstreams on 127.0.0.1,
//! a sandbox proxy bound in a temporary directory, clients on its socket.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use airlock_core::network::{DenyReason, NetworkPolicy};
use airlock_egress::{Denial, Egress, EgressCa, EgressError, NoSink, SecretSource, Verdict};
use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn an_allowed_get_reaches_the_upstream_in_origin_form_without_proxy_headers() {
    let upstream = upstream(None).await;
    let proxy = proxy(policy(vec![allow("127.0.0.1", &[upstream.port()])]), None).await;
    let mut client = client(&proxy.socket).await;
    let url = format!("http://127.0.0.1:{}/path?q=1", upstream.port());
    let mut request = get(&url);
    request.headers_mut().insert("proxy-authorization", "Basic c2VjcmV0".parse().unwrap());
    request.headers_mut().insert("proxy-connection", "keep-alive".parse().unwrap());
    let answer = send(&mut client, request).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, UPSTREAM_BODY);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/path?q=1");
    assert_eq!(seen[0].headers["host"], format!("127.0.0.1:{}", upstream.port()).as_str());
    assert!(!seen[0].headers.contains_key("proxy-authorization"));
    assert!(!seen[0].headers.contains_key("proxy-connection"));
}

#[tokio::test]
async fn a_denied_host_gets_403_naming_it_and_the_upstream_sees_nothing() {
    let upstream = upstream(None).await;
    let proxy = proxy(policy(vec![allow("example.test", &[upstream.port()])]), None).await;
    let mut client = client(&proxy.socket).await;
    let answer = send(&mut client, get(&format!("http://127.0.0.1:{}/", upstream.port()))).await;
    assert_eq!(answer.status, 403);
    assert!(answer.body.contains("127.0.0.1"), "{}", answer.body);
    assert!(answer.body.contains("network policy"), "{}", answer.body);
    assert_eq!(upstream.accepts(), 0);
    let decision = proxy.sink.wait_for(|decision| decision.verdict != Verdict::Allowed).await;
    assert_eq!(decision.verdict, Verdict::Denied(Denial::Policy(DenyReason::NotAllowed)));
    assert_eq!(decision.status, Some(403));
    assert_eq!(decision.sandbox, "sbx-test");
}

#[tokio::test]
async fn a_host_header_disagreeing_with_the_url_is_a_bad_request() {
    let upstream = upstream(None).await;
    let proxy = proxy(policy(vec![allow("127.0.0.1", &[upstream.port()])]), None).await;
    let mut client = client(&proxy.socket).await;
    let mut request = get(&format!("http://127.0.0.1:{}/", upstream.port()));
    request.headers_mut().insert("host", "evil.test".parse().unwrap());
    assert_eq!(send(&mut client, request).await.status, 400);
    assert_eq!(upstream.accepts(), 0);
}

#[tokio::test]
async fn an_injected_header_replaces_the_clients_over_plain_http() {
    let upstream = upstream(None).await;
    let proxy = proxy(policy(vec![with_token(allow("127.0.0.1", &[upstream.port()]), "Authorization")]), None).await;
    let mut client = client(&proxy.socket).await;
    let mut request = get(&format!("http://127.0.0.1:{}/api", upstream.port()));
    request.headers_mut().insert("authorization", "Bearer sandbox-made-this-up".parse().unwrap());
    let answer = send(&mut client, request).await;
    assert_eq!(answer.status, 200);
    assert!(!answer.body.contains(SECRET_VALUE) && !format!("{:?}", answer.headers).contains(SECRET_VALUE));
    let seen = upstream.seen();
    let values: Vec<_> = seen[0].headers.get_all("authorization").iter().collect();
    assert_eq!(values, [format!("Bearer {SECRET_VALUE}").as_str()]);
}

#[tokio::test]
async fn a_missing_secret_refuses_the_request_rather_than_sending_it_bare() {
    let upstream = upstream(None).await;
    let mut rule = with_token(allow("127.0.0.1", &[upstream.port()]), "Authorization");
    rule.headers[0].secret = "not-set".to_owned();
    let proxy = proxy(policy(vec![rule]), None).await;
    let mut client = client(&proxy.socket).await;
    let answer = send(&mut client, get(&format!("http://127.0.0.1:{}/", upstream.port()))).await;
    assert_eq!(answer.status, 502);
    assert!(answer.body.contains("not-set"));
    assert_eq!(upstream.accepts(), 0);
}

#[tokio::test]
async fn a_narrowed_policy_denies_the_next_request_on_the_same_kept_alive_connection() {
    let upstream = upstream(None).await;
    let proxy = proxy(policy(vec![allow("127.0.0.1", &[upstream.port()])]), None).await;
    let mut client = client(&proxy.socket).await;
    let url = format!("http://127.0.0.1:{}/", upstream.port());
    assert_eq!(send(&mut client, get(&url)).await.status, 200);
    proxy.policy.send(Arc::new(NetworkPolicy::deny_all())).unwrap();
    assert_eq!(send(&mut client, get(&url)).await.status, 403);
    assert_eq!(upstream.seen().len(), 1);
    // Widening applies just as well.
    proxy.policy.send(Arc::new(policy(vec![allow("127.0.0.1", &[upstream.port()])]))).unwrap();
    assert_eq!(send(&mut client, get(&url)).await.status, 200);
    assert_eq!(upstream.seen().len(), 2);
}

#[tokio::test]
async fn decisions_reach_the_sink_with_bytes_counted() {
    let upstream = upstream(None).await;
    let proxy = proxy(policy(vec![allow("127.0.0.1", &[upstream.port()])]), None).await;
    let mut client = client(&proxy.socket).await;
    let url = format!("http://127.0.0.1:{}/bytes/5000", upstream.port());
    let request = Request::post(&url)
        .header("host", format!("127.0.0.1:{}", upstream.port()))
        .body(Full::new(Bytes::from(vec![b'u'; 1234])))
        .unwrap();
    let answer = send(&mut client, request).await;
    assert_eq!((answer.status, answer.body.len()), (200, 5000));
    assert_eq!(upstream.seen()[0].body_len, 1234);
    let decision = proxy.sink.wait_for(|decision| decision.verdict == Verdict::Allowed).await;
    assert_eq!(decision.method.as_deref(), Some("POST"));
    assert_eq!((decision.host.as_str(), decision.port), ("127.0.0.1", upstream.port()));
    assert_eq!((decision.bytes_up, decision.bytes_down), (1234, 5000));
    assert_eq!(decision.status, Some(200));
    assert!(!decision.terminated_tls);
}

#[tokio::test]
async fn a_name_resolving_to_loopback_is_refused_unless_a_rule_names_the_address() {
    let upstream = upstream(None).await;
    let proxy = proxy(policy(vec![allow("localhost", &[upstream.port()])]), None).await;
    let mut client = client(&proxy.socket).await;
    let url = format!("http://localhost:{}/", upstream.port());
    let answer = send(&mut client, get(&url)).await;
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert_eq!(upstream.accepts(), 0);
    let decision = proxy.sink.wait_for(|decision| decision.verdict != Verdict::Allowed).await;
    assert!(matches!(decision.verdict, Verdict::Denied(Denial::ForbiddenAddress(address)) if address.is_loopback()));
    let (status, _, _) = connect(&proxy.socket, &format!("localhost:{}", upstream.port())).await;
    assert_eq!(status, 403);
    assert_eq!(upstream.accepts(), 0);

    let mut named = allow("localhost", &[upstream.port()]);
    named.connect_to = Some(upstream.addr);
    proxy.policy.send(Arc::new(policy(vec![named]))).unwrap();
    assert_eq!(send(&mut client, get(&url)).await.status, 200);
    assert_eq!(upstream.seen()[0].headers["host"], format!("localhost:{}", upstream.port()).as_str());
}

#[tokio::test]
async fn the_metadata_address_is_refused_even_when_every_host_is_allowed() {
    let proxy = proxy(policy(vec![allow("*", &[80, 443])]), None).await;
    let mut client = client(&proxy.socket).await;
    let answer = send(&mut client, get("http://169.254.169.254/latest/meta-data/")).await;
    assert_eq!(answer.status, 403, "{}", answer.body);
    let (status, _, _) = connect(&proxy.socket, "169.254.169.254:443").await;
    assert_eq!(status, 403);
    let (status, _, _) = connect(&proxy.socket, "[::ffff:169.254.169.254]:443").await;
    assert_eq!(status, 403);
    let denials = proxy.sink.all();
    assert_eq!(denials.len(), 3);
    assert!(
        denials.iter().all(|decision| matches!(decision.verdict, Verdict::Denied(Denial::ForbiddenAddress(_)))),
        "{denials:?}"
    );
}

#[tokio::test]
async fn connect_to_a_denied_port_is_refused_before_any_tunnel() {
    let upstream = upstream(None).await;
    let proxy = proxy(policy(vec![allow("127.0.0.1", &[upstream.port()])]), None).await;
    let other_port = if upstream.port() == 65535 { 65534 } else { upstream.port() + 1 };
    let (status, body, _) = connect(&proxy.socket, &format!("127.0.0.1:{other_port}")).await;
    assert_eq!(status, 403);
    assert!(body.contains("port"), "{body}");
    let decision = proxy.sink.wait_for(|_| true).await;
    assert_eq!(decision.verdict, Verdict::Denied(Denial::Policy(DenyReason::Port)));
    assert_eq!(decision.method, None);
}

#[tokio::test]
async fn tunnelled_https_passes_through_untouched() {
    let pki = test_pki(&["upstream.test"]);
    let upstream = upstream(Some(pki.server.clone())).await;
    let mut rule = allow("upstream.test", &[upstream.port()]);
    rule.connect_to = Some(upstream.addr);
    let proxy = proxy(policy(vec![rule]), None).await;
    let (status, _, stream) = connect(&proxy.socket, &format!("upstream.test:{}", upstream.port())).await;
    assert_eq!(status, 200);
    // Trusting only the test CA: the handshake succeeds only with the upstream's own certificate.
    let tls = tls_over(stream, &pki.ca_pem, "upstream.test").await.unwrap();
    assert_eq!(tls.get_ref().1.peer_certificates().unwrap()[0], pki.leaf_der);
    let mut client = over(tls).await;
    let request = Request::get("/inside")
        .header("host", "upstream.test")
        .header("authorization", "Bearer the-sandbox-own")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = send(&mut client, request).await;
    assert_eq!((answer.status, answer.body.as_str()), (200, UPSTREAM_BODY));
    assert_eq!(upstream.seen()[0].headers["authorization"], "Bearer the-sandbox-own");
    drop(client);
    let decision = proxy.sink.wait_for(|decision| decision.verdict == Verdict::Allowed).await;
    assert!(!decision.terminated_tls);
    assert_eq!(decision.method, None);
    assert!(decision.bytes_up > 0 && decision.bytes_down > 0, "{decision:?}");
}

#[tokio::test]
async fn injected_headers_reach_the_upstream_over_terminated_https_and_methods_are_checked_per_request() {
    let pki = test_pki(&["upstream.test"]);
    let upstream = upstream(Some(pki.server.clone())).await;
    let mut rule = with_token(allow("upstream.test", &[upstream.port()]), "X-Api-Key");
    rule.connect_to = Some(upstream.addr);
    let proxy = proxy(policy(vec![rule.clone()]), Some(&pki.ca_pem)).await;
    let (status, _, stream) = connect(&proxy.socket, &format!("upstream.test:{}", upstream.port())).await;
    assert_eq!(status, 200);
    // The sandbox trusts the bundle the proxy wrote (the runtime CA), not the upstream's CA.
    let bundle = std::fs::read_to_string(&proxy.bundle).unwrap();
    assert!(!bundle.contains(pki.ca_pem.trim()));
    let tls = tls_over(stream, &bundle, "upstream.test").await.unwrap();
    assert_ne!(tls.get_ref().1.peer_certificates().unwrap()[0], pki.leaf_der);
    let mut client = over(tls).await;
    let request = |method: &str| {
        Request::builder()
            .method(method)
            .uri("/secret-api")
            .header("host", format!("upstream.test:{}", upstream.port()))
            .header("x-api-key", "sandbox-made-this-up")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let answer = send(&mut client, request("GET")).await;
    assert_eq!((answer.status, answer.body.as_str()), (200, UPSTREAM_BODY));
    let seen = upstream.seen();
    let values: Vec<_> = seen[0].headers.get_all("x-api-key").iter().collect();
    assert_eq!(values, [format!("Bearer {SECRET_VALUE}").as_str()]);
    assert_eq!(seen[0].uri, "/secret-api");

    // Narrowed to GET: the next POST on the same TLS connection is refused.
    let mut narrowed = rule;
    narrowed.methods = vec!["GET".to_owned()];
    proxy.policy.send(Arc::new(policy(vec![narrowed]))).unwrap();
    let answer = send(&mut client, request("POST")).await;
    assert_eq!(answer.status, 403, "{}", answer.body);
    assert_eq!(send(&mut client, request("GET")).await.status, 200);
    assert_eq!(upstream.seen().len(), 2);
    let decision = proxy.sink.wait_for(|decision| decision.verdict == Verdict::Allowed).await;
    assert!(decision.terminated_tls);
    assert_eq!(decision.method.as_deref(), Some("GET"));
    let denial = proxy.sink.wait_for(|decision| decision.verdict != Verdict::Allowed).await;
    assert_eq!(denial.verdict, Verdict::Denied(Denial::Policy(DenyReason::Method)));
}

#[tokio::test]
async fn an_sni_differing_from_the_connect_host_is_refused() {
    // The upstream's certificate covers both names, so only the SNI check stops this.
    let pki = test_pki(&["upstream.test", "other.test"]);
    let upstream = upstream(Some(pki.server.clone())).await;
    let mut rule = allow("upstream.test", &[upstream.port()]);
    rule.connect_to = Some(upstream.addr);
    let proxy = proxy(policy(vec![rule]), None).await;
    let (status, _, stream) = connect(&proxy.socket, &format!("upstream.test:{}", upstream.port())).await;
    assert_eq!(status, 200);
    assert!(tls_over(stream, &pki.ca_pem, "other.test").await.is_err());
    let decision = proxy.sink.wait_for(|_| true).await;
    assert_eq!(decision.verdict, Verdict::Denied(Denial::SniMismatch));
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn sni_is_required_for_a_named_host_but_not_for_an_ip_literal() {
    // The certificate covers the name and the address, so only the SNI rule decides.
    let pki = test_pki(&["upstream.test", "127.0.0.1"]);
    let upstream = upstream(Some(pki.server.clone())).await;
    let mut named = allow("upstream.test", &[upstream.port()]);
    named.connect_to = Some(upstream.addr);
    let proxy = proxy(policy(vec![named, allow("127.0.0.1", &[upstream.port()])]), None).await;

    let (status, _, stream) = connect(&proxy.socket, &format!("upstream.test:{}", upstream.port())).await;
    assert_eq!(status, 200);
    assert!(tls_over(stream, &pki.ca_pem, "127.0.0.1").await.is_err());
    assert_eq!(proxy.sink.wait_for(|_| true).await.verdict, Verdict::Denied(Denial::MissingSni));

    let (status, _, stream) = connect(&proxy.socket, &format!("127.0.0.1:{}", upstream.port())).await;
    assert_eq!(status, 200);
    let mut client = over(tls_over(stream, &pki.ca_pem, "127.0.0.1").await.unwrap()).await;
    let request = Request::get("/ip").header("host", "127.0.0.1").body(Full::new(Bytes::new())).unwrap();
    assert_eq!(send(&mut client, request).await.status, 200);
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn a_tunnel_that_does_not_carry_tls_is_refused() {
    let upstream = upstream(None).await;
    let proxy = proxy(policy(vec![allow("127.0.0.1", &[upstream.port()])]), None).await;
    let (status, _, mut stream) = connect(&proxy.socket, &format!("127.0.0.1:{}", upstream.port())).await;
    assert_eq!(status, 200);
    stream.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest)).await.unwrap();
    assert!(read.is_err() || rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert_eq!(proxy.sink.wait_for(|_| true).await.verdict, Verdict::Denied(Denial::NotTls));
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let upstream = upstream(None).await;
    let mut config = config(None);
    config.max_header_bytes = 4096;
    let proxy = proxy_with(policy(vec![allow("127.0.0.1", &[upstream.port()])]), config).await;
    let mut client = client(&proxy.socket).await;
    let mut request = get(&format!("http://127.0.0.1:{}/", upstream.port()));
    request.headers_mut().insert("x-big", "a".repeat(8000).parse().unwrap());
    let status = tokio::time::timeout(Duration::from_secs(10), client.send_request(request))
        .await
        .unwrap()
        .map(|r| r.status().as_u16());
    assert!(matches!(status, Ok(431)) || status.is_err(), "{status:?}");
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn connections_beyond_the_per_sandbox_limit_get_503() {
    let upstream = upstream(None).await;
    let mut config = config(None);
    config.max_connections_per_sandbox = 1;
    let proxy = proxy_with(policy(vec![allow("127.0.0.1", &[upstream.port()])]), config).await;
    let mut first = client(&proxy.socket).await;
    let url = format!("http://127.0.0.1:{}/", upstream.port());
    assert_eq!(send(&mut first, get(&url)).await.status, 200);
    let mut second = client(&proxy.socket).await;
    let answer = send(&mut second, get(&url)).await;
    assert_eq!(answer.status, 503);
    assert!(answer.body.contains("1 connections"), "{}", answer.body);
    drop(first);
    // The slot frees when the first connection closes.
    let mut freed = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut third = client(&proxy.socket).await;
        if send(&mut third, get(&url)).await.status == 200 {
            freed = true;
            break;
        }
    }
    assert!(freed);
}

#[tokio::test]
async fn shutdown_ends_open_tunnels() {
    let pki = test_pki(&["upstream.test"]);
    let upstream = upstream(Some(pki.server.clone())).await;
    let mut rule = allow("upstream.test", &[upstream.port()]);
    rule.connect_to = Some(upstream.addr);
    let mut proxy = proxy(policy(vec![rule]), None).await;
    let (status, _, stream) = connect(&proxy.socket, &format!("upstream.test:{}", upstream.port())).await;
    assert_eq!(status, 200);
    let mut tls = tls_over(stream, &pki.ca_pem, "upstream.test").await.unwrap();
    proxy.handle.take().unwrap().shutdown();
    let mut buffer = [0u8; 16];
    let read =
        tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buffer)).await.expect("the tunnel stayed open");
    assert!(matches!(read, Ok(0) | Err(_)));
    assert!(tokio::net::UnixStream::connect(&proxy.socket).await.is_err());
}

#[tokio::test]
async fn the_socket_and_bundle_are_written_with_their_modes_and_a_stale_socket_is_replaced() {
    let upstream = upstream(None).await;
    let proxy = proxy(policy(vec![allow("127.0.0.1", &[upstream.port()])]), None).await;
    let meta = std::fs::symlink_metadata(&proxy.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o666);
    let dir = proxy.socket.parent().unwrap().to_owned();
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o755);
    let bundle = std::fs::read_to_string(&proxy.bundle).unwrap();
    assert!(bundle.contains(proxy.egress.ca().cert_pem().trim()));

    // The first proxy's socket is stale once it is shut down: a new bind replaces it.
    let (_keep, receiver) = tokio::sync::watch::channel(Arc::new(policy(vec![allow("127.0.0.1", &[upstream.port()])])));
    let mut proxy = proxy;
    proxy.handle.take().unwrap().shutdown();
    let handle = proxy.egress.bind_sandbox("sbx-again".to_owned(), &dir, receiver).unwrap();
    let mut client = client(handle.socket_path()).await;
    assert_eq!(send(&mut client, get(&format!("http://127.0.0.1:{}/", upstream.port()))).await.status, 200);
}

#[tokio::test]
async fn a_symlink_at_the_socket_path_is_not_followed_and_other_files_are_not_replaced() {
    let proxy = proxy(NetworkPolicy::deny_all(), None).await;
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let dangling = outside.path().join("dangling");

    for target in [&victim, &dangling] {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(target, dir.path().join("proxy.sock")).unwrap();
        let (_keep, receiver) = tokio::sync::watch::channel(Arc::new(NetworkPolicy::deny_all()));
        let handle = proxy.egress.bind_sandbox("sbx-link".to_owned(), dir.path(), receiver).unwrap();
        assert!(std::fs::symlink_metadata(handle.socket_path()).unwrap().file_type().is_socket());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        assert!(!dangling.exists());
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("proxy.sock"), b"data").unwrap();
    let (_keep, receiver) = tokio::sync::watch::channel(Arc::new(NetworkPolicy::deny_all()));
    let refused = proxy.egress.bind_sandbox("sbx-file".to_owned(), dir.path(), receiver);
    assert!(matches!(refused, Err(EgressError::SocketPathOccupied { .. })));
    assert_eq!(std::fs::read(dir.path().join("proxy.sock")).unwrap(), b"data");
}

#[tokio::test]
async fn send_request_applies_the_same_policy_injection_and_address_checks() {
    let plain = upstream(None).await;
    let pki = test_pki(&["upstream.test"]);
    let secure = upstream(Some(pki.server.clone())).await;
    let mut https_rule = with_token(allow("upstream.test", &[secure.port()]), "Authorization");
    https_rule.connect_to = Some(secure.addr);
    let rules =
        policy(vec![with_token(allow("127.0.0.1", &[plain.port()]), "Authorization"), https_rule, allow("*", &[80])]);
    let proxy = proxy(rules.clone(), Some(&pki.ca_pem)).await;
    let request = |url: String| {
        Request::get(url).header("authorization", "Bearer guest-made-this-up").body(Full::new(Bytes::new())).unwrap()
    };

    for (url, upstream) in [
        (format!("http://127.0.0.1:{}/a", plain.port()), &plain),
        (format!("https://upstream.test:{}/b", secure.port()), &secure),
    ] {
        let response = proxy.egress.send_request("sbx-isolate", &rules, request(url)).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
        assert_eq!(body, UPSTREAM_BODY.as_bytes());
        let values: Vec<_> = upstream.seen()[0].headers.get_all("authorization").iter().cloned().collect();
        assert_eq!(values, [format!("Bearer {SECRET_VALUE}").as_str()]);
    }
    let allowed =
        proxy.sink.wait_for(|decision| decision.verdict == Verdict::Allowed && decision.sandbox == "sbx-isolate").await;
    assert_eq!(allowed.bytes_down, UPSTREAM_BODY.len() as u64);

    let denied = proxy.egress.send_request("sbx-isolate", &rules, request("http://other.test:8080/".to_owned())).await;
    let error = denied.unwrap_err();
    assert!(
        matches!(error, airlock_egress::OutboundError::Denied { denial: Denial::Policy(DenyReason::Port), .. }),
        "{error}"
    );
    assert!(error.to_string().contains("other.test") && error.to_string().contains("network policy"), "{error}");
    let metadata =
        proxy.egress.send_request("sbx-isolate", &rules, request("http://169.254.169.254/".to_owned())).await;
    assert!(matches!(metadata, Err(airlock_egress::OutboundError::Denied { denial: Denial::ForbiddenAddress(_), .. })));
}

/// A sandbox directory deeper than a socket path may be (108 bytes) still
/// gets its proxy: the socket is bound through the directory's descriptor.
/// (A runtime home under a build tree's target directory is that deep.)
#[tokio::test]
async fn a_socket_in_a_directory_deeper_than_sun_len_is_bound() {
    let dir = tempfile::tempdir().unwrap();
    let deep = dir.path().join("d".repeat(60)).join("e".repeat(60)).join("egress");
    assert!(deep.join("proxy.sock").as_os_str().len() > 108);
    let ca = EgressCa::load_or_create(&dir.path().join("ca")).unwrap();
    let egress = Egress::new(config(None), ca, Arc::new(NoSecrets), Arc::new(NoSink)).unwrap();
    let (_policy, receiver) = tokio::sync::watch::channel(Arc::new(policy(Vec::new())));
    let handle = egress.bind_sandbox("sbx-deep".to_owned(), &deep, receiver).unwrap();
    let mode = std::fs::symlink_metadata(handle.socket_path()).unwrap();
    assert!(mode.file_type().is_socket());
    assert_eq!(mode.permissions().mode() & 0o777, 0o666);
    // A client reaches it the same short way (a container, by its mount).
    let opened = std::fs::File::open(&deep).unwrap();
    let short = format!("/proc/self/fd/{}/proxy.sock", std::os::fd::AsRawFd::as_raw_fd(&opened));
    let mut client = client(std::path::Path::new(&short)).await;
    let answer = send(&mut client, get("http://denied.test/")).await;
    assert_eq!(answer.status, 403, "{}", answer.body);
}

struct NoSecrets;

impl SecretSource for NoSecrets {
    fn secret(&self, _name: &str) -> Option<String> {
        None
    }
}
