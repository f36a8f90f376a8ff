//! `airlock context`: make, list, fork and remove a sandbox's interpreter
//! contexts. A context is kept in the home (its history replayed when it is
//! next used after a sleep or a restart), so `airlock code NAME --context ID`
//! finds it from any later command; with a server owning the home, through
//! its API.

use std::process::ExitCode;

use airlock::Language;
use airlock::runtime::ContextOptions;
use anyhow::Result;
use hyper::Method;
use serde_json::{Value, json};

use crate::remote::{ApiClient, encode_path};
use crate::sandbox_cli::{Home, HomeArgs};

#[derive(Debug, clap::Subcommand)]
pub enum ContextCommand {
    /// Make a context in a sandbox (created when missing) and print its id.
    New {
        name: String,
        #[arg(long, value_name = "LANG")]
        lang: Language,
        /// When the context moves to the container, start it fresh there
        /// instead of replaying its earlier evaluations.
        #[arg(long)]
        no_replay: bool,
        #[command(flatten)]
        home: HomeArgs,
    },
    /// List a sandbox's contexts: id, language, tier, evaluations, resets.
    Ls {
        name: String,
        #[command(flatten)]
        home: HomeArgs,
    },
    /// Fork a context: a new context in the same sandbox with the source's variables,
    /// functions and imports (made by replaying its history); prints the new id.
    Fork {
        name: String,
        id: String,
        #[command(flatten)]
        home: HomeArgs,
    },
    /// Remove a context, and what the home keeps of it.
    Rm {
        name: String,
        id: String,
        #[command(flatten)]
        home: HomeArgs,
    },
}

fn home_of(command: &ContextCommand) -> &HomeArgs {
    match command {
        ContextCommand::New { home, .. }
        | ContextCommand::Ls { home, .. }
        | ContextCommand::Fork { home, .. }
        | ContextCommand::Rm { home, .. } => home,
    }
}

pub async fn context(command: ContextCommand) -> Result<ExitCode> {
    let runtime = match home_of(&command).reach("context").await? {
        Home::Local(runtime) => runtime,
        Home::Served(api) => return context_remote(&api, &command).await,
    };
    match &command {
        ContextCommand::New { name, lang, no_replay, .. } => {
            let sandbox = runtime.sandbox(name).await?;
            let options = ContextOptions { replay_on_escalation: !no_replay };
            println!("{}", sandbox.create_context_with(*lang, options).await?);
        }
        ContextCommand::Ls { name, .. } => {
            let sandbox = runtime.get(name)?.ok_or_else(|| anyhow::anyhow!("no sandbox named {name}"))?;
            let listed = serde_json::to_value(sandbox.contexts())?;
            print_list(&listed);
        }
        ContextCommand::Fork { name, id, .. } => {
            let sandbox = runtime.get(name)?.ok_or_else(|| anyhow::anyhow!("no sandbox named {name}"))?;
            let fork = sandbox.fork_context(id).await?;
            print_fork(&serde_json::to_value(&fork)?);
        }
        ContextCommand::Rm { name, id, .. } => {
            let sandbox = runtime.get(name)?.ok_or_else(|| anyhow::anyhow!("no sandbox named {name}"))?;
            sandbox.delete_context(id)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn context_remote(api: &ApiClient, command: &ContextCommand) -> Result<ExitCode> {
    match command {
        ContextCommand::New { name, lang, no_replay, .. } => {
            crate::sandbox_cli::create_remote(api, name, None).await?;
            let body = json!({ "language": lang, "replay_on_escalation": !no_replay });
            let created = api.json(Method::POST, &format!("/sandboxes/{}/contexts", encode_path(name)), Some(&body)).await?;
            println!("{}", created["id"].as_str().unwrap_or_default());
        }
        ContextCommand::Ls { name, .. } => {
            let listed = api.json(Method::GET, &format!("/sandboxes/{}/contexts", encode_path(name)), None).await?;
            print_list(&listed);
        }
        ContextCommand::Fork { name, id, .. } => {
            let path = format!("/sandboxes/{}/contexts/{}/fork", encode_path(name), encode_path(id));
            print_fork(&api.json(Method::POST, &path, None).await?);
        }
        ContextCommand::Rm { name, id, .. } => {
            let path = format!("/sandboxes/{}/contexts/{}", encode_path(name), encode_path(id));
            api.json(Method::DELETE, &path, None).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One line per context: id, language, tier, evaluations, resets.
fn print_list(listed: &Value) {
    for context in listed.as_array().into_iter().flatten() {
        println!(
            "{}\t{}\t{}\t{} evaluations\t{} resets",
            context["id"].as_str().unwrap_or("?"),
            context["language"].as_str().unwrap_or("?"),
            context["tier"].as_str().unwrap_or("?"),
            context["evaluations"],
            context["resets"],
        );
    }
}

/// The new id on stdout; what the replay did on stderr.
fn print_fork(fork: &Value) {
    println!("{}", fork["id"].as_str().unwrap_or_default());
    eprintln!("airlock: forked {} by replaying its history: {}", fork["source"].as_str().unwrap_or("?"), fork);
}
