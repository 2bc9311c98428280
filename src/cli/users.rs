//! `authd users create` and `authd users import`: straight to the configured users
//! store (the same settings as the server's), with no server running.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{Failure, exit};
use crate::auth::padding::cost_ceiling;
use crate::auth::password::NewPassword;
use crate::auth::roles;
use crate::auth::service::admin::valid_bcrypt_hash;
use crate::auth::username::Username;
use crate::config::Config;
use crate::store::UserStore;
use crate::store::users::{CreateUserError, NewUser};

/// Rows inserted per statement by an import: large enough that 100,000 rows take a
/// hundred round trips, small enough for any database's limit on placeholders.
pub const IMPORT_BATCH: usize = 1000;

/// Where `users create` reads the password from. Never the command line, where `ps`
/// would show it.
#[derive(Debug, Clone)]
pub enum PasswordSource {
    /// Asked twice on the terminal, without echo.
    Prompt,
    /// The first line of standard input.
    Stdin,
    /// The environment variable of this name.
    Env(String),
}

/// The configuration and the users store, or why not.
async fn open_store() -> Result<(Config, UserStore), Failure> {
    let config = Config::from_env()
        .map_err(|e| Failure::new(exit::USAGE, format!("configuration error: {e}")))?;
    let store = UserStore::connect(&config.users).await.map_err(|e| {
        Failure::new(
            exit::UNAVAILABLE,
            format!(
                "cannot use the {}: {}",
                config.users.describe(),
                one_line(&e)
            ),
        )
    })?;
    Ok((config, store))
}

fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

/// `authd users create NAME --role …`: makes a user (the first admin, typically).
pub async fn create(
    name: &str,
    role_names: &[String],
    source: PasswordSource,
    require_password_change: bool,
) -> Result<(), Failure> {
    let username = Username::parse(name)
        .map_err(|v| Failure::new(exit::USAGE, format!("username {}", v.description)))?;
    let roles = roles::parse_roles("--role", role_names)
        .map_err(|v| Failure::new(exit::USAGE, format!("{} {}", v.field, v.description)))?;
    let (config, store) = open_store().await?;
    let password = read_password(&source)?;
    let password = NewPassword::parse(
        "password",
        &password,
        &config.password_policy,
        &[username.as_str()],
    )
    .map_err(|violations| {
        let why: Vec<String> = violations.into_iter().map(|v| v.description).collect();
        Failure::new(exit::USAGE, format!("password refused: {}", why.join("; ")))
    })?;
    let cost = config.bcrypt.cost;
    let secret = password.expose().to_owned();
    let hash = tokio::task::spawn_blocking(move || bcrypt::hash(secret, cost))
        .await
        .map_err(|e| Failure::new(exit::FAILED, e.to_string()))?
        .map_err(|e| Failure::new(exit::FAILED, e.to_string()))?;
    let user = NewUser {
        id: uuid::Uuid::new_v4().to_string(),
        username: username.as_str().to_owned(),
        password_hash: hash,
        roles: roles::frame(&roles),
        password_change_required: require_password_change,
    };
    match store.insert(&user).await {
        Ok(()) => {
            println!(
                "created user {} ({}) with roles [{}]",
                user.username,
                user.id,
                roles.join(", ")
            );
            Ok(())
        }
        Err(CreateUserError::UsernameTaken) => Err(Failure::new(
            exit::CONFLICT,
            format!("user {} already exists", user.username),
        )),
        Err(CreateUserError::Store(e)) => Err(Failure::new(
            exit::UNAVAILABLE,
            format!("user not created: {}", super::store_text(&e)),
        )),
    }
}

