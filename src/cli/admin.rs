//! `authd admin …`: AdminService over gRPC, for operators and scripts. Text for people
//! by default, `--json` for programs; exit codes as in [`super`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::users::PasswordSource;
use super::{Failure, exit};
use crate::proto::auth::v1 as pb;
use crate::proto::auth::v1::admin_service_client::AdminServiceClient;
use crate::telemetry::escape::escape_text;

/// How to reach authd, and what to do there.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// authd's gRPC address (`host:port`, or an http:// or https:// URL).
    #[arg(long, env = "AUTHD_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: String,
    /// PEM CA certificate that signed authd's certificate; turns TLS on.
    #[arg(long, value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for mTLS (its SAN listed in authd's ADMIN_CLIENT_SANS).
    #[arg(long, value_name = "PEM", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// PEM key of --cert-file.
    #[arg(long, value_name = "PEM", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// The name authd's certificate must carry (default: the host of --addr).
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// The environment variable that holds an admin's access token (sent as a bearer).
    /// Never the token itself on the command line, where `ps` would show it.
    #[arg(long, value_name = "VAR", default_value = "AUTHD_TOKEN")]
    pub token_env: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for an answer.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// Where a new password comes from (never the command line).
#[derive(Debug, Args)]
pub struct PasswordArgs {
    /// Read the password from the first line of standard input.
    #[arg(long, conflicts_with = "password_env")]
    pub password_stdin: bool,
    /// Read the password from this environment variable.
    #[arg(long, value_name = "VAR")]
    pub password_env: Option<String>,
}

impl PasswordArgs {
    /// The source: stdin, a variable, or else a prompt.
    pub fn source(&self) -> PasswordSource {
        match (&self.password_env, self.password_stdin) {
            (Some(var), _) => PasswordSource::Env(var.clone()),
            (None, true) => PasswordSource::Stdin,
            (None, false) => PasswordSource::Prompt,
        }
    }
}

/// The AdminService calls.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Create a user with a password (prompted, or --password-stdin/--password-env), or
    /// with an existing bcrypt hash (--password-hash-env).
    CreateUser {
        /// Username.
        username: String,
        /// A role to give (repeatable).
        #[arg(long = "role", value_name = "ROLE")]
        roles: Vec<String>,
        /// Ask the user for a new password at the first login.
        #[arg(long)]
        require_password_change: bool,
        /// Store this variable's bcrypt hash ($2a$, $2b$, $2y$) instead of a password.
        #[arg(long, value_name = "VAR", conflicts_with_all = ["password_stdin", "password_env"])]
        password_hash_env: Option<String>,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// Show a user (by id or username).
    GetUser {
        /// Id or username.
        user: String,
    },
    /// List users, by username.
    ListUsers {
        /// Only usernames starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Only holders of this role.
        #[arg(long)]
        role: Option<String>,
        /// Only disabled users.
        #[arg(long, conflicts_with = "enabled")]
        disabled: bool,
        /// Only enabled users.
        #[arg(long)]
        enabled: bool,
        /// Users per page (at most 500).
        #[arg(long, default_value_t = 50)]
        page_size: i32,
        /// Continue from a page's next_page_token.
        #[arg(long, default_value = "")]
        page_token: String,
        /// Follow every page.
        #[arg(long)]
        all: bool,
    },
    /// Disable a user: no more logins, every session ended, in one step.
    Disable {
        /// Id or username.
        user: String,
    },
    /// Let a disabled user log in again.
    Enable {
        /// Id or username.
        user: String,
    },
    /// Delete a user and end every session (audit rows stay).
    Delete {
        /// Id or username.
        user: String,
        /// Confirm: the user cannot be brought back.
        #[arg(long)]
        yes: bool,
    },
    /// Set a new password (prompted, or --password-stdin/--password-env); ends every session.
    SetPassword {
        /// Id or username.
        user: String,
        /// Ask the user for another at the next login.
        #[arg(long)]
        require_change: bool,
        #[command(flatten)]
        password: PasswordArgs,
    },
    /// End every session of a user.
    RevokeSessions {
        /// Id or username.
        user: String,
    },
    /// Clear the failed-login counter of a user's account.
    Unlock {
        /// Id or username.
        user: String,
    },
    /// Remove a user's second factor (TOTP) and recovery codes: for a user who lost both.
    ResetSecondFactor {
        /// Id or username.
        user: String,
    },
    /// Replace a user's roles (none given: remove them all).
    SetRoles {
        /// Id or username.
        user: String,
        /// The new roles.
        roles: Vec<String>,
    },
    /// List a user's live sessions.
    Sessions {
        /// Id or username.
        user: String,
        /// Sessions per page (at most 50).
        #[arg(long, default_value_t = 20)]
        page_size: i32,
        /// Continue from a page's next_page_token.
        #[arg(long, default_value = "")]
        page_token: String,
    },
    /// Read the audit trail, newest first.
    Audit {
        /// Only rows about this user (id or username).
        #[arg(long)]
        user: Option<String>,
        /// Only this kind (login_failed, admin_action, …).
        #[arg(long)]
        kind: Option<String>,
        /// Only rows from this long ago on (`1h`, `30m`) or since this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only rows before this long ago or this time.
        #[arg(long)]
        until: Option<String>,
        /// Rows per page (at most 500).
        #[arg(long, default_value_t = 100)]
        page_size: i32,
        /// Continue from a page's next_page_token.
        #[arg(long, default_value = "")]
        page_token: String,
    },
}

