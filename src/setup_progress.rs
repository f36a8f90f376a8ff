//! How `airlock setup` shows a base image build: on a terminal, one line per
//! stage with a spinner or a bar and its elapsed time (indicatif); otherwise
//! (CI, a pipe, a file) one plain line per stage start and end, with no
//! control codes. Either way on stderr, where the bars are drawn: stdout
//! carries only the image's name. The tools' own output is in the build log.

use std::borrow::Cow;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use airlock::container::{BuildEvent, BuildReporter, BuildStage, ProgressUnit, human_duration};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a running stage's spinner and elapsed time are redrawn.
const TICK: Duration = Duration::from_millis(120);
/// How many times a second indicatif may redraw: bounds the terminal output
/// a build with thousands of progress lines makes.
const REDRAWS_PER_SECOND: u8 = 10;

/// The reporter for this process's stderr: bars on a terminal (unless
/// `TERM=dumb`), plain lines otherwise.
pub(crate) fn build_reporter() -> BuildReporter {
    let dumb = std::env::var_os("TERM").is_some_and(|term| term == "dumb");
    if std::io::stderr().is_terminal() && !dumb {
        let view = Mutex::new(TerminalView::new());
        Arc::new(move |event: &BuildEvent| {
            if let Ok(mut view) = view.lock() {
                view.show(event);
            }
        })
    } else {
        Arc::new(|event: &BuildEvent| {
            if let Some(line) = event.plain_line() {
                eprintln!("airlock: {line}");
            }
        })
    }
}

/// Prints a failed stage: what failed, the log's path, and its last lines
/// (each on its own line, indented, as the tools wrote them).
pub(crate) fn print_stage_failure(image: &str, stage: BuildStage, reason: &str, log: &Path, tail: &str) {
    eprintln!("airlock: error: building image {image} failed in stage \"{stage}\": {reason}");
    eprintln!("airlock: full log: {}; its last lines:", log.display());
    for line in tail.lines() {
        eprintln!("    {line}");
    }
}

/// Which style the current stage's bar has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Look {
    /// Nothing counted yet: a spinner, the elapsed time and the last detail.
    Waiting,
    /// Counting with no total yet (debootstrap while downloading).
    Counting,
    /// Bytes sent, with no total (the import).
    Bytes,
    /// A bar over a known total.
    Bar,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_spinner())
}

fn look(look: Look) -> ProgressStyle {
    let template = match look {
        Look::Waiting => "{spinner:.cyan} {prefix:.bold} [{elapsed}] {wide_msg}",
        Look::Counting => "{spinner:.cyan} {prefix:.bold} [{elapsed}] {pos} · {wide_msg}",
        Look::Bytes => "{spinner:.cyan} {prefix:.bold} [{elapsed}] {binary_bytes} · {wide_msg}",
        Look::Bar => "{spinner:.cyan} {prefix:.bold} [{elapsed}] [{bar:20.cyan/blue}] {pos}/{len} {wide_msg}",
    };
    style(template).progress_chars("=> ")
}

#[derive(Debug)]
struct TerminalView {
    multi: MultiProgress,
    /// The running stage's bar and its style.
    current: Option<(ProgressBar, Look)>,
}

impl TerminalView {
    fn new() -> Self {
        Self::with_target(ProgressDrawTarget::stderr_with_hz(REDRAWS_PER_SECOND))
    }

    fn with_target(target: ProgressDrawTarget) -> Self {
        Self { multi: MultiProgress::with_draw_target(target), current: None }
    }

