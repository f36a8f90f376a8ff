//! Airlock's JavaScript interpreter guest: the Boa engine behind the
//! `airlock:sandbox/interpreter` world.
//!
//! One component instance is one context: the Boa realm lives for the whole
//! instance, so globals persist across `eval` calls. Pending jobs (promise
//! reactions, async functions) are run before `eval` returns; a promise result
//! is unwrapped to what it settled to.
//!
//! Globals beyond the language: `console` (log/info/debug to stdout, warn/error
//! to stderr), `fs` (synchronous workspace file access, also from
//! `require("fs")`), `fetch` (with `Headers` and `Response`) over wasi:http,
//! whose requests the host sends under the sandbox's network policy, and
//! `require`, which escalates for `child_process` and network modules and
//! reports any other module as missing; `display` (rich outputs as MIME
//! bundles, see display.js), also applied to a last value with a rich
//! representation. Writes through `fs` are reported to the host as the
//! evaluation's side effects.

use std::cell::RefCell;
use std::io::Write;

use boa_engine::builtins::promise::PromiseState;
use boa_engine::object::ObjectInitializer;
use boa_engine::object::builtins::{JsArray, JsPromise};
use boa_engine::property::Attribute;
use boa_engine::{Context, JsError, JsNativeError, JsResult, JsString, JsValue, NativeFunction, Script, Source, js_string};

wit_bindgen::generate!({ world: "interpreter", path: "../../wit" });

mod http;

use airlock::sandbox::host::{self as host, DisplayData};
use exports::airlock::sandbox::evaluator::{CodeError, Escalation, EvalError, Guest, Value};

const WORKSPACE: &str = "/workspace";

thread_local! {
    static CONTEXT: RefCell<Option<Context>> = const { RefCell::new(None) };
    /// Set by a host-facing function when the code needs a container; checked
    /// after evaluation so that `try`/`catch` in the code cannot hide it.
    static ESCALATION: RefCell<Option<Escalation>> = const { RefCell::new(None) };
}

fn escalate(escalation: Escalation) -> JsError {
    let message = match &escalation {
        Escalation::Subprocess => "starting a process needs a container".to_string(),
        Escalation::Network => "network access needs a container".to_string(),
        Escalation::MissingModule(name) => format!("module {name:?} is not available in the isolate"),
        Escalation::NativeExtension(name) => format!("native extension {name:?} needs a container"),
    };
    ESCALATION.with(|slot| *slot.borrow_mut() = Some(escalation));
    JsNativeError::error().with_message(message).into()
}

fn text_of(value: &JsValue, context: &mut Context) -> String {
    if let Some(string) = value.as_string() {
        return string.to_std_string_escaped();
    }
    if value.is_object() && !value.is_callable() {
        if let Ok(Some(json)) = value.to_json(context) {
            return json.to_string();
        }
    }
    value.to_string(context).map(|s| s.to_std_string_escaped()).unwrap_or_else(|_| "<unprintable>".into())
}

fn print_line(args: &[JsValue], context: &mut Context, to_stderr: bool) {
    let line = args.iter().map(|arg| text_of(arg, context)).collect::<Vec<_>>().join(" ");
    if to_stderr {
        let _ = writeln!(std::io::stderr(), "{line}");
    } else {
        let _ = writeln!(std::io::stdout(), "{line}");
    }
}

fn console_out(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    print_line(args, context, false);
    Ok(JsValue::undefined())
}

fn console_err(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    print_line(args, context, true);
    Ok(JsValue::undefined())
}

fn workspace_path(args: &[JsValue], context: &mut Context) -> JsResult<String> {
    let raw = named_path(args, context)?;
    Ok(if raw.starts_with('/') { raw } else { format!("{WORKSPACE}/{raw}") })
}

/// The path as the code named it.
fn named_path(args: &[JsValue], context: &mut Context) -> JsResult<String> {
    Ok(args.first().cloned().unwrap_or_default().to_string(context)?.to_std_string_escaped())
}

