//! `airlock token create|list|revoke`: the HTTP API's bearer tokens, in the
//! home's registry. They work beside a running `airlock serve` on the same
//! home (they open only the registry, not the runtime): a token made here is
//! accepted, and one revoked here refused, from the server's next request.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use airlock::runtime::{PRIVATE_DIR_MODE, TokenInfo, TokenStore, default_home};
use anyhow::{Context, Result, bail};

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Make a token and print it on standard output. It is shown this once:
    /// the home keeps only its SHA-256. A tenant's token sees only the
    /// sandboxes made with it; an admin token (--admin) sees every sandbox.
    Create(CreateArgs),
    /// List the tokens (never their secrets): id, name, kind, when made, whether revoked.
    List(HomeArgs),
    /// Revoke a token, by id or name: a running server refuses it from its next request.
    /// Its sandboxes stay, seen from then on by admin tokens only.
    Revoke(RevokeArgs),
}

#[derive(Debug, clap::Args)]
pub struct HomeArgs {
    /// The runtime's home directory. Default: $AIRLOCK_HOME, else the per-user data directory.
    #[arg(long, value_name = "DIR")]
    home: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The token's name (letters, digits, '.', '_', '-'; unique among live tokens).
    name: String,
    /// An admin token: sees every sandbox, whoever made it.
    #[arg(long)]
    admin: bool,
    #[command(flatten)]
    home: HomeArgs,
}

#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// The token's id (as `list` shows it) or its name.
    token: String,
    #[command(flatten)]
    home: HomeArgs,
}

impl HomeArgs {
    fn home(&self) -> PathBuf {
        self.home.clone().unwrap_or_else(default_home)
    }

    /// The tokens of an existing home.
    fn open(&self) -> Result<TokenStore> {
        let home = self.home();
        if !home.is_dir() {
            bail!("there is no Airlock home at {}", home.display());
        }
        TokenStore::open(&home).with_context(|| format!("opening the tokens of {}", home.display()))
    }

    /// The tokens of the home, made (private to this user) when missing.
    fn open_or_create(&self) -> Result<TokenStore> {
        let home = self.home();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE_DIR_MODE)
            .create(&home)
            .with_context(|| format!("creating the home {}", home.display()))?;
        TokenStore::open(&home).with_context(|| format!("opening the tokens of {}", home.display()))
    }
}

pub fn token(command: TokenCommand) -> Result<ExitCode> {
    match command {
        TokenCommand::Create(args) => {
            let tokens = args.home.open_or_create()?;
            let token = tokens.create(&args.name, args.admin)?;
            let kind = if args.admin { "admin" } else { "tenant" };
            eprintln!(
                "airlock: made {kind} token {} ({}); it is shown this once (the home keeps only its hash)",
                token.info.id, token.info.name
            );
            println!("{}", token.secret());
        }
        TokenCommand::List(home) => {
            let tokens = home.open()?.list()?;
            println!("{:<16}  {:<24}  {:<6}  {:<20}  STATUS", "ID", "NAME", "KIND", "CREATED (UTC)");
            for token in tokens {
                println!("{}", row(&token));
            }
        }
        TokenCommand::Revoke(args) => match args.home.open()?.revoke(&args.token)? {
            Some(token) => eprintln!("airlock: revoked token {} ({})", token.id, token.name),
            None => bail!("no live token has the id or name {:?}", args.token),
        },
    }
    Ok(ExitCode::SUCCESS)
}

fn row(token: &TokenInfo) -> String {
    let kind = if token.admin { "admin" } else { "tenant" };
    let status = match token.revoked_at {
        Some(at) => format!("revoked {}", utc(at)),
        None => "live".to_string(),
    };
    format!("{:<16}  {:<24}  {:<6}  {:<20}  {status}", token.id, token.name, kind, utc(token.created_at))
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
fn utc(time: SystemTime) -> String {
    let seconds = time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_date(days);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", of_day / 3600, of_day % 3600 / 60, of_day % 60)
}

/// The proleptic Gregorian date `days` days after 1970-01-01: counted in
/// 400-year eras of 146,097 days, years starting on 1 March so that the
/// leap day falls last.
fn civil_date(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn dates_are_utc_calendar_dates() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01 00:00:00");
        assert_eq!(utc(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29 00:00:00");
        assert_eq!(utc(UNIX_EPOCH + Duration::from_secs(1_798_761_599)), "2026-12-31 23:59:59");
    }
}
