//! Progress of a base image build, as events for a front end to render.
//!
//! The library prints nothing: [`ensure_base_image_with`](crate::ensure_base_image_with)
//! sends [`BuildEvent`]s to a [`BuildReporter`], and the caller draws them (the
//! CLI as progress bars on a terminal, or as one plain line per stage start and
//! end otherwise; see [`BuildEvent::plain_line`]). The tools' own output goes to
//! the build log, never to the reporter; the parsers here turn its lines into
//! counts for a bar.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Receives the events of a base image build, from whichever thread the build
/// is on at the time.
pub type BuildReporter = Arc<dyn Fn(&BuildEvent) + Send + Sync>;

/// One stage of a base image build, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BuildStage {
    /// debootstrap of the recipe's suite and variant into a staging tree.
    Debootstrap,
    /// apt inside the chroot: the recipe's packages, except the data stack.
    Packages,
    /// apt inside the chroot: the data stack (numpy, pandas, matplotlib, scipy,
    /// Pillow); skipped when the recipe has none of it.
    DataStack,
    /// The `sandbox` user, `/workspace`, and removing the build's leftovers.
    Finish,
    /// The root filesystem streamed into the Docker engine as an image.
    Import,
}

impl BuildStage {
    /// A short name, stable for logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Self::Debootstrap => "debootstrap",
            Self::Packages => "apt: installing packages",
            Self::DataStack => "data stack",
            Self::Finish => "sandbox user and clean-up",
            Self::Import => "import into docker",
        }
    }
}

impl fmt::Display for BuildStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a stage's progress counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProgressUnit {
    /// Package steps (fetched, unpacked, configured).
    Steps,
    /// Bytes sent.
    Bytes,
}

/// One event of a base image build. A build that finds its image sends none.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum BuildEvent {
    /// The build begins; everything the tools print goes to `log`.
    Started { image: String, log: PathBuf, stages: Vec<BuildStage> },
    /// A stage begins: `index` (from 1) of `count`, and what it does.
    StageStarted { stage: BuildStage, index: usize, count: usize, title: String },
    /// A stage moved on: `done` of `total` (`None` while the total is not
    /// known yet), and what it is doing now.
    StageProgress { stage: BuildStage, done: u64, total: Option<u64>, unit: ProgressUnit, detail: String },
    /// A stage ended well after `elapsed`.
    StageFinished { stage: BuildStage, elapsed: Duration },
    /// A stage failed after `elapsed`; the build's error follows.
    StageFailed { stage: BuildStage, elapsed: Duration },
    /// The image is built and imported; the log is kept.
    Finished { image: String, log: PathBuf, elapsed: Duration },
}

impl BuildEvent {
    /// The event as one line of plain text (no control codes), for output that
    /// is not a terminal; `None` for the per-line progress events, so that a
    /// build prints one line per stage start and end.
    pub fn plain_line(&self) -> Option<String> {
        match self {
            Self::Started { image, log, stages } => Some(format!(
                "building {image} in {} stages; this takes a few minutes, once; full log: {}",
                stages.len(),
                log.display()
            )),
            Self::StageStarted { index, count, title, .. } => Some(format!("[{index}/{count}] {title}: started")),
            Self::StageProgress { .. } => None,
            Self::StageFinished { stage, elapsed } => Some(format!("{stage}: done in {}", human_duration(*elapsed))),
            Self::StageFailed { stage, elapsed } => Some(format!("{stage}: failed after {}", human_duration(*elapsed))),
            Self::Finished { image, log, elapsed } => {
                Some(format!("built {image} in {}; full log kept in {}", human_duration(*elapsed), log.display()))
            }
        }
    }
}

/// `4.2s`, or `3m 05s` from a minute on.
pub fn human_duration(elapsed: Duration) -> String {
    let seconds = elapsed.as_secs();
    if seconds < 60 {
        format!("{:.1}s", elapsed.as_secs_f64())
    } else {
        format!("{}m {:02}s", seconds / 60, seconds % 60)
    }
}