pub fn read_password(source: &PasswordSource) -> Result<String, Failure> {
    let password = match source {
        PasswordSource::Env(var) => std::env::var(var).map_err(|_| {
            Failure::new(
                exit::USAGE,
                format!("--password-env {var}: the variable is not set (or not UTF-8)"),
            )
        })?,
        PasswordSource::Stdin => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| Failure::new(exit::USAGE, format!("cannot read stdin: {e}")))?;
            line.trim_end_matches(['\n', '\r']).to_owned()
        }
        PasswordSource::Prompt => prompt_twice()?,
    };
    if password.is_empty() {
        return Err(Failure::new(exit::USAGE, "the password is empty"));
    }
    Ok(password)
}

/// Asks for the password twice on the terminal, without echo.
fn prompt_twice() -> Result<String, Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(Failure::new(
            exit::USAGE,
            "no terminal to ask for the password: use --password-stdin or --password-env VAR",
        ));
    }
    let first = prompt("Password: ")?;
    let second = prompt("Password (again): ")?;
    if first != second {
        return Err(Failure::new(exit::USAGE, "the passwords differ"));
    }
    Ok(first)
}

fn prompt(label: &str) -> Result<String, Failure> {
    let failed =
        |e: std::io::Error| Failure::new(exit::USAGE, format!("cannot read the password: {e}"));
    eprint!("{label}");
    std::io::stderr().flush().map_err(failed)?;
    let stdin = std::io::stdin();
    let _echo_off = EchoOff::new(&stdin);
    let mut line = String::new();
    stdin.lock().read_line(&mut line).map_err(failed)?;
    eprintln!();
    Ok(line.trim_end_matches(['\n', '\r']).to_owned())
}

/// Turns the terminal's echo off until dropped.
struct EchoOff {
    #[cfg(target_os = "linux")]
    saved: Option<rustix::termios::Termios>,
}

impl EchoOff {
    #[cfg(target_os = "linux")]
    fn new(stdin: &std::io::Stdin) -> Self {
        use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
        let saved = tcgetattr(stdin).ok();
        if let Some(saved) = &saved {
            let mut quiet = saved.clone();
            quiet.local_modes.remove(LocalModes::ECHO);
            let _ = tcsetattr(stdin, OptionalActions::Now, &quiet);
        }
        Self { saved }
    }

    #[cfg(not(target_os = "linux"))]
    fn new(_: &std::io::Stdin) -> Self {
        Self {}
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(saved) = &self.saved {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                saved,
            );
        }
    }
}

/// The shape of an import file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportFormat {
    /// `username,password_hash[,roles]`, roles separated by `;` or spaces; a first line
    /// that is exactly `username,password_hash` or `username,password_hash,roles` is a
    /// header (any other first line is a row).
    Csv,
    /// One JSON object a line: `{"username": …, "password_hash": …, "roles": […]}`.
    Jsonl,
}

impl ImportFormat {
    /// From the file's extension: `.jsonl`, `.ndjson`, `.json` are JSON Lines, anything
    /// else CSV.
    pub fn guess(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "ndjson" | "json") => Self::Jsonl,
            _ => Self::Csv,
        }
    }
}

/// What an import did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// Rows read (blank lines and a header aside).
    pub rows: u64,
    /// Users added.
    pub imported: u64,
    /// Good rows whose username was already there (or earlier in the file).
    pub skipped: u64,
    /// Rows refused, each reported with its line number.
    pub bad: u64,
}

#[derive(serde::Deserialize)]
struct JsonRow {
    username: String,
    #[serde(alias = "hash")]
    password_hash: String,
    #[serde(default)]
    roles: Vec<String>,
}

/// The headers a CSV file may start with.
const CSV_HEADERS: [&[&str]; 2] = [
    &["username", "password_hash"],
    &["username", "password_hash", "roles"],
];

/// Whether `line` (the file's first) is a CSV header: exactly one of [`CSV_HEADERS`]
/// (fields may be quoted or spaced). A first line that is a row — even one whose
/// username starts with `username` — is a row.
fn is_csv_header(line: &str) -> bool {
    let fields: Vec<&str> = line
        .split(',')
        .map(|f| f.trim().trim_matches('"'))
        .collect();
    CSV_HEADERS.iter().any(|h| fields == *h)
}

