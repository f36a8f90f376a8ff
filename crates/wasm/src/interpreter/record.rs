//! What an interpreter reports while it evaluates, through the world's `host`
//! import: rich outputs (`display`) and file changes (`file-changed`); and
//! the outbound requests the store's `wasi:http` hook sent. Kept per
//! evaluation, bounded here whatever the guest sends, and moved into the
//! evaluation's [`EvalOutcome`] when it ends, however it ends (a limit hit
//! keeps what was recorded before it).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use airlock_core::{
    DisplayOutput, EvalOutcome, MAX_DISPLAY_BYTES_PER_EVALUATION, MAX_DISPLAYS_PER_EVALUATION,
    MAX_SIDE_EFFECTS_PER_EVALUATION, SideEffect,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::bindings::airlock::sandbox::host::{DisplayData, Host};
use crate::host::ComponentHost;

/// Longest MIME type kept in a bundle (RFC 6838 allows 127 characters for
/// each of type and subtype): a longer key is not a MIME type, and is dropped.
pub(crate) const MAX_MIME_TYPE_BYTES: usize = 255;

/// Most representations one bundle keeps (Jupyter's richest have about 8);
/// the rest are dropped, so a bundle cannot carry thousands of tiny keys.
pub(crate) const MAX_REPRESENTATIONS_PER_DISPLAY: usize = 16;

/// Longest path or URL a side effect keeps, in bytes; longer ones are clipped.
/// Bounds what one recorded effect costs the caller to hold and show.
pub(crate) const MAX_SIDE_EFFECT_TEXT_BYTES: usize = 4096;

/// Longest operation name a guest may report (`write`, `rename-to`, ...);
/// longer ones are clipped.
pub(crate) const MAX_OPERATION_BYTES: usize = 32;

/// Side effects of the evaluation under way, shared by the store's `host`
/// import and its outbound HTTP hook, so they are kept in the order they
/// happened.
#[derive(Debug, Clone, Default)]
pub(crate) struct SideEffectLog(Arc<Mutex<Effects>>);

#[derive(Debug, Default)]
struct Effects {
    list: Vec<SideEffect>,
    truncated: bool,
}

impl SideEffectLog {
    fn lock(&self) -> MutexGuard<'_, Effects> {
        // A poisoned lock only means a recorder panicked mid-push; the list is still valid.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records `effect` once; past [`MAX_SIDE_EFFECTS_PER_EVALUATION`]
    /// distinct effects, only that some were dropped.
    pub(crate) fn push(&self, effect: SideEffect) {
        let mut effects = self.lock();
        if effects.list.contains(&effect) {
            return;
        }
        if effects.list.len() >= MAX_SIDE_EFFECTS_PER_EVALUATION {
            effects.truncated = true;
        } else {
            effects.list.push(effect);
        }
    }

    /// An outbound request handed to the hook (it may have been sent).
    pub(crate) fn request(&self, method: &str, url: &str) {
        self.push(SideEffect::Request {
            method: clip(method, MAX_OPERATION_BYTES),
            url: clip(url, MAX_SIDE_EFFECT_TEXT_BYTES),
        });
    }

    fn take(&self) -> (Vec<SideEffect>, bool) {
        let mut effects = self.lock();
        (std::mem::take(&mut effects.list), std::mem::take(&mut effects.truncated))
    }
}

/// What one store's guest reported during the evaluation under way.
#[derive(Debug, Default)]
pub(crate) struct EvalRecord {
    displays: Vec<DisplayOutput>,
    display_bytes: usize,
    displays_truncated: bool,
    pub(crate) effects: SideEffectLog,
}

impl EvalRecord {
    /// Forgets what was recorded: an evaluation starts with nothing.
    pub(crate) fn clear(&mut self) {
        self.displays.clear();
        self.display_bytes = 0;
        self.displays_truncated = false;
        let _ = self.effects.take();
    }

    /// Moves what was recorded into `outcome`, leaving the record empty.
    pub(crate) fn drain_into(&mut self, outcome: &mut EvalOutcome) {
        for display in std::mem::take(&mut self.displays) {
            outcome.push_display(display);
        }
        outcome.displays_truncated |= std::mem::take(&mut self.displays_truncated);
        self.display_bytes = 0;
        let (effects, truncated) = self.effects.take();
        for effect in effects {
            outcome.push_side_effect(effect);
        }
        outcome.side_effects_truncated |= truncated;
    }

    /// Keeps `bundle` as a display, bounded: see [`bundle_of`]. A bundle
    /// past the per-evaluation caps is dropped and the record says so.
    fn display(&mut self, bundle: Vec<(String, DisplayData)>) {
        let (display, clipped) = bundle_of(bundle);
        self.displays_truncated |= clipped;
        if display.data.is_empty() {
            return;
        }
        let size = display.size();
        if self.displays.len() >= MAX_DISPLAYS_PER_EVALUATION
            || self.display_bytes.saturating_add(size) > MAX_DISPLAY_BYTES_PER_EVALUATION
        {
            self.displays_truncated = true;
            return;
        }
        self.display_bytes += size;
        self.displays.push(display);
    }
}