/// Where a stage stands after one line of its tool's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    pub(crate) done: u64,
    pub(crate) total: Option<u64>,
    pub(crate) detail: String,
}

/// Turns a tool's output lines into progress.
pub(crate) trait LineParser: Send {
    /// The progress after `line`, or `None` when the line says nothing new.
    fn line(&mut self, line: &str) -> Option<Step>;
}

/// debootstrap's `I:` lines. Each package counts three steps: fetched
/// (`Retrieving` or `Validating`), `Unpacking` and `Configuring`. The total
/// is known once downloading ends (the first line of a later phase): three
/// times the packages fetched. Until then it is `None`.
#[derive(Debug, Default)]
pub(crate) struct DebootstrapParser {
    fetched: HashSet<String>,
    unpacked: HashSet<String>,
    configured: HashSet<String>,
    total: Option<u64>,
}

impl DebootstrapParser {
    fn step(&self, detail: String) -> Step {
        let count = |set: &HashSet<String>| u64::try_from(set.len()).unwrap_or(u64::MAX);
        let done = count(&self.fetched).saturating_add(count(&self.unpacked)).saturating_add(count(&self.configured));
        Step { done: self.total.map_or(done, |total| done.min(total)), total: self.total, detail }
    }

    fn downloads_ended(&mut self) {
        if self.total.is_none() {
            let fetched = u64::try_from(self.fetched.len()).unwrap_or(u64::MAX);
            self.total = Some(fetched.saturating_mul(3));
        }
    }
}

/// `libc6:amd64...` → `libc6`; `None` for a phase ("required packages...").
fn package_word(text: &str) -> Option<&str> {
    let word = text.trim().trim_end_matches("...");
    if word.is_empty() || word.contains(char::is_whitespace) {
        return None;
    }
    Some(word.split(':').next().unwrap_or(word))
}

impl LineParser for DebootstrapParser {
    fn line(&mut self, line: &str) -> Option<Step> {
        let message = line.trim().strip_prefix("I: ")?;
        let (verb, rest) = message.split_once(' ').unwrap_or((message, ""));
        match verb {
            "Retrieving" | "Validating" => {
                // A package line names a package and its version; index files
                // (`Retrieving InRelease`, `Retrieving Packages`) have no version.
                let mut words = rest.split_whitespace();
                if let (Some(name), Some(_version)) = (words.next(), words.next()) {
                    self.fetched.insert(name.to_string());
                }
            }
            "Extracting" | "Installing" => self.downloads_ended(),
            "Unpacking" | "Configuring" => {
                self.downloads_ended();
                if let Some(name) = package_word(rest) {
                    let set = if verb == "Unpacking" { &mut self.unpacked } else { &mut self.configured };
                    set.insert(name.to_string());
                }
            }
            _ => {}
        }
        Some(self.step(message.trim_end_matches("...").trim().to_string()))
    }
}

/// apt-get's lines (with `-q`, not on a terminal). Each package counts three
/// steps: `Get:`, `Unpacking` and `Setting up`; the total comes from the
/// "N upgraded, M newly installed" summary.
#[derive(Debug, Default)]
pub(crate) struct AptParser {
    fetched: u64,
    unpacked: u64,
    set_up: u64,
    total: Option<u64>,
}

impl AptParser {
    fn step(&self, detail: String) -> Step {
        let done = self.fetched.saturating_add(self.unpacked).saturating_add(self.set_up);
        Step { done: self.total.map_or(done, |total| done.min(total)), total: self.total, detail }
    }
}

/// The number before `what` in apt's summary line, such as `12 newly installed`.
fn summary_count(line: &str, what: &str) -> Option<u64> {
    line.split(", ").find_map(|part| part.trim().strip_suffix(what)?.trim().parse().ok())
}

