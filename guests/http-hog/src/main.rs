//! A hostile wasi:http guest (tests/egress_isolates.rs): opens the URL given
//! as its first argument as many times as its second argument says, reads
//! none of the response bodies, and prints one line per request: `ok STATUS`
//! or `error MESSAGE`. The host must bound the requests it holds open.

use wasip2::http::outgoing_handler;
use wasip2::http::types::{ErrorCode, Fields, OutgoingBody, OutgoingRequest, Scheme};

fn text(code: &ErrorCode) -> String {
    match code {
        ErrorCode::InternalError(Some(message)) => message.clone(),
        other => format!("{other:?}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(authority), Some(path)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: http-hog AUTHORITY PATH COUNT");
        std::process::exit(2);
    };
    let count: usize = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(20);
    // Kept alive to the end: none of these bodies is read or dropped.
    let mut held = Vec::new();
    for _ in 0..count {
        let request = OutgoingRequest::new(Fields::new());
        let _ = request.set_scheme(Some(&Scheme::Http));
        let _ = request.set_authority(Some(authority));
        let _ = request.set_path_with_query(Some(path));
        let Ok(body) = request.body() else { continue };
        let pending = match outgoing_handler::handle(request, None) {
            Ok(pending) => pending,
            Err(error) => {
                println!("error {}", text(&error));
                continue;
            }
        };
        let _ = OutgoingBody::finish(body, None);
        let answer = loop {
            match pending.get() {
                Some(answer) => break answer,
                None => pending.subscribe().block(),
            }
        };
        match answer {
            Ok(Ok(response)) => {
                println!("ok {}", response.status());
                held.push(response);
            }
            Ok(Err(error)) => println!("error {}", text(&error)),
            Err(()) => println!("error taken twice"),
        }
    }
}