/// Runs one command; prints its answer.
pub async fn run(args: AdminArgs) -> Result<(), Failure> {
    let channel = connect(&args).await?;
    let token = std::env::var(&args.token_env)
        .ok()
        .filter(|t| !t.is_empty());
    let call = Caller {
        client: AdminServiceClient::new(channel),
        token,
        timeout: Duration::from_secs(args.timeout.max(1)),
    };
    let answer = call.run(args.command).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer.json).unwrap_or_default()
        );
    } else {
        print!("{}", answer.text);
    }
    Ok(())
}

/// A command's answer, both ways.
struct Answer {
    text: String,
    json: Value,
}

async fn connect(args: &AdminArgs) -> Result<Channel, Failure> {
    let usage = |m: String| Failure::new(exit::USAGE, m);
    let tls =
        args.ca_file.is_some() || args.cert_file.is_some() || args.addr.starts_with("https://");
    let url = if args.addr.contains("://") {
        args.addr.clone()
    } else if tls {
        format!("https://{}", args.addr)
    } else {
        format!("http://{}", args.addr)
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| usage(format!("--addr {url}: {e}")))?
        .connect_timeout(Duration::from_secs(5));
    if tls {
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &args.ca_file {
            let pem =
                std::fs::read(ca).map_err(|e| usage(format!("--ca-file {}: {e}", ca.display())))?;
            config = config.ca_certificate(Certificate::from_pem(pem));
        } else {
            config = config.with_enabled_roots();
        }
        if let (Some(cert), Some(key)) = (&args.cert_file, &args.key_file) {
            let cert_pem = std::fs::read(cert)
                .map_err(|e| usage(format!("--cert-file {}: {e}", cert.display())))?;
            let key_pem = std::fs::read(key)
                .map_err(|e| usage(format!("--key-file {}: {e}", key.display())))?;
            config = config.identity(Identity::from_pem(cert_pem, key_pem));
        }
        if let Some(name) = &args.tls_server_name {
            config = config.domain_name(name.clone());
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| usage(format!("TLS: {e}")))?;
    }
    endpoint.connect().await.map_err(|e| {
        Failure::new(
            exit::UNAVAILABLE,
            format!("cannot reach authd at {url}: {}", error_chain(&e)),
        )
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

struct Caller {
    client: AdminServiceClient<Channel>,
    token: Option<String>,
    timeout: Duration,
}

impl Caller {
    fn request<T>(&self, message: T) -> Result<tonic::Request<T>, Failure> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.timeout);
        if let Some(token) = &self.token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| Failure::new(exit::USAGE, "the token is not a valid header value"))?;
            request.metadata_mut().insert("authorization", value);
        }
        Ok(request)
    }

    async fn run(&self, command: AdminCommand) -> Result<Answer, Failure> {
        let mut c = self.client.clone();
        let status = |s: tonic::Status| Failure::from_status(&s);
        Ok(match command {
            AdminCommand::CreateUser {
                username,
                roles,
                require_password_change,
                password_hash_env,
                password,
            } => {
                let (password, password_hash) = match password_hash_env {
                    Some(var) => (
                        String::new(),
                        super::users::read_password(&PasswordSource::Env(var))?,
                    ),
                    None => (
                        super::users::read_password(&password.source())?,
                        String::new(),
                    ),
                };
                let r = c
                    .create_user(self.request(pb::CreateUserRequest {
                        username,
                        password,
                        password_hash,
                        roles,
                        require_password_change,
                    })?)
                    .await
                    .map_err(status)?
                    .into_inner();
                user_answer("created", r.user)
            }
            AdminCommand::GetUser { user } => {
                let r = c
                    .get_user(self.request(pb::GetUserRequest { user })?)
                    .await
                    .map_err(status)?
                    .into_inner();
                user_answer("", r.user)
            }
            AdminCommand::ListUsers {
                prefix,
                role,
                disabled,
                enabled,
                page_size,
                mut page_token,
                all,
            } => {
                let mut users = Vec::new();
                loop {
                    let r = c
                        .list_users(self.request(pb::ListUsersRequest {
                            page_size,
                            page_token: page_token.clone(),
                            name_prefix: prefix.clone().unwrap_or_default(),
                            role: role.clone().unwrap_or_default(),
                            disabled: if disabled {
                                Some(true)
                            } else if enabled {
                                Some(false)
                            } else {
                                None
                            },
                        })?)
                        .await
                        .map_err(status)?
                        .into_inner();
                    users.extend(r.users);
                    page_token = r.next_page_token;
                    if !all || page_token.is_empty() {
                        break;
                    }
                }
                let mut text = String::new();
                for u in &users {
                    text.push_str(&format!(
                        "{:<32} {}  {}{}\n",
                        u.username,
                        u.user_id,
                        if u.disabled { "disabled " } else { "" },
                        if u.roles.is_empty() {
                            String::new()
                        } else {
                            format!("[{}]", u.roles.join(", "))
                        }
                    ));
                }
                if !page_token.is_empty() {
                    text.push_str(&format!("more: --page-token {page_token}\n"));
                }
                Answer {
                    text,
                    json: json!({
                        "users": users.iter().map(user_json).collect::<Vec<_>>(),
                        "next_page_token": page_token,
                    }),
                }
            }
            AdminCommand::Disable { user } => {
                let r = c
                    .disable_user(self.request(pb::DisableUserRequest { user: user.clone() })?)
                    .await
                    .map_err(status)?
                    .into_inner();
                ended("disabled", &user, r.revoked_sessions)
            }
            AdminCommand::Enable { user } => {
                let r = c
                    .enable_user(self.request(pb::EnableUserRequest { user })?)
                    .await
                    .map_err(status)?
                    .into_inner();
                user_answer("enabled", r.user)
            }
            AdminCommand::Delete { user, yes } => {
                if !yes {
                    return Err(Failure::new(
                        exit::USAGE,
                        format!("deleting {user} cannot be undone: add --yes"),
                    ));
                }
                let r = c
                    .delete_user(self.request(pb::DeleteUserRequest { user: user.clone() })?)
                    .await
                    .map_err(status)?
                    .into_inner();
                ended("deleted", &user, r.revoked_sessions)
            }
            AdminCommand::SetPassword {
                user,
                require_change,
                password,
            } => {
                let password = super::users::read_password(&password.source())?;
                let r = c
                    .set_password(self.request(pb::SetPasswordRequest {
                        user: user.clone(),
                        password,
                        require_change,
                    })?)
                    .await
                    .map_err(status)?
                    .into_inner();
                ended("password set for", &user, r.revoked_sessions)
            }
            AdminCommand::RevokeSessions { user } => {
                let r = c
                    .revoke_user_sessions(
                        self.request(pb::RevokeUserSessionsRequest { user: user.clone() })?,
                    )
                    .await
                    .map_err(status)?
                    .into_inner();
                ended("sessions revoked for", &user, r.revoked_sessions)
            }
            AdminCommand::Unlock { user } => {
                c.unlock_user(self.request(pb::UnlockUserRequest { user: user.clone() })?)
                    .await
                    .map_err(status)?;
                Answer {
                    text: format!("unlocked {user}\n"),
                    json: json!({ "unlocked": user }),
                }
            }
            AdminCommand::ResetSecondFactor { user } => {
                let r = c
                    .reset_second_factor(
                        self.request(pb::ResetSecondFactorRequest { user: user.clone() })?,
                    )
                    .await
                    .map_err(status)?
                    .into_inner();
                Answer {
                    text: if r.removed {
                        format!("second factor removed for {user}\n")
                    } else {
                        format!("{user} had no second factor\n")
                    },
                    json: json!({ "user": user, "removed": r.removed }),
                }
            }
            AdminCommand::SetRoles { user, roles } => {
                let r = c
                    .set_roles(self.request(pb::SetRolesRequest { user, roles })?)
                    .await
                    .map_err(status)?
                    .into_inner();
                user_answer("roles set", r.user)
            }
            AdminCommand::Sessions {
                user,
                page_size,
                page_token,
            } => {
                let r = c
                    .list_user_sessions(self.request(pb::ListUserSessionsRequest {
                        user,
                        page_size,
                        page_token,
                    })?)
                    .await
                    .map_err(status)?
                    .into_inner();
                let mut text = format!("{} live sessions\n", r.active_count);
                for s in &r.sessions {
                    text.push_str(&session_line(s));
                }
                if !r.next_page_token.is_empty() {
                    text.push_str(&format!("more: --page-token {}\n", r.next_page_token));
                }
                Answer {
                    text,
                    json: json!({
                        "active_count": r.active_count,
                        "sessions": r.sessions.iter().map(|s| json!({
                            "session_id": s.session_id,
                            "login_time": s.login_time.as_ref().map(|t| t.seconds),
                            "last_seen": s.last_seen.as_ref().map(|t| t.seconds),
                            "expires_at": s.expires_at.as_ref().map(|t| t.seconds),
                            "ip": s.ip,
                            "user_agent": s.user_agent,
                        })).collect::<Vec<_>>(),
                        "next_page_token": r.next_page_token,
                    }),
                }
            }
            AdminCommand::Audit {
                user,
                kind,
                since,
                until,
                page_size,
                page_token,
            } => {
                let r = c
                    .list_audit_events(self.request(pb::ListAuditEventsRequest {
                        user: user.unwrap_or_default(),
                        kind: kind.unwrap_or_default(),
                        since: since.as_deref().map(point_in_time).transpose()?,
                        until: until.as_deref().map(point_in_time).transpose()?,
                        page_size,
                        page_token,
                    })?)
                    .await
                    .map_err(status)?
                    .into_inner();
                let mut text = String::new();
                for e in &r.events {
                    text.push_str(&format!(
                        "{}  {:<22} user {}  from {}  {}\n",
                        time_text(e.at.as_ref()),
                        e.kind,
                        if e.user_id.is_empty() {
                            "-"
                        } else {
                            &e.user_id
                        },
                        if e.client_ip.is_empty() {
                            "-"
                        } else {
                            &e.client_ip
                        },
                        e.detail
                    ));
                }
                if !r.next_page_token.is_empty() {
                    text.push_str(&format!("more: --page-token {}\n", r.next_page_token));
                }
                Answer {
                    text,
                    json: json!({
                        "events": r.events.iter().map(|e| json!({
                            "id": e.id,
                            "at_ms": e.at.as_ref().map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000),
                            "kind": e.kind,
                            "user_id": e.user_id,
                            "username_hash": e.username_hash,
                            "client_ip": e.client_ip,
                            "user_agent": e.user_agent,
                            "session_id": e.session_id,
                            "jti": e.jti,
                            "detail": e.detail,
                        })).collect::<Vec<_>>(),
                        "next_page_token": r.next_page_token,
                    }),
                }
            }
        })
    }
}