impl LineParser for AptParser {
    fn line(&mut self, line: &str) -> Option<Step> {
        let line = line.trim();
        if let Some(installed) = summary_count(line, "newly installed") {
            // Every package apt fetches, unpacks and sets up.
            let packages = ["upgraded", "downgraded", "reinstalled"]
                .iter()
                .filter_map(|what| summary_count(line, what))
                .fold(installed, u64::saturating_add);
            self.total = Some(packages.saturating_mul(3));
            return Some(self.step("resolved".into()));
        }
        if line.starts_with("Get:") {
            self.fetched = self.fetched.saturating_add(1);
            // Get:7 http://mirror suite/main amd64 NAME ARCH VERSION [SIZE]
            let name = line.split_whitespace().nth(4).unwrap_or("");
            return Some(self.step(format!("fetching {name}")));
        }
        let package = |rest: &str| rest.split_whitespace().next().and_then(package_word).unwrap_or("").to_string();
        if let Some(rest) = line.strip_prefix("Unpacking ") {
            self.unpacked = self.unpacked.saturating_add(1);
            return Some(self.step(format!("unpacking {}", package(rest))));
        }
        if let Some(rest) = line.strip_prefix("Setting up ") {
            self.set_up = self.set_up.saturating_add(1);
            return Some(self.step(format!("setting up {}", package(rest))));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(parser: &mut dyn LineParser, lines: &str) -> Vec<Option<Step>> {
        lines.lines().map(|line| parser.line(line)).collect()
    }

    #[test]
    fn debootstrap_lines_count_packages_and_learn_the_total_when_downloads_end() {
        let mut parser = DebootstrapParser::default();
        let steps = feed(
            &mut parser,
            "I: Retrieving InRelease \n\
             I: Checking Release signature\n\
             I: Retrieving Packages \n\
             I: Validating Packages \n\
             I: Retrieving adduser 3.134\n\
             I: Validating adduser 3.134\n\
             I: Retrieving libc6 2.36-9+deb12u4\n\
             I: Validating libc6 2.36-9+deb12u4\n\
             W: a warning is not progress\n\
             I: Extracting adduser...\n\
             I: Unpacking required packages...\n\
             I: Unpacking libc6:amd64...\n\
             I: Configuring required packages...\n\
             I: Configuring libc6:amd64...\n\
             I: Unpacking adduser...\n\
             I: Configuring adduser...\n\
             I: Configuring adduser...\n\
             I: Base system installed successfully.",
        );
        let at = |index: usize| steps[index].clone().unwrap();
        // Index files are not packages.
        assert_eq!(at(0), Step { done: 0, total: None, detail: "Retrieving InRelease".into() });
        assert_eq!(at(3).done, 0);
        // A package fetched counts once, retrieved and validated.
        assert_eq!((at(4).done, at(5).done, at(6).done, at(7).done), (1, 1, 2, 2));
        assert_eq!(at(7).total, None, "the total is not known while downloading");
        assert_eq!(steps[8], None, "only I: lines are progress");
        // Downloads are over: two packages, three steps each.
        assert_eq!(at(9), Step { done: 2, total: Some(6), detail: "Extracting adduser".into() });
        assert_eq!(at(10).done, 2, "a phase line is no package");
        assert_eq!(at(11), Step { done: 3, total: Some(6), detail: "Unpacking libc6:amd64".into() });
        assert_eq!(at(13).done, 4);
        assert_eq!((at(14).done, at(15).done), (5, 6));
        assert_eq!(at(16).done, 6, "a package configured twice counts once");
        assert_eq!(at(17), Step { done: 6, total: Some(6), detail: "Base system installed successfully.".into() });
    }

    #[test]
    fn apt_lines_count_fetch_unpack_and_set_up_against_the_summary() {
        let mut parser = AptParser::default();
        let steps = feed(
            &mut parser,
            "Reading package lists...\n\
             The following NEW packages will be installed:\n\
             \x20 python3-numpy libblas3\n\
             0 upgraded, 2 newly installed, 0 to remove and 0 not upgraded.\n\
             Need to get 4,120 kB of archives.\n\
             Get:1 http://deb.debian.org/debian bookworm/main amd64 libblas3 amd64 3.11.0-2 [149 kB]\n\
             Get:2 http://deb.debian.org/debian bookworm/main amd64 python3-numpy amd64 1:1.24.2-1 [4,971 kB]\n\
             Fetched 5,120 kB in 1s (5,120 kB/s)\n\
             Selecting previously unselected package libblas3:amd64.\n\
             Unpacking libblas3:amd64 (3.11.0-2) ...\n\
             Unpacking python3-numpy (1:1.24.2-1) ...\n\
             Setting up libblas3:amd64 (3.11.0-2) ...\n\
             Setting up python3-numpy (1:1.24.2-1) ...\n\
             Processing triggers for libc-bin (2.36-9+deb12u4) ...",
        );
        assert!(steps[..3].iter().all(Option::is_none), "{steps:?}");
        assert_eq!(steps[3].clone().unwrap(), Step { done: 0, total: Some(6), detail: "resolved".into() });
        assert_eq!(steps[4], None);
        assert_eq!(steps[5].clone().unwrap(), Step { done: 1, total: Some(6), detail: "fetching libblas3".into() });
        assert_eq!(steps[6].clone().unwrap().done, 2);
        assert_eq!((steps[7].clone(), steps[8].clone()), (None, None));
        assert_eq!(steps[9].clone().unwrap(), Step { done: 3, total: Some(6), detail: "unpacking libblas3".into() });
        assert_eq!(steps[10].clone().unwrap().done, 4);
        assert_eq!(steps[11].clone().unwrap(), Step { done: 5, total: Some(6), detail: "setting up libblas3".into() });
        assert_eq!(
            steps[12].clone().unwrap(),
            Step { done: 6, total: Some(6), detail: "setting up python3-numpy".into() }
        );
        assert_eq!(steps[13], None);
    }

    #[test]
    fn apt_counts_upgrades_and_never_passes_its_total() {
        let mut parser = AptParser::default();
        let summary = parser.line("1 upgraded, 0 newly installed, 0 to remove and 3 not upgraded.").unwrap();
        assert_eq!(summary.total, Some(3), "the packages not upgraded are not counted");
        let mixed = AptParser::default()
            .line("1 upgraded, 2 newly installed, 1 downgraded, 1 reinstalled, 0 to remove and 0 not upgraded.")
            .unwrap();
        assert_eq!(mixed.total, Some(15));
        for _ in 0..5 {
            parser.line("Setting up tzdata (2024a-0+deb12u1) ...");
        }
        assert_eq!(parser.line("Unpacking tzdata (2024a) over (2023c) ...").unwrap().done, 3);
    }

    #[test]
    fn plain_lines_are_one_per_stage_start_and_end_without_control_codes() {
        let log = PathBuf::from("/var/log/airlock/base-image-abc.log");
        let events = [
            BuildEvent::Started {
                image: "airlock/base:abc".into(),
                log: log.clone(),
                stages: vec![BuildStage::Debootstrap],
            },
            BuildEvent::StageStarted {
                stage: BuildStage::Debootstrap,
                index: 1,
                count: 1,
                title: "debootstrap (minbase)".into(),
            },
            BuildEvent::StageProgress {
                stage: BuildStage::Debootstrap,
                done: 1,
                total: None,
                unit: ProgressUnit::Steps,
                detail: "Retrieving libc6".into(),
            },
            BuildEvent::StageFinished { stage: BuildStage::Debootstrap, elapsed: Duration::from_secs(125) },
            BuildEvent::Finished { image: "airlock/base:abc".into(), log, elapsed: Duration::from_millis(4200) },
        ];
        let lines: Vec<String> = events.iter().filter_map(BuildEvent::plain_line).collect();
        assert_eq!(lines.len(), 4, "progress events print nothing: {lines:?}");
        assert!(lines[0].contains("/var/log/airlock/base-image-abc.log"), "{}", lines[0]);
        assert_eq!(lines[1], "[1/1] debootstrap (minbase): started");
        assert_eq!(lines[2], "debootstrap: done in 2m 05s");
        assert!(lines[3].contains("in 4.2s") && lines[3].contains("base-image-abc.log"), "{}", lines[3]);
        for line in &lines {
            assert!(!line.contains('\n') && !line.chars().any(char::is_control), "{line:?}");
        }
    }
}