/// Tells the host the code changed a file (reported whether or not the
/// change then succeeded: it may have happened in part).
fn changed(operation: &str, args: &[JsValue], context: &mut Context) -> JsResult<()> {
    let path = named_path(args, context)?;
    host::file_changed(operation, &path);
    Ok(())
}

fn io_error(path: &str, error: std::io::Error) -> JsError {
    JsNativeError::error().with_message(format!("{path}: {error}")).into()
}

fn fs_read_file(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let path = workspace_path(args, context)?;
    let text = std::fs::read_to_string(&path).map_err(|e| io_error(&path, e))?;
    Ok(JsValue::from(JsString::from(text.as_str())))
}

fn fs_write_file(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let path = workspace_path(args, context)?;
    changed("write", args, context)?;
    let data = args.get(1).cloned().unwrap_or_default().to_string(context)?.to_std_string_escaped();
    std::fs::write(&path, data).map_err(|e| io_error(&path, e))?;
    Ok(JsValue::undefined())
}

fn fs_readdir(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let path = workspace_path(args, context)?;
    let mut names: Vec<String> = std::fs::read_dir(&path)
        .map_err(|e| io_error(&path, e))?
        .filter_map(|entry| entry.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    let values: Vec<JsValue> = names.iter().map(|n| JsValue::from(JsString::from(n.as_str()))).collect();
    Ok(JsArray::from_iter(values, context).into())
}

fn fs_exists(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let path = workspace_path(args, context)?;
    Ok(JsValue::from(std::path::Path::new(&path).exists()))
}

fn fs_mkdir(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let path = workspace_path(args, context)?;
    if !std::path::Path::new(&path).is_dir() {
        changed("mkdir", args, context)?;
    }
    std::fs::create_dir_all(&path).map_err(|e| io_error(&path, e))?;
    Ok(JsValue::undefined())
}

fn fs_rm(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let path = workspace_path(args, context)?;
    let meta = std::fs::symlink_metadata(&path).map_err(|e| io_error(&path, e))?;
    changed("remove", args, context)?;
    if meta.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) }.map_err(|e| io_error(&path, e))?;
    Ok(JsValue::undefined())
}

fn require(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let name = args.first().cloned().unwrap_or_default().to_string(context)?.to_std_string_escaped();
    let bare = name.strip_prefix("node:").unwrap_or(&name);
    match bare {
        "fs" => context.global_object().get(js_string!("fs"), context),
        "child_process" | "cluster" | "worker_threads" => Err(escalate(Escalation::Subprocess)),
        "net" | "http" | "https" | "http2" | "dgram" | "tls" | "dns" => Err(escalate(Escalation::Network)),
        other => Err(escalate(Escalation::MissingModule(other.to_string()))),
    }
}

fn network(_: &JsValue, _: &[JsValue], _: &mut Context) -> JsResult<JsValue> {
    Err(escalate(Escalation::Network))
}

/// The JavaScript half of `fetch`: `Headers`, `Response` and `fetch` itself,
/// over the native `__airlockHttp(url, method, headersJson, body)`.
const FETCH_JS: &str = include_str!("fetch.js");

/// `__airlockHttp(url, method, headersJson, body)`: one blocking wasi:http
/// request; answers `{"status", "headers": [[name, value]...], "body"}` as
/// JSON, or throws an Error with the host's refusal (which names the host
/// and the policy) or the failure.
fn airlock_http(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let arg = |i: usize, context: &mut Context| -> JsResult<Option<String>> {
        match args.get(i) {
            Some(value) if !value.is_null_or_undefined() => Ok(Some(value.to_string(context)?.to_std_string_escaped())),
            _ => Ok(None),
        }
    };
    let url = arg(0, context)?.unwrap_or_default();
    let method = arg(1, context)?.unwrap_or_else(|| "GET".into());
    let headers: Vec<(String, String)> =
        serde_json::from_str(&arg(2, context)?.unwrap_or_else(|| "[]".into())).unwrap_or_default();
    let body = arg(3, context)?;
    let fetched = http::fetch(&url, &method, &headers, body.as_deref().map(str::as_bytes))
        .map_err(|message| JsError::from(JsNativeError::error().with_message(message)))?;
    let answer = serde_json::json!({
        "status": fetched.status,
        "headers": fetched.headers,
        "body": String::from_utf8_lossy(&fetched.body),
    });
    Ok(JsValue::from(JsString::from(answer.to_string().as_str())))
}