/// The file's rows, each with its line number in the file (from 1, counting the header
/// and blank lines; a line ends at `\n`, and a `\r` before it is dropped): the user, or
/// why not. Blank lines and a CSV header are no rows. A line that is not UTF-8 is a bad
/// row, not the end of the import.
fn rows(
    bytes: &[u8],
    format: ImportFormat,
    ceiling: u32,
) -> impl Iterator<Item = (usize, Result<NewUser, String>)> + '_ {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    bytes
        .split(|b| *b == b'\n')
        .enumerate()
        .filter_map(move |(index, raw)| {
            let number = index + 1;
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let line = match std::str::from_utf8(raw) {
                Ok(line) => line.trim(),
                Err(e) => {
                    return Some((
                        number,
                        Err(format!("not UTF-8 (byte {})", e.valid_up_to() + 1)),
                    ));
                }
            };
            let header = index == 0 && format == ImportFormat::Csv && is_csv_header(line);
            if line.is_empty() || header {
                return None;
            }
            Some((number, parse_row(format, line, ceiling)))
        })
}

/// Lines in the file, as [`rows`] numbers them.
fn line_count(bytes: &[u8]) -> usize {
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if bytes.is_empty() {
        0
    } else {
        bytes.iter().filter(|b| **b == b'\n').count() + 1
    }
}

/// One line of the file as a user, or why not.
fn parse_row(format: ImportFormat, line: &str, ceiling: u32) -> Result<NewUser, String> {
    let (username, hash, role_names) = match format {
        ImportFormat::Jsonl => {
            let row: JsonRow =
                serde_json::from_str(line).map_err(|e| format!("not a JSON row: {e}"))?;
            (row.username, row.password_hash, row.roles)
        }
        ImportFormat::Csv => {
            let fields: Vec<&str> = line
                .split(',')
                .map(|f| f.trim().trim_matches('"'))
                .collect();
            match fields[..] {
                [name, hash] => (name.to_owned(), hash.to_owned(), Vec::new()),
                [name, hash, roles] => (
                    name.to_owned(),
                    hash.to_owned(),
                    roles
                        .split([';', ' '])
                        .filter(|r| !r.is_empty())
                        .map(str::to_owned)
                        .collect(),
                ),
                _ => {
                    return Err(format!(
                        "{} fields; expected username,password_hash[,roles]",
                        fields.len()
                    ));
                }
            }
        }
    };
    let name = Username::parse(&username).map_err(|v| format!("username {}", v.description))?;
    if !valid_bcrypt_hash(&hash, ceiling) {
        return Err(format!(
            "password_hash is not a bcrypt hash ($2a$, $2b$ or $2y$, cost 4-{ceiling})"
        ));
    }
    let roles = roles::parse_roles("roles", &role_names).map_err(|v| v.description)?;
    Ok(NewUser {
        id: uuid::Uuid::new_v4().to_string(),
        username: name.as_str().to_owned(),
        password_hash: hash,
        roles: roles::frame(&roles),
        password_change_required: false,
    })
}

