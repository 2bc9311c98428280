//! Users in MySQL (MariaDB-compatible) or, embedded, in an SQLite file, through sqlx.
//! Both speak the same SQL here; each has its own migrations.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use sqlx::mysql::{MySqlDatabaseError, MySqlPool, MySqlPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{ConnectOptions, Executor};

use super::{PoolStats, StoreError};
use crate::config::{DatabaseConfig, UsersBackend};

#[path = "second_factor.rs"]
pub mod second_factor;

/// A stored user.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct User {
    /// UUID, the token's `sub`.
    pub id: String,
    /// Canonical (lower-case) username.
    pub username: String,
    /// bcrypt hash.
    pub password_hash: String,
    /// Tokens issued (whole seconds) before this are refused when sessions cannot be checked.
    pub sessions_valid_after: i64,
    /// The user's roles, comma-framed (`,admin,ops,`; empty for none): see
    /// [`crate::auth::roles`].
    pub roles: String,
    /// A disabled user cannot log in, and has no sessions.
    pub disabled: bool,
    /// Login tells the user to change the password an operator set.
    pub password_change_required: bool,
}

/// The columns of [`User`], in a `SELECT`.
macro_rules! user_columns {
    () => {
        "id, username, password_hash, sessions_valid_after, roles, disabled, password_change_required"
    };
}

/// A user to insert (CreateUser, `authd users create`, `authd users import`).
#[derive(Debug, Clone)]
pub struct NewUser {
    /// UUID.
    pub id: String,
    /// Canonical username.
    pub username: String,
    /// bcrypt hash.
    pub password_hash: String,
    /// Comma-framed roles (see [`User::roles`]).
    pub roles: String,
    /// Ask for a new password at the next login.
    pub password_change_required: bool,
}

/// Which users ListUsers wants.
#[derive(Debug, Clone, Default)]
pub struct UserFilter {
    /// Usernames starting with this (canonical, `[a-z0-9_]` only).
    pub name_prefix: String,
    /// Holders of this role (a valid role name).
    pub role: Option<String>,
    /// Only disabled users (`Some(true)`) or only enabled ones (`Some(false)`).
    pub disabled: Option<bool>,
}

/// A change that takes the `admin` role away from a user, unless that user is the last
/// enabled admin: see [`UserStore::change_unless_last_admin`].
#[derive(Debug, Clone, Copy)]
pub enum AdminLoss<'a> {
    /// Disable the user (and move `sessions_valid_after` to this time).
    Disable(i64),
    /// Replace the user's roles with these (comma-framed, without `admin`).
    SetRoles(&'a str),
}

/// What [`UserStore::change_unless_last_admin`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarded {
    /// Changed (or nothing to change: no such user).
    Done,
    /// Refused: the user is the last enabled admin.
    LastAdmin,
}

/// `LIKE` pattern of a user holding the `admin` role (roles are comma-framed).
const ADMIN_PATTERN: &str = "%,admin,%";

/// Creating a user failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateUserError {
    /// The username is taken.
    #[error("username taken")]
    UsernameTaken,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The users table.
#[derive(Debug, Clone)]
pub struct UserStore {
    pool: Pool,
    /// `DB_QUERY_TIMEOUT` (MySQL); an SQLite file has its busy timeout instead.
    query_timeout: Option<Duration>,
}

/// The database behind the store.
#[derive(Debug, Clone)]
pub enum Pool {
    /// MySQL or MariaDB.
    MySql(MySqlPool),
    /// An SQLite file.
    Sqlite(SqlitePool),
}

/// MySQL's "Unknown database" error number.
const ER_BAD_DB_ERROR: u16 = 1049;

impl UserStore {
    /// Opens the configured backend and applies its migrations.
    pub async fn connect(backend: &UsersBackend) -> anyhow::Result<Self> {
        match backend {
            UsersBackend::MySql(config) => Self::connect_mysql(config).await,
            UsersBackend::Sqlite { path } => Self::open_sqlite(path).await,
        }
    }