/// The JavaScript half of `display`: bundles made from an object's
/// `_repr_*_` methods or given raw, over the natives below.
const DISPLAY_JS: &str = include_str!("display.js");

/// `__airlockDisplay(bundleJson)`: sends one bundle, `[[mime, text]...]`
/// as JSON, to the host (which bounds and keeps it).
fn airlock_display(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let json = args.first().cloned().unwrap_or_default().to_string(context)?.to_std_string_escaped();
    let pairs: Vec<(String, String)> = serde_json::from_str(&json)
        .map_err(|e| JsError::from(JsNativeError::typ().with_message(format!("not a display bundle: {e}"))))?;
    let bundle: Vec<(String, DisplayData)> =
        pairs.into_iter().map(|(mime, text)| (mime, DisplayData::Text(text))).collect();
    host::display(&bundle);
    Ok(JsValue::undefined())
}

/// `__airlockRepr(value)`: the value's text as an evaluation's result shows it.
fn airlock_repr(_: &JsValue, args: &[JsValue], context: &mut Context) -> JsResult<JsValue> {
    let value = args.first().cloned().unwrap_or_default();
    let text = value_text(&value, context);
    Ok(JsValue::from(JsString::from(text.as_str())))
}

fn new_context() -> JsResult<Context> {
    let mut context = Context::default();
    let console = ObjectInitializer::new(&mut context)
        .function(NativeFunction::from_fn_ptr(console_out), js_string!("log"), 0)
        .function(NativeFunction::from_fn_ptr(console_out), js_string!("info"), 0)
        .function(NativeFunction::from_fn_ptr(console_out), js_string!("debug"), 0)
        .function(NativeFunction::from_fn_ptr(console_err), js_string!("warn"), 0)
        .function(NativeFunction::from_fn_ptr(console_err), js_string!("error"), 0)
        .build();
    context.register_global_property(js_string!("console"), console, Attribute::all())?;
    let fs = ObjectInitializer::new(&mut context)
        .function(NativeFunction::from_fn_ptr(fs_read_file), js_string!("readFile"), 1)
        .function(NativeFunction::from_fn_ptr(fs_write_file), js_string!("writeFile"), 2)
        .function(NativeFunction::from_fn_ptr(fs_readdir), js_string!("readdir"), 1)
        .function(NativeFunction::from_fn_ptr(fs_exists), js_string!("exists"), 1)
        .function(NativeFunction::from_fn_ptr(fs_mkdir), js_string!("mkdir"), 1)
        .function(NativeFunction::from_fn_ptr(fs_rm), js_string!("rm"), 1)
        .build();
    context.register_global_property(js_string!("fs"), fs, Attribute::all())?;
    context.register_global_builtin_callable(js_string!("require"), 1, NativeFunction::from_fn_ptr(require))?;
    for name in ["WebSocket", "XMLHttpRequest"] {
        context.register_global_builtin_callable(JsString::from(name), 1, NativeFunction::from_fn_ptr(network))?;
    }
    context.register_global_builtin_callable(js_string!("__airlockHttp"), 4, NativeFunction::from_fn_ptr(airlock_http))?;
    context.eval(Source::from_bytes(FETCH_JS))?;
    context.register_global_builtin_callable(js_string!("__airlockDisplay"), 1, NativeFunction::from_fn_ptr(airlock_display))?;
    context.register_global_builtin_callable(js_string!("__airlockRepr"), 1, NativeFunction::from_fn_ptr(airlock_repr))?;
    context.eval(Source::from_bytes(DISPLAY_JS))?;
    Ok(context)
}