/// `authd users import FILE`: adds the users of a CSV or JSON Lines file with their
/// bcrypt hashes (no hashing: it runs at the database's speed), in batches of
/// [`IMPORT_BATCH`]. Users already there are skipped, so a rerun adds nothing; a bad row
/// is reported by line number and the rest go on. A progress bar is drawn on a
/// terminal (or with `progress`).
pub async fn import(
    path: &PathBuf,
    format: Option<ImportFormat>,
    progress: bool,
) -> Result<ImportSummary, Failure> {
    let format = format.unwrap_or_else(|| ImportFormat::guess(path));
    let bytes = std::fs::read(path)
        .map_err(|e| Failure::new(exit::USAGE, format!("{}: {e}", path.display())))?;
    let (config, store) = open_store().await?;
    let ceiling = cost_ceiling(config.bcrypt.cost);
    let started = Instant::now();
    let total_lines = line_count(&bytes);
    let progress = progress || (std::io::stderr().is_terminal() && total_lines >= IMPORT_BATCH);
    let mut summary = ImportSummary::default();
    let mut batch = Vec::with_capacity(IMPORT_BATCH);
    let mut stderr = std::io::stderr().lock();
    for (number, row) in rows(&bytes, format, ceiling) {
        summary.rows += 1;
        match row {
            Ok(user) => batch.push(user),
            Err(why) => {
                summary.bad += 1;
                let _ = writeln!(stderr, "line {number}: {why}");
            }
        }
        if batch.len() == IMPORT_BATCH {
            flush(&store, &mut batch, &mut summary).await?;
            if progress {
                draw(&mut stderr, number, total_lines);
            }
        }
    }
    flush(&store, &mut batch, &mut summary).await?;
    if progress {
        draw(&mut stderr, total_lines, total_lines);
        let _ = writeln!(stderr);
    }
    println!(
        "{} rows: {} imported, {} skipped (already there), {} bad; {:.1} s",
        summary.rows,
        summary.imported,
        summary.skipped,
        summary.bad,
        started.elapsed().as_secs_f64()
    );
    Ok(summary)
}

async fn flush(
    store: &UserStore,
    batch: &mut Vec<NewUser>,
    summary: &mut ImportSummary,
) -> Result<(), Failure> {
    if batch.is_empty() {
        return Ok(());
    }
    let inserted = store.import(batch).await.map_err(|e| {
        Failure::new(
            exit::UNAVAILABLE,
            format!(
                "import stopped after {} users: {} (run it again: users already there are skipped)",
                summary.imported,
                super::store_text(&e)
            ),
        )
    })?;
    let len = u64::try_from(batch.len()).unwrap_or(u64::MAX);
    summary.imported += inserted;
    summary.skipped += len.saturating_sub(inserted);
    batch.clear();
    Ok(())
}