    /// Opens (creating if needed) an SQLite file and applies `migrations/sqlite`.
    pub async fn open_sqlite(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5))
            .disable_statement_logging();
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self {
            pool: Pool::Sqlite(pool),
            query_timeout: None,
        })
    }

    /// Connects to MySQL, creates the database if it does not exist yet, and applies
    /// `migrations/mysql`.
    pub async fn connect_mysql(config: &DatabaseConfig) -> anyhow::Result<Self> {
        let options = config.options.expose().clone().disable_statement_logging();
        // One direct connection first: its error says what is wrong ("connection
        // refused", "access denied"), where the pool's would only say it timed out.
        let first = tokio::time::timeout(config.acquire_timeout, options.connect()).await;
        match first {
            Err(_) => anyhow::bail!("no answer within {:?}", config.acquire_timeout),
            Ok(Ok(conn)) => drop(conn),
            Ok(Err(sqlx::Error::Database(e)))
                if e.try_downcast_ref::<MySqlDatabaseError>()
                    .is_some_and(|e| e.number() == ER_BAD_DB_ERROR) =>
            {
                create_database(&options).await?;
            }
            Ok(Err(e)) => return Err(e.into()),
        }
        let pool = MySqlPoolOptions::new()
            .max_connections(config.pool_size)
            .acquire_timeout(config.acquire_timeout)
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/mysql").run(&pool).await?;
        Ok(Self {
            pool: Pool::MySql(pool),
            query_timeout: Some(config.query_timeout),
        })
    }

    /// The pool, for tests and tools.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// How many connections the pool holds.
    pub fn pool_stats(&self) -> PoolStats {
        on_pool!(self, |pool| PoolStats {
            open: pool.size(),
            idle: u32::try_from(pool.num_idle()).unwrap_or(u32::MAX),
            max: pool.options().get_max_connections(),
        })
    }

    /// Inserts a user with no roles; a taken username (case-insensitively) is
    /// `UsernameTaken`.
    pub async fn create(
        &self,
        id: &str,
        username: &str,
        password_hash: &str,
    ) -> Result<(), CreateUserError> {
        self.insert(&NewUser {
            id: id.to_owned(),
            username: username.to_owned(),
            password_hash: password_hash.to_owned(),
            roles: String::new(),
            password_change_required: false,
        })
        .await
    }

    /// The user with this canonical username.
    pub async fn find_by_username(&self, username: &str) -> Result<Option<User>, StoreError> {
        let select = async {
            on_pool!(self, |pool| {
                sqlx::query_as::<_, User>(concat!(
                    "SELECT ",
                    user_columns!(),
                    " FROM users WHERE username = ?"
                ))
                .bind(username)
                .fetch_optional(pool)
                .await
            })
        };
        self.within(select, std::convert::identity)
            .await
            .map_err(classify)
    }

    /// The user with this id.
    pub async fn find_by_id(&self, id: &str) -> Result<Option<User>, StoreError> {
        let select = async {
            on_pool!(self, |pool| sqlx::query_as::<_, User>(concat!(
                "SELECT ",
                user_columns!(),
                " FROM users WHERE id = ?"
            ))
            .bind(id)
            .fetch_optional(pool)
            .await)
        };
        self.within(select, std::convert::identity)
            .await
            .map_err(classify)
    }

    /// The highest bcrypt cost among the stored hashes (`None` when there is none). bcrypt
    /// writes the cost as two digits after the prefix (`$2b$10$…`), so the greatest
    /// string is the greatest cost. Reads the whole table: at start-up and now and then.
    pub async fn max_hash_cost(&self) -> Result<Option<u32>, StoreError> {
        let select = async {
            on_pool!(self, |pool| sqlx::query_scalar::<_, Option<String>>(
                "SELECT MAX(SUBSTR(password_hash, 5, 2)) FROM users \
                 WHERE password_hash LIKE '$2_$__$%'",
            )
            .fetch_one(pool)
            .await)
        };
        let max = self
            .within(select, std::convert::identity)
            .await
            .map_err(classify)?;
        Ok(max.and_then(|m| m.parse().ok()))
    }

    /// Replaces a hash with another of the same password (at the configured cost),
    /// unless it changed meanwhile.
    pub async fn upgrade_hash(
        &self,
        id: &str,
        old_hash: &str,
        new_hash: &str,
    ) -> Result<bool, StoreError> {
        let update = async {
            on_pool!(self, |pool| sqlx::query(
                "UPDATE users SET password_hash = ? WHERE id = ? AND password_hash = ?"
            )
            .bind(new_hash)
            .bind(id)
            .bind(old_hash)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()))
        };
        let affected = self
            .within(update, std::convert::identity)
            .await
            .map_err(classify)?;
        Ok(affected == 1)
    }

    /// Sets a new hash and moves `sessions_valid_after` forward to `valid_after`, in one
    /// transaction: no crash can leave the new password with the old tokens honoured.
    /// The `expected_hash` guard makes two concurrent changes fail one of them.
    pub async fn change_password(
        &self,
        id: &str,
        expected_hash: &str,
        new_hash: &str,
        valid_after: i64,
    ) -> Result<bool, StoreError> {
        let change = async {
            on_pool!(self, |pool| {
                let mut tx = pool.begin().await.map_err(classify)?;
                let done = sqlx::query(
                    "UPDATE users SET password_hash = ?, password_change_required = FALSE, \
                 sessions_valid_after = CASE WHEN sessions_valid_after > ? \
                 THEN sessions_valid_after ELSE ? END \
                 WHERE id = ? AND password_hash = ?",
                )
                .bind(new_hash)
                .bind(valid_after)
                .bind(valid_after)
                .bind(id)
                .bind(expected_hash)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
                if done.rows_affected() != 1 {
                    tx.rollback().await.map_err(classify)?;
                    return Ok(false);
                }
                tx.commit().await.map_err(classify)?;
                Ok(true)
            })
        };
        self.within(change, classify).await
    }

    /// Inserts a user with roles and flags; a taken username is `UsernameTaken`.
    pub async fn insert(&self, user: &NewUser) -> Result<(), CreateUserError> {
        let insert = async {
            on_pool!(self, |pool| {
                sqlx::query(
                    "INSERT INTO users (id, username, password_hash, sessions_valid_after, \
                     roles, disabled, password_change_required) VALUES (?, ?, ?, 0, ?, FALSE, ?)",
                )
                .bind(&user.id)
                .bind(&user.username)
                .bind(&user.password_hash)
                .bind(&user.roles)
                .bind(user.password_change_required)
                .execute(pool)
                .await
                .map(|_| ())
            })
        };
        match self.within(insert, std::convert::identity).await {
            Ok(()) => Ok(()),
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(CreateUserError::UsernameTaken)
            }
            Err(e) => Err(classify(e).into()),
        }
    }

    /// Inserts many users in one statement, skipping those whose username is taken (an
    /// import run again adds nothing). Returns how many were inserted.
    pub async fn import(&self, users: &[NewUser]) -> Result<u64, StoreError> {
        if users.is_empty() {
            return Ok(0);
        }
        let insert = async {
            on_pool!(self, |pool| {
                let verb = match &self.pool {
                    Pool::MySql(_) => "INSERT IGNORE INTO",
                    Pool::Sqlite(_) => "INSERT OR IGNORE INTO",
                };
                let mut query = sqlx::QueryBuilder::new(format!(
                    "{verb} users (id, username, password_hash, sessions_valid_after, roles, \
                     disabled, password_change_required) "
                ));
                query.push_values(users, |mut row, u| {
                    row.push_bind(&u.id)
                        .push_bind(&u.username)
                        .push_bind(&u.password_hash)
                        .push_bind(0_i64)
                        .push_bind(&u.roles)
                        .push_bind(false)
                        .push_bind(u.password_change_required);
                });
                query
                    .build()
                    .execute(pool)
                    .await
                    .map(|done| done.rows_affected())
            })
        };
        self.within(insert, std::convert::identity)
            .await
            .map_err(classify)
    }

    /// Moves `sessions_valid_after` forward to `now` (never back): every token, and every
    /// second-factor ticket, made until then is refused. False when there is no such user.
    pub async fn end_sessions_before(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let update = async {
            on_pool!(self, |pool| sqlx::query(
                "UPDATE users SET sessions_valid_after = CASE \
                 WHEN sessions_valid_after < ? THEN ? ELSE sessions_valid_after END \
                 WHERE id = ?"
            )
            .bind(now)
            .bind(now)
            .bind(id)
            .execute(pool)
            .await
            .map(|_| ()))
        };
        self.within(update, std::convert::identity)
            .await
            .map_err(classify)?;
        Ok(self.find_by_id(id).await?.is_some())
    }

    /// Disables (refusing logins, and moving `sessions_valid_after` to `now` so that open
    /// mode refuses the user's tokens too) or enables a user. False when there is no
    /// such user.
    pub async fn set_disabled(
        &self,
        id: &str,
        disabled: bool,
        now: i64,
    ) -> Result<bool, StoreError> {
        let update = async {
            on_pool!(self, |pool| sqlx::query(
                "UPDATE users SET disabled = ?, sessions_valid_after = CASE \
                 WHEN ? AND sessions_valid_after < ? THEN ? ELSE sessions_valid_after END \
                 WHERE id = ?"
            )
            .bind(disabled)
            .bind(disabled)
            .bind(now)
            .bind(now)
            .bind(id)
            .execute(pool)
            .await
            .map(|_| ()))
        };
        self.within(update, std::convert::identity)
            .await
            .map_err(classify)?;
        Ok(self.find_by_id(id).await?.is_some())
    }

    /// Applies `change` to user `id` unless it would leave no enabled user with the
    /// `admin` role. Race-safe: of two concurrent changes to the last two admins, one
    /// is refused. MySQL: one transaction that first locks the enabled admins' rows
    /// (`SELECT … FOR UPDATE`), so concurrent guarded changes take turns and each sees
    /// the other's outcome. SQLite: one `UPDATE` whose condition counts the other
    /// admins (SQLite runs one writing statement at a time).
    pub async fn change_unless_last_admin(
        &self,
        id: &str,
        change: AdminLoss<'_>,
    ) -> Result<Guarded, StoreError> {
        let guarded = async {
            match &self.pool {
                Pool::MySql(pool) => {
                    let mut tx = pool.begin().await?;
                    let admins: Vec<String> = sqlx::query_scalar(
                        "SELECT id FROM users WHERE disabled = FALSE AND roles LIKE ? FOR UPDATE",
                    )
                    .bind(ADMIN_PATTERN)
                    .fetch_all(&mut *tx)
                    .await?;
                    if admins.iter().all(|a| a == id) && !admins.is_empty() {
                        tx.rollback().await?;
                        return Ok(Guarded::LastAdmin);
                    }
                    let update = match change {
                        AdminLoss::Disable(now) => sqlx::query(
                            "UPDATE users SET disabled = TRUE, sessions_valid_after = CASE \
                             WHEN sessions_valid_after < ? THEN ? ELSE sessions_valid_after END \
                             WHERE id = ?",
                        )
                        .bind(now)
                        .bind(now),
                        AdminLoss::SetRoles(roles) => {
                            sqlx::query("UPDATE users SET roles = ? WHERE id = ?").bind(roles)
                        }
                    };
                    update.bind(id).execute(&mut *tx).await?;
                    tx.commit().await?;
                    Ok(Guarded::Done)
                }
                Pool::Sqlite(pool) => {
                    // Changed only if the user is no enabled admin, or another one is left.
                    macro_rules! unless_last {
                        () => {
                            " WHERE id = ? AND (disabled = 1 OR roles NOT LIKE ? \
                             OR EXISTS (SELECT 1 FROM users AS other WHERE other.id <> ? \
                             AND other.disabled = 0 AND other.roles LIKE ?))"
                        };
                    }
                    let update = match change {
                        AdminLoss::Disable(now) => sqlx::query(concat!(
                            "UPDATE users SET disabled = 1, sessions_valid_after = CASE \
                             WHEN sessions_valid_after < ? THEN ? ELSE sessions_valid_after END",
                            unless_last!()
                        ))
                        .bind(now)
                        .bind(now),
                        AdminLoss::SetRoles(roles) => {
                            sqlx::query(concat!("UPDATE users SET roles = ?", unless_last!()))
                                .bind(roles)
                        }
                    };
                    let changed = update
                        .bind(id)
                        .bind(ADMIN_PATTERN)
                        .bind(id)
                        .bind(ADMIN_PATTERN)
                        .execute(pool)
                        .await?
                        .rows_affected();
                    if changed > 0 {
                        return Ok(Guarded::Done);
                    }
                    // Nothing changed: no such user, or the last admin.
                    let exists: Option<i64> =
                        sqlx::query_scalar("SELECT 1 FROM users WHERE id = ?")
                            .bind(id)
                            .fetch_optional(pool)
                            .await?;
                    Ok(if exists.is_some() {
                        Guarded::LastAdmin
                    } else {
                        Guarded::Done
                    })
                }
            }
        };
        self.within(guarded, std::convert::identity)
            .await
            .map_err(classify)
    }

    /// Removes a user's row. False when there was none.
    pub async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let delete = async {
            on_pool!(self, |pool| sqlx::query("DELETE FROM users WHERE id = ?")
                .bind(id)
                .execute(pool)
                .await
                .map(|done| done.rows_affected()))
        };
        let deleted = self
            .within(delete, std::convert::identity)
            .await
            .map_err(classify)?;
        Ok(deleted > 0)
    }

    /// An operator's new password: the hash, whether it must be changed at the next
    /// login, and `sessions_valid_after` moved to `now`, in one statement.
    pub async fn set_password(
        &self,
        id: &str,
        hash: &str,
        require_change: bool,
        now: i64,
    ) -> Result<(), StoreError> {
        let update = async {
            on_pool!(self, |pool| sqlx::query(
                "UPDATE users SET password_hash = ?, password_change_required = ?, \
                 sessions_valid_after = CASE WHEN sessions_valid_after > ? \
                 THEN sessions_valid_after ELSE ? END WHERE id = ?"
            )
            .bind(hash)
            .bind(require_change)
            .bind(now)
            .bind(now)
            .bind(id)
            .execute(pool)
            .await
            .map(|_| ()))
        };
        self.within(update, std::convert::identity)
            .await
            .map_err(classify)
    }

    /// Replaces a user's roles (comma-framed).
    pub async fn set_roles(&self, id: &str, roles: &str) -> Result<(), StoreError> {
        let update = async {
            on_pool!(self, |pool| sqlx::query(
                "UPDATE users SET roles = ? WHERE id = ?"
            )
            .bind(roles)
            .bind(id)
            .execute(pool)
            .await
            .map(|_| ()))
        };
        self.within(update, std::convert::identity)
            .await
            .map_err(classify)
    }

    /// At most `limit` users matching `filter`, by username, after the username `after`.
    pub async fn list(
        &self,
        filter: &UserFilter,
        after: &str,
        limit: usize,
    ) -> Result<Vec<User>, StoreError> {
        let select = async {
            on_pool!(self, |pool| {
                let mut query = sqlx::QueryBuilder::new(concat!(
                    "SELECT ",
                    user_columns!(),
                    " FROM users WHERE username > "
                ));
                query.push_bind(after);
                if !filter.name_prefix.is_empty() {
                    // A canonical name has no LIKE wildcard but `_`, escaped here (`!` is
                    // in no name or role).
                    let pattern = format!("{}%", filter.name_prefix.replace('_', "!_"));
                    query
                        .push(" AND username LIKE ")
                        .push_bind(pattern)
                        .push(" ESCAPE '!'");
                }
                if let Some(role) = &filter.role {
                    query
                        .push(" AND roles LIKE ")
                        .push_bind(format!("%,{},%", role.replace('_', "!_")))
                        .push(" ESCAPE '!'");
                }
                if let Some(disabled) = filter.disabled {
                    query.push(" AND disabled = ").push_bind(disabled);
                }
                query
                    .push(" ORDER BY username LIMIT ")
                    .push_bind(i64::try_from(limit).unwrap_or(i64::MAX));
                query.build_query_as::<User>().fetch_all(pool).await
            })
        };
        self.within(select, std::convert::identity)
            .await
            .map_err(classify)
    }

    /// Runs one store operation within `DB_QUERY_TIMEOUT`, so a stuck database costs a
    /// caller that long and not the whole request timeout. A timeout is an I/O error:
    /// the store is unavailable for now.
    async fn within<T, E>(
        &self,
        operation: impl Future<Output = Result<T, E>>,
        error: fn(sqlx::Error) -> E,
    ) -> Result<T, E> {
        let Some(limit) = self.query_timeout else {
            return operation.await;
        };
        match tokio::time::timeout(limit, operation).await {
            Ok(result) => result,
            Err(_) => Err(error(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within DB_QUERY_TIMEOUT ({limit:?})"),
            )))),
        }
    }
}

async fn create_database(options: &sqlx::mysql::MySqlConnectOptions) -> anyhow::Result<()> {
    let name = options
        .get_database()
        .ok_or_else(|| anyhow::anyhow!("no database name configured"))?
        .to_owned();
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        anyhow::bail!(
            "database {name:?} does not exist, and its name is not one authd will create"
        );
    }
    let mut conn = options.clone().database("").connect().await?;
    let statement = format!("CREATE DATABASE IF NOT EXISTS `{name}`");
    // The name is checked above to be [A-Za-z0-9_] only.
    conn.execute(sqlx::AssertSqlSafe(statement)).await?;
    tracing::info!(database = %name, "created the database");
    Ok(())
}

/// Sorts sqlx errors into "try again later" and "something is wrong", and counts them.
pub(crate) fn classify(e: sqlx::Error) -> StoreError {
    let error = match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.into()),
        other => StoreError::Internal(other.into()),
    };
    error.counted("users")
}