fn user_json(u: &pb::User) -> Value {
    json!({
        "user_id": u.user_id,
        "username": u.username,
        "roles": u.roles,
        "disabled": u.disabled,
        "password_change_required": u.password_change_required,
    })
}

fn user_answer(what: &str, user: Option<pb::User>) -> Answer {
    let u = user.unwrap_or_default();
    let head = if what.is_empty() {
        String::new()
    } else {
        format!("{what}: ")
    };
    Answer {
        text: format!(
            "{head}{} ({})\n  roles: {}\n  state: {}{}\n",
            u.username,
            u.user_id,
            if u.roles.is_empty() {
                "none".to_owned()
            } else {
                u.roles.join(", ")
            },
            if u.disabled { "disabled" } else { "enabled" },
            if u.password_change_required {
                ", must change password"
            } else {
                ""
            }
        ),
        json: user_json(&u),
    }
}

fn ended(what: &str, user: &str, sessions: u32) -> Answer {
    Answer {
        text: format!("{what} {user}: {sessions} sessions ended\n"),
        json: json!({ "user": user, "revoked_sessions": sessions }),
    }
}

fn time_text(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(|t| {
        let secs = u64::try_from(t.seconds).ok()?;
        Some(
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(secs))
                .to_string(),
        )
    })
    .unwrap_or_else(|| "-".to_owned())
}