fn property(object: &JsValue, key: &str, context: &mut Context) -> Option<String> {
    let object = object.as_object()?;
    let value = object.get(JsString::from(key), context).ok()?;
    if value.is_undefined() { None } else { Some(text_of(&value, context)) }
}

fn code_error(error: JsError, context: &mut Context) -> CodeError {
    let thrown = error.into_opaque(context).unwrap_or_default();
    let kind = property(&thrown, "name", context).unwrap_or_else(|| "Error".into());
    let message = property(&thrown, "message", context).unwrap_or_else(|| text_of(&thrown, context));
    let stack = property(&thrown, "stack", context).unwrap_or_default();
    let traceback = if stack.is_empty() { format!("{kind}: {message}") } else { format!("{kind}: {message}\n{stack}") };
    CodeError { kind, message, traceback, line: None }
}

fn value_text(value: &JsValue, context: &mut Context) -> String {
    if let Some(string) = value.as_string() {
        format!("{:?}", string.to_std_string_escaped())
    } else {
        text_of(value, context)
    }
}

fn value_of(result: JsValue, context: &mut Context) -> Option<Value> {
    if result.is_undefined() {
        return None;
    }
    let json = if result.is_callable() { None } else { result.to_json(context).ok().flatten().map(|j| j.to_string()) };
    let text = value_text(&result, context);
    Some(Value { text, json })
}

/// Shows the last value as a display too when it has a rich representation.
fn auto_display(value: &JsValue, context: &mut Context) {
    if !value.is_object() {
        return;
    }
    let Ok(show) = context.global_object().get(js_string!("__airlockAutoDisplay"), context) else { return };
    if let Some(show) = show.as_callable() {
        // A representation that throws is left out; the value still answers.
        let _ = show.call(&JsValue::undefined(), std::slice::from_ref(value), context);
    }
}

fn evaluate(code: &str, context: &mut Context) -> Result<Option<Value>, EvalError> {
    let script = Script::parse(Source::from_bytes(code), None, context)
        .map_err(|e| EvalError::Syntax(code_error(e, context)))?;
    let evaluated = script.evaluate(context);
    // Settle promises and async functions before answering.
    let jobs = context.run_jobs();
    let outcome = match (evaluated, jobs) {
        (Err(error), _) | (Ok(_), Err(error)) => Err(error),
        (Ok(value), Ok(())) => Ok(value),
    };
    let outcome = outcome.and_then(|value| match value.as_object().map(|o| JsPromise::from_object(o.clone())) {
        Some(Ok(promise)) => match promise.state() {
            PromiseState::Fulfilled(settled) => Ok(settled),
            PromiseState::Rejected(reason) => Err(JsError::from_opaque(reason)),
            PromiseState::Pending => Ok(value),
        },
        _ => Ok(value),
    });
    if let Some(escalation) = ESCALATION.with(|slot| slot.borrow_mut().take()) {
        return Err(EvalError::NeedsEscalation(escalation));
    }
    match outcome {
        Ok(value) => {
            auto_display(&value, context);
            Ok(value_of(value, context))
        }
        Err(error) => Err(EvalError::Runtime(code_error(error, context))),
    }
}

struct Js;

impl Guest for Js {
    fn eval(code: String) -> Result<Option<Value>, EvalError> {
        let result = CONTEXT.with(|slot| {
            let mut slot = slot.borrow_mut();
            if slot.is_none() {
                match new_context() {
                    Ok(context) => *slot = Some(context),
                    Err(e) => {
                        return Err(EvalError::Runtime(CodeError {
                            kind: "InternalError".into(),
                            message: format!("cannot create the JavaScript context: {e}"),
                            traceback: String::new(),
                            line: None,
                        }));
                    }
                }
            }
            match slot.as_mut() {
                Some(context) => evaluate(&code, context),
                None => unreachable!("context was just created"),
            }
        });
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        result
    }
}

export!(Js);