/// A display made of what the guest sent, and whether anything of it was
/// dropped: entries whose key is not a MIME type, past
/// [`MAX_REPRESENTATIONS_PER_DISPLAY`], repeated keys (the first is kept),
/// and text for a binary type that is not base64. Bytes are base64-encoded
/// for binary types and read as UTF-8 (invalid sequences replaced) for text
/// types.
pub(crate) fn bundle_of(bundle: Vec<(String, DisplayData)>) -> (DisplayOutput, bool) {
    let mut data = BTreeMap::new();
    let mut clipped = false;
    for (mime, value) in bundle {
        if data.len() >= MAX_REPRESENTATIONS_PER_DISPLAY || !is_mime_type(&mime) || data.contains_key(&mime) {
            clipped = true;
            continue;
        }
        let binary = DisplayOutput::is_binary(&mime);
        let value = match value {
            DisplayData::Bytes(bytes) if binary => BASE64.encode(bytes),
            DisplayData::Bytes(bytes) => match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(invalid) => String::from_utf8_lossy(invalid.as_bytes()).into_owned(),
            },
            DisplayData::Text(text) if binary => {
                // Kept as the guest gave it (Jupyter wraps base64 in lines),
                // if it decodes.
                let packed: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
                if BASE64.decode(&packed).is_err() {
                    clipped = true;
                    continue;
                }
                text
            }
            DisplayData::Text(text) => text,
        };
        data.insert(mime, value);
    }
    (DisplayOutput { data }, clipped)
}

/// `type/subtype`, each a non-empty RFC 6838 token, at most [`MAX_MIME_TYPE_BYTES`] long.
fn is_mime_type(mime: &str) -> bool {
    let token =
        |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$&^_.+-".contains(&b));
    mime.len() <= MAX_MIME_TYPE_BYTES && mime.split_once('/').is_some_and(|(kind, sub)| token(kind) && token(sub))
}

/// `text` cut to at most `max` bytes, at a character boundary.
fn clip(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

impl Host for ComponentHost {
    fn display(&mut self, bundle: Vec<(String, DisplayData)>) {
        self.record.display(bundle);
    }

    fn file_changed(&mut self, operation: String, path: String) {
        self.record.effects.push(SideEffect::File {
            operation: clip(&operation, MAX_OPERATION_BYTES),
            path: clip(&path, MAX_SIDE_EFFECT_TEXT_BYTES),
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    fn text(mime: &str, value: &str) -> (String, DisplayData) {
        (mime.to_string(), DisplayData::Text(value.to_string()))
    }

    #[test]
    fn bytes_of_binary_types_are_base64_and_of_text_types_utf8() {
        let (display, clipped) = bundle_of(vec![
            ("image/png".into(), DisplayData::Bytes(b"\x89PNG".to_vec())),
            ("text/html".into(), DisplayData::Bytes(b"<b>\xff</b>".to_vec())),
        ]);
        assert!(!clipped);
        assert_eq!(display.get("image/png"), Some("iVBORw=="));
        assert_eq!(display.get("text/html"), Some("<b>\u{fffd}</b>"));
    }

    #[test]
    fn absurd_entries_are_dropped_and_flagged() {
        let mut bundle = vec![
            text("text/plain", "kept"),
            text("text/plain", "a repeated key"),
            text("not a mime type", "x"),
            text(&format!("text/{}", "x".repeat(MAX_MIME_TYPE_BYTES)), "x"),
            text("image/png", "not base64!"),
        ];
        for n in 0..2 * MAX_REPRESENTATIONS_PER_DISPLAY {
            bundle.push(text(&format!("application/x-{n}"), "x"));
        }
        let (display, clipped) = bundle_of(bundle);
        assert!(clipped);
        assert_eq!(display.data.len(), MAX_REPRESENTATIONS_PER_DISPLAY);
        assert_eq!(display.get("text/plain"), Some("kept"));
        assert_eq!(display.get("image/png"), None);
        // Base64 wrapped in lines, as Jupyter keeps it, is base64.
        let (display, clipped) = bundle_of(vec![text("image/png", "iVBO\nRw==\n")]);
        assert!(!clipped && display.get("image/png").is_some());
    }

    #[test]
    fn the_record_applies_the_per_evaluation_caps_and_drains_into_an_outcome() {
        let mut record = EvalRecord::default();
        for _ in 0..=MAX_DISPLAYS_PER_EVALUATION {
            record.display(vec![text("text/plain", "x")]);
        }
        record.display(Vec::new());
        record.effects.push(SideEffect::File { operation: "write".into(), path: "a".into() });
        record.effects.request("POST", &format!("http://h/{}", "p".repeat(2 * MAX_SIDE_EFFECT_TEXT_BYTES)));
        let mut outcome = airlock_core::EvalOutcome {
            result: airlock_core::EvalResult::Ok { value: None },
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            wall_time: std::time::Duration::ZERO,
            cpu_time: std::time::Duration::ZERO,
            displays: Vec::new(),
            displays_truncated: false,
            side_effects: Vec::new(),
            side_effects_truncated: false,
        };
        record.drain_into(&mut outcome);
        assert_eq!(outcome.displays.len(), MAX_DISPLAYS_PER_EVALUATION);
        assert!(outcome.displays_truncated);
        assert_eq!(outcome.side_effects.len(), 2);
        match &outcome.side_effects[1] {
            SideEffect::Request { method, url } => {
                assert_eq!(method, "POST");
                assert_eq!(url.len(), MAX_SIDE_EFFECT_TEXT_BYTES);
            }
            other => panic!("{other:?}"),
        }
        // Drained: the next evaluation starts empty.
        let mut next = outcome.clone();
        next.displays.clear();
        next.side_effects.clear();
        next.displays_truncated = false;
        record.drain_into(&mut next);
        assert!(next.displays.is_empty() && next.side_effects.is_empty() && !next.displays_truncated);
    }

    #[test]
    fn clipping_keeps_whole_characters() {
        assert_eq!(clip("aé", 2), "a");
        assert_eq!(clip("abc", 10), "abc");
    }
}