/// `[#########...........]  45% 45000/100000 lines`, redrawn in place.
fn draw(out: &mut impl Write, done: usize, total: usize) {
    const WIDTH: usize = 30;
    let filled = (done * WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH)
        .min(WIDTH);
    let percent = (done * 100).checked_div(total).unwrap_or(100);
    let _ = write!(
        out,
        "\r[{}{}] {percent:>3}% {done}/{total} lines",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled)
    );
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$2y$04$n4Uy0eSnMfvnESYL.bLwuuj0U/ETSsoTpRT9GVk5bektyVVa5xnIi";

    #[test]
    fn rows_are_read_from_csv_and_json_lines() {
        let csv = parse_row(ImportFormat::Csv, &format!("Alice,{HASH},admin;ops"), 14).unwrap();
        assert_eq!(csv.username, "alice");
        assert_eq!(csv.roles, ",admin,ops,");
        let json = parse_row(
            ImportFormat::Jsonl,
            &format!(r#"{{"username":"bob","password_hash":"{HASH}","roles":["ops"]}}"#),
            14,
        )
        .unwrap();
        assert_eq!(
            (json.username.as_str(), json.roles.as_str()),
            ("bob", ",ops,")
        );
        assert!(parse_row(ImportFormat::Csv, &format!("bob,{HASH}"), 14).is_ok());
    }

    /// Each row's line number and username, or `bad: ` and why.
    fn read_rows(text: &[u8], format: ImportFormat) -> Vec<(usize, String)> {
        rows(text, format, 14)
            .map(|(n, r)| match r {
                Ok(u) => (n, u.username),
                Err(why) => (n, format!("bad: {why}")),
            })
            .collect()
    }

    #[test]
    fn rows_are_numbered_by_their_line_in_the_file() {
        let mut text = format!(
            "username,password_hash,roles\r\n\nann,{HASH}\nnot a row\n\n  \nbo,{HASH}\nbob,{HASH},ops\r\n"
        )
        .into_bytes();
        text.extend_from_slice(b"cy\xff,");
        text.extend_from_slice(format!("{HASH}\ncat,{HASH}\n").as_bytes());
        let read = read_rows(&text, ImportFormat::Csv);
        let numbers: Vec<usize> = read.iter().map(|(n, _)| *n).collect();
        assert_eq!(numbers, [3, 4, 7, 8, 9, 10], "{read:?}");
        assert_eq!(read[0].1, "ann");
        assert!(read[1].1.starts_with("bad: 1 fields"), "{read:?}");
        assert!(read[2].1.starts_with("bad: username"), "{read:?}");
        assert_eq!(read[3].1, "bob");
        assert_eq!(read[4].1, "bad: not UTF-8 (byte 3)");
        assert_eq!(read[5].1, "cat");
        assert_eq!(line_count(&text), 10);
    }

    #[test]
    fn only_an_exact_first_line_header_is_skipped() {
        for header in [
            "username,password_hash",
            "username,password_hash,roles",
            "\"username\", \"password_hash\"",
            "\u{feff}username,password_hash",
        ] {
            let text = format!("{header}\nann,{HASH}\n");
            assert_eq!(
                read_rows(text.as_bytes(), ImportFormat::Csv),
                [(2, "ann".to_owned())],
                "{header}"
            );
        }
        // A user whose name starts with "username" is a row, not a header.
        let text = format!("usernames,{HASH}\nann,{HASH}\n");
        assert_eq!(
            read_rows(text.as_bytes(), ImportFormat::Csv),
            [(1, "usernames".to_owned()), (2, "ann".to_owned())]
        );
        // Header-like lines that are not a known header are bad rows, reported.
        for first in [
            "username",
            "username,hash",
            "Username,Password_Hash,Roles,Extra",
        ] {
            let text = format!("{first}\nann,{HASH}\n");
            let read = read_rows(text.as_bytes(), ImportFormat::Csv);
            assert_eq!(read.len(), 2, "{first}: {read:?}");
            assert!(
                read[0].0 == 1 && read[0].1.starts_with("bad: "),
                "{first}: {read:?}"
            );
        }
        // Further down, the header is a bad row too.
        let text = format!("ann,{HASH}\nusername,password_hash\n");
        let read = read_rows(text.as_bytes(), ImportFormat::Csv);
        assert!(read[1].0 == 2 && read[1].1.starts_with("bad: "), "{read:?}");
        // JSON Lines have no header.
        let text = format!(
            "username,password_hash\n{{\"username\":\"ann\",\"password_hash\":\"{HASH}\"}}\n"
        );
        let read = read_rows(text.as_bytes(), ImportFormat::Jsonl);
        assert!(read[0].1.starts_with("bad: not a JSON row"), "{read:?}");
        assert_eq!(read[1], (2, "ann".to_owned()));
    }

    #[test]
    fn bad_rows_say_why() {
        for (format, line) in [
            (ImportFormat::Csv, "alice".to_owned()),
            (ImportFormat::Csv, "alice,plaintext".to_owned()),
            (ImportFormat::Csv, format!("a b,{HASH}")),
            (ImportFormat::Csv, format!("alice,{HASH},Admin")),
            (ImportFormat::Jsonl, "{".to_owned()),
            (ImportFormat::Jsonl, r#"{"username":"x"}"#.to_owned()),
            // Above the ceiling.
            (
                ImportFormat::Csv,
                format!("alice,{}", HASH.replace("$04$", "$31$")),
            ),
            (
                ImportFormat::Csv,
                format!("alice,{}", HASH.replace("$04$", "$15$")),
            ),
        ] {
            assert!(parse_row(format, &line, 14).is_err(), "{line}");
        }
    }

    #[test]
    fn the_format_follows_the_extension() {
        assert_eq!(
            ImportFormat::guess(Path::new("u.jsonl")),
            ImportFormat::Jsonl
        );
        assert_eq!(ImportFormat::guess(Path::new("u.csv")), ImportFormat::Csv);
        assert_eq!(ImportFormat::guess(Path::new("u")), ImportFormat::Csv);
    }
}
