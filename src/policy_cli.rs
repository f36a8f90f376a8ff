//! `airlock policy NAME ...` (a sandbox's network policy) and `airlock secret
//! ...` (the runtime's secrets), in process or through the server that owns
//! the home.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use airlock::runtime::{HeaderRule, HostPattern, HostRule, MAX_SECRET_BYTES, NetworkPolicy};
use anyhow::{Context, Result, bail};
use hyper::Method;
use serde_json::{Value, json};

use crate::remote::{ApiClient, encode_path};
use crate::sandbox_cli::{Home, HomeArgs};

#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    /// The sandbox (it must exist).
    name: String,
    #[command(subcommand)]
    action: PolicyAction,
    #[command(flatten)]
    home: HomeArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum PolicyAction {
    /// Print the policy as JSON (`{}` is deny-all).
    Show,
    /// Replace the policy with the JSON in FILE (`-` for stdin).
    Set {
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
    },
    /// Allow HOST (an exact name, `*.suffix`, an IP address, or `*`): adds a
    /// rule, or replaces the rule for the same host.
    Allow(AllowArgs),
    /// Deny HOST (and names below it when given as `*.suffix`) whatever the rules allow.
    Deny { host: String },
    /// Back to deny-all.
    Clear,
}

#[derive(Debug, clap::Args)]
pub struct AllowArgs {
    host: String,
    /// A port to allow (repeatable); none means 80 and 443.
    #[arg(long = "port", value_name = "PORT")]
    ports: Vec<u16>,
    /// A method to allow (repeatable); none means any.
    #[arg(long = "method", value_name = "METHOD")]
    methods: Vec<String>,
    /// A header to set from a secret, as NAME=SECRET or NAME=SECRET:PREFIX
    /// (`Authorization=github-token:Bearer `); repeatable.
    #[arg(long = "header", value_name = "NAME=SECRET[:PREFIX]")]
    headers: Vec<String>,
    /// Connect to ADDR:PORT instead of resolving HOST (needed to reach loopback or a private address).
    #[arg(long, value_name = "ADDR:PORT")]
    connect_to: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum SecretCommand {
    /// Store a secret, its value read from stdin (one trailing newline is
    /// dropped). Never from the command line: arguments are visible to every
    /// user of the host (ps, /proc) and stay in shell history.
    Set(SecretName),
    /// List the secrets: names and times, never values.
    List(SecretHome),
    /// Remove a secret (refused while a sandbox's policy names it).
    Rm(SecretName),
}

#[derive(Debug, clap::Args)]
pub struct SecretName {
    name: String,
    #[command(flatten)]
    home: HomeArgs,
}

#[derive(Debug, clap::Args)]
pub struct SecretHome {
    #[command(flatten)]
    home: HomeArgs,
}

fn network_path(name: &str) -> String {
    format!("/sandboxes/{}/network", encode_path(name))
}

async fn read_policy(home: &Home, name: &str) -> Result<NetworkPolicy> {
    match home {
        Home::Local(runtime) => Ok(runtime.network_policy(name)?),
        Home::Served(api) => {
            let value = api.json(Method::GET, &network_path(name), None).await?;
            serde_json::from_value(value).context("the server's policy is not a policy")
        }
    }
}

async fn write_policy(home: &Home, name: &str, policy: NetworkPolicy) -> Result<NetworkPolicy> {
    match home {
        Home::Local(runtime) => {
            runtime.set_network_policy(name, policy)?;
            Ok(runtime.network_policy(name)?)
        }
        Home::Served(api) => {
            let value = api.json(Method::PUT, &network_path(name), Some(&serde_json::to_value(&policy)?)).await?;
            serde_json::from_value(value).context("the server's policy is not a policy")
        }
    }
}

fn print_policy(policy: &NetworkPolicy) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(policy)?);
    Ok(())
}

/// `NAME=SECRET` or `NAME=SECRET:PREFIX` (a secret's name has no `:`).
fn parse_header(text: &str) -> Result<HeaderRule> {
    let Some((name, rest)) = text.split_once('=') else {
        bail!("--header {text:?} is not NAME=SECRET[:PREFIX]");
    };
    let (secret, prefix) = rest.split_once(':').unwrap_or((rest, ""));
    if name.is_empty() || secret.is_empty() {
        bail!("--header {text:?} is not NAME=SECRET[:PREFIX]");
    }
    Ok(HeaderRule { name: name.to_string(), secret: secret.to_string(), prefix: prefix.to_string() })
}

impl AllowArgs {
    fn rule(&self) -> Result<HostRule> {
        let host = HostPattern::new(&self.host)?;
        let connect_to = match &self.connect_to {
            Some(text) => Some(text.parse().with_context(|| format!("--connect-to {text:?} is not ADDR:PORT"))?),
            None => None,
        };
        Ok(HostRule {
            host,
            ports: self.ports.clone(),
            methods: self.methods.iter().map(|method| method.to_ascii_uppercase()).collect(),
            headers: self.headers.iter().map(|header| parse_header(header)).collect::<Result<_>>()?,
            connect_to,
        })
    }
}