    fn show(&mut self, event: &BuildEvent) {
        match event {
            BuildEvent::StageStarted { index, count, title, .. } => {
                let bar = self.multi.add(ProgressBar::new_spinner());
                bar.set_style(look(Look::Waiting));
                bar.set_prefix(format!("[{index}/{count}] {title}"));
                bar.enable_steady_tick(TICK);
                self.current = Some((bar, Look::Waiting));
            }
            BuildEvent::StageProgress { done, total, unit, detail, .. } => {
                let Some((bar, shown)) = &mut self.current else { return };
                let wanted = match (total, unit) {
                    (Some(_), _) => Look::Bar,
                    (None, ProgressUnit::Bytes) => Look::Bytes,
                    (None, _) => Look::Counting,
                };
                if wanted != *shown {
                    bar.set_style(look(wanted));
                    *shown = wanted;
                }
                match total {
                    Some(total) if bar.length() != Some(*total) => bar.set_length(*total),
                    _ => {}
                }
                bar.set_position(*done);
                bar.set_message(Cow::Owned(detail.clone()));
            }
            BuildEvent::StageFinished { elapsed, .. } => {
                if let Some((bar, _)) = self.current.take() {
                    bar.set_style(style("✓ {prefix:.bold} {msg:.green}"));
                    bar.finish_with_message(format!("done in {}", human_duration(*elapsed)));
                }
            }
            BuildEvent::StageFailed { elapsed, .. } => {
                if let Some((bar, _)) = self.current.take() {
                    bar.set_style(style("✗ {prefix:.bold} {msg:.red}"));
                    bar.abandon_with_message(format!("failed after {}", human_duration(*elapsed)));
                }
            }
            other => {
                if let Some(line) = other.plain_line() {
                    let _ = self.multi.println(format!("airlock: {line}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(done: u64, total: Option<u64>, unit: ProgressUnit) -> BuildEvent {
        BuildEvent::StageProgress {
            stage: BuildStage::Debootstrap,
            done,
            total,
            unit,
            detail: "Unpacking libc6".into(),
        }
    }

    #[test]
    fn a_stage_is_a_spinner_until_its_total_is_known_then_a_bar_that_is_left_finished() {
        let mut view = TerminalView::with_target(ProgressDrawTarget::hidden());
        let title = "debootstrap (minbase, bookworm)".to_string();
        view.show(&BuildEvent::StageStarted { stage: BuildStage::Debootstrap, index: 1, count: 5, title });
        let bar = view.current.as_ref().map(|(bar, look)| (bar.clone(), *look)).unwrap();
        assert_eq!(bar.1, Look::Waiting);
        assert_eq!(bar.0.prefix(), "[1/5] debootstrap (minbase, bookworm)");

        view.show(&progress(3, None, ProgressUnit::Steps));
        assert_eq!(view.current.as_ref().unwrap().1, Look::Counting);
        assert_eq!((bar.0.position(), bar.0.length()), (3, None));

        view.show(&progress(5, Some(12), ProgressUnit::Steps));
        assert_eq!(view.current.as_ref().unwrap().1, Look::Bar);
        assert_eq!((bar.0.position(), bar.0.length()), (5, Some(12)));
        assert_eq!(bar.0.message(), "Unpacking libc6");

        view.show(&BuildEvent::StageFinished { stage: BuildStage::Debootstrap, elapsed: Duration::from_secs(90) });
        assert!(view.current.is_none());
        assert!(bar.0.is_finished());
        assert_eq!(bar.0.message(), "done in 1m 30s");
    }

    #[test]
    fn the_import_counts_bytes_and_a_failed_stage_says_so() {
        let mut view = TerminalView::with_target(ProgressDrawTarget::hidden());
        let title = "import into docker".to_string();
        view.show(&BuildEvent::StageStarted { stage: BuildStage::Import, index: 5, count: 5, title });
        let bar = view.current.as_ref().map(|(bar, _)| bar.clone()).unwrap();
        view.show(&progress(1 << 20, None, ProgressUnit::Bytes));
        assert_eq!(view.current.as_ref().unwrap().1, Look::Bytes);
        view.show(&BuildEvent::StageFailed { stage: BuildStage::Import, elapsed: Duration::from_millis(2500) });
        assert!(view.current.is_none());
        assert_eq!(bar.message(), "failed after 2.5s");
    }
}