/// `1h` (that long ago) or an RFC 3339 time.
fn point_in_time(text: &str) -> Result<prost_types::Timestamp, Failure> {
    use crate::clock::{Clock as _, SystemClock};
    let now = SystemClock.now();
    let at = match humantime::parse_duration(text) {
        Ok(ago) => now.checked_sub(ago),
        Err(_) => humantime::parse_rfc3339_weak(text).ok(),
    }
    .ok_or_else(|| {
        Failure::new(
            exit::USAGE,
            format!("{text:?} is neither a duration (1h, 30m) nor a time (2026-12-01T10:00:00Z)"),
        )
    })?;
    let since_epoch = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Ok(prost_types::Timestamp {
        seconds: i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(since_epoch.subsec_nanos()).unwrap_or_default(),
    })
}

/// One session in human output. The user agent (and address) came from a client: control
/// characters are escaped, so one cannot rewrite the operator's terminal or fake lines.
fn session_line(s: &pb::Session) -> String {
    format!(
        "{}  login {}  seen {}  {}  {}\n",
        s.session_id,
        time_text(s.login_time.as_ref()),
        time_text(s.last_seen.as_ref()),
        escape_text(&s.ip),
        escape_text(&s.user_agent)
    )
}

#[cfg(test)]
mod session_output_tests {
    use super::*;

    #[test]
    fn a_user_agent_cannot_write_to_the_terminal() {
        let line = session_line(&pb::Session {
            session_id: "s1".into(),
            ip: "127.0.0.1".into(),
            user_agent: "curl\u{1b}[2J\r\nfake  line\u{202e}".into(),
            ..Default::default()
        });
        assert_eq!(line.matches('\n').count(), 1, "{line:?}");
        assert!(!line.contains('\u{1b}') && !line.contains('\r') && !line.contains('\u{202e}'));
        assert!(
            line.ends_with("curl\\u{1b}[2J\\r\\nfake  line\\u{202e}\n"),
            "{line:?}"
        );
    }
}