/// The policy in FILE, or on stdin for `-`.
fn policy_from(file: &PathBuf) -> Result<NetworkPolicy> {
    let text = if file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading the policy from stdin")?;
        text
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    serde_json::from_str(&text).context("not a network policy")
}

pub async fn policy(args: PolicyArgs) -> Result<ExitCode> {
    let home = args.home.reach("policy").await?;
    let name = args.name.as_str();
    let policy = match args.action {
        PolicyAction::Show => read_policy(&home, name).await?,
        PolicyAction::Set { file } => write_policy(&home, name, policy_from(&file)?).await?,
        PolicyAction::Allow(allow) => {
            let rule = allow.rule()?;
            let mut policy = read_policy(&home, name).await?;
            match policy.allow.iter_mut().find(|existing| existing.host == rule.host) {
                Some(existing) => *existing = rule,
                None => policy.allow.push(rule),
            }
            write_policy(&home, name, policy).await?
        }
        PolicyAction::Deny { host } => {
            let pattern = HostPattern::new(&host)?;
            let mut policy = read_policy(&home, name).await?;
            if !policy.deny.contains(&pattern) {
                policy.deny.push(pattern);
            }
            write_policy(&home, name, policy).await?
        }
        PolicyAction::Clear => write_policy(&home, name, NetworkPolicy::deny_all()).await?,
    };
    print_policy(&policy)?;
    Ok(ExitCode::SUCCESS)
}

/// The secret's value from stdin: at most [`MAX_SECRET_BYTES`] (read one
/// byte past it, to refuse more), one trailing newline dropped.
fn secret_from_stdin() -> Result<String> {
    let mut bytes = Vec::new();
    let limit = u64::try_from(MAX_SECRET_BYTES).unwrap_or(u64::MAX).saturating_add(2);
    std::io::stdin().take(limit).read_to_end(&mut bytes).context("reading the secret from stdin")?;
    let mut value = String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("the secret on stdin is not UTF-8"))?;
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    if value.is_empty() {
        bail!("no secret on stdin (pipe it in: airlock secret set NAME < file)");
    }
    Ok(value)
}

fn secret_path(name: &str) -> String {
    format!("/secrets/{}", encode_path(name))
}

pub async fn secret(command: SecretCommand) -> Result<ExitCode> {
    match command {
        SecretCommand::Set(args) => {
            if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
                eprintln!("airlock: reading the secret from stdin; end it with ctrl-d");
            }
            let value = secret_from_stdin()?;
            match args.home.reach("secret set").await? {
                Home::Local(runtime) => runtime.set_secret(&args.name, &value)?,
                Home::Served(api) => {
                    api.json(Method::PUT, &secret_path(&args.name), Some(&json!({ "value": value }))).await?;
                }
            }
            eprintln!("airlock: secret {} stored", args.name);
        }
        SecretCommand::List(args) => {
            let listed: Vec<(String, u64, u64)> = match args.home.reach("secret list").await? {
                Home::Local(runtime) => runtime
                    .list_secrets()?
                    .into_iter()
                    .map(|info| (info.name, unix_ms(info.created_at), unix_ms(info.updated_at)))
                    .collect(),
                Home::Served(api) => listed_remote(&api).await?,
            };
            println!("{:<40} {:<15} UPDATED_MS", "NAME", "CREATED_MS");
            for (name, created, updated) in listed {
                println!("{name:<40} {created:<15} {updated}");
            }
        }
        SecretCommand::Rm(args) => match args.home.reach("secret rm").await? {
            Home::Local(runtime) => {
                if !runtime.remove_secret(&args.name)? {
                    bail!("no secret named {:?}", args.name);
                }
            }
            Home::Served(api) => {
                api.json(Method::DELETE, &secret_path(&args.name), None).await?;
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

async fn listed_remote(api: &ApiClient) -> Result<Vec<(String, u64, u64)>> {
    let Value::Array(items) = api.json(Method::GET, "/secrets", None).await? else {
        bail!("the server listed secrets as something other than a list");
    };
    Ok(items
        .iter()
        .map(|item| {
            let time = |key: &str| item[key].as_u64().unwrap_or(0);
            (item["name"].as_str().unwrap_or_default().to_string(), time("created_at_ms"), time("updated_at_ms"))
        })
        .collect())
}

fn unix_ms(time: std::time::SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH).map_or(0, |since| u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_flags_parse_with_and_without_a_prefix() {
        let header = parse_header("Authorization=gh-token:Bearer ").unwrap();
        assert_eq!(
            (header.name.as_str(), header.secret.as_str(), header.prefix.as_str()),
            ("Authorization", "gh-token", "Bearer ")
        );
        assert_eq!(parse_header("X-Key=k").unwrap().prefix, "");
        for bad in ["Authorization", "=s", "A=", "A=:p"] {
            assert!(parse_header(bad).is_err(), "{bad}");
        }
    }
}
