//! The audit trail's table, `audit_events`, next to the users (MySQL or SQLite).

use sqlx::QueryBuilder;

use super::users::{Pool, classify};
use super::{MAX_USER_AGENT_BYTES, StoreError, truncate};

/// One row of `audit_events`. Never holds a password, a token or a hash of either.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    /// When it happened (unix milliseconds).
    pub at_ms: i64,
    /// What happened, e.g. `login_failed`.
    pub kind: &'static str,
    /// The user, when known.
    pub user_id: Option<String>,
    /// A keyed hash of the canonical username tried, when a name was given.
    pub username_hash: Option<String>,
    /// The client address.
    pub client_ip: String,
    /// The client's user agent.
    pub user_agent: String,
    /// The session concerned.
    pub session_id: Option<String>,
    /// The token concerned.
    pub jti: Option<String>,
    /// A few words more (which limit, how long a wait, how many sessions).
    pub detail: String,
}

/// A row as read back (ListAuditEvents), with its position.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct StoredAuditRow {
    /// The row's id: later rows have greater ones.
    pub id: i64,
    /// When it happened (unix milliseconds).
    pub at_ms: i64,
    /// What happened.
    pub kind: String,
    /// The user, when known.
    pub user_id: Option<String>,
    /// A keyed hash of the canonical username.
    pub username_hash: Option<String>,
    /// The client address.
    pub client_ip: String,
    /// The client's user agent.
    pub user_agent: String,
    /// The session concerned.
    pub session_id: Option<String>,
    /// The token concerned.
    pub jti: Option<String>,
    /// A few words more.
    pub detail: String,
}

/// Which rows ListAuditEvents wants.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Rows about this user.
    pub user_id: Option<String>,
    /// Rows of this kind.
    pub kind: Option<String>,
    /// At or after (unix ms).
    pub since_ms: Option<i64>,
    /// Before (unix ms).
    pub until_ms: Option<i64>,
}

/// The widths of `audit_events`' text columns, as the MySQL migration declares them
/// (a unit test keeps the two in step). MySQL counts characters and SQLite nothing, so a
/// value cut to this many bytes fits both. Every value is cut here, in [`AuditStore::insert`],
/// and nowhere else: one over-long value would fail its whole batched statement.
mod width {
    pub const KIND: usize = 32;
    pub const USER_ID: usize = 36;
    pub const USERNAME_HASH: usize = 64;
    pub const CLIENT_IP: usize = 64;
    pub const USER_AGENT: usize = super::MAX_USER_AGENT_BYTES;
    pub const SESSION_ID: usize = 64;
    pub const JTI: usize = 64;
    pub const DETAIL: usize = 255;
}

fn cut(value: Option<&str>, width: usize) -> Option<&str> {
    value.map(|v| truncate(v, width))
}

/// Rows inserted at most per statement.
pub const MAX_BATCH: usize = 200;

/// Rows deleted at most per statement when purging, so no delete holds locks long.
const PURGE_BATCH: i64 = 10_000;

/// The `audit_events` table.
#[derive(Debug, Clone)]
pub struct AuditStore {
    pool: Pool,
}

impl AuditStore {
    /// The table in the users' database.
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// Inserts up to [`MAX_BATCH`] rows in one statement, each text cut to its column's
    /// width.
    pub async fn insert(&self, rows: &[AuditRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        on_pool!(self, |pool| {
            let mut query = QueryBuilder::new(
                "INSERT INTO audit_events \
                 (at_ms, kind, user_id, username_hash, client_ip, user_agent, session_id, jti, detail) ",
            );
            query.push_values(rows, |mut row, e| {
                row.push_bind(e.at_ms)
                    .push_bind(truncate(e.kind, width::KIND))
                    .push_bind(cut(e.user_id.as_deref(), width::USER_ID))
                    .push_bind(cut(e.username_hash.as_deref(), width::USERNAME_HASH))
                    .push_bind(truncate(&e.client_ip, width::CLIENT_IP))
                    .push_bind(truncate(&e.user_agent, width::USER_AGENT))
                    .push_bind(cut(e.session_id.as_deref(), width::SESSION_ID))
                    .push_bind(cut(e.jti.as_deref(), width::JTI))
                    .push_bind(truncate(&e.detail, width::DETAIL));
            });
            query.build().execute(pool).await.map(|_| ())
        })
        .map_err(classify)
    }

    /// At most `limit` rows matching `filter`, newest first, older than the row `before`
    /// (`None`: from the newest).
    pub async fn list(
        &self,
        filter: &AuditFilter,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<StoredAuditRow>, StoreError> {
        on_pool!(self, |pool| {
            // `CAST(id AS SIGNED)`: MySQL's id is unsigned; SQLite reads SIGNED as a
            // numeric type, so both give a signed integer.
            let mut query = QueryBuilder::new(
                "SELECT CAST(id AS SIGNED) AS id, at_ms, kind, user_id, username_hash, \
                 client_ip, user_agent, session_id, jti, detail FROM audit_events WHERE 1 = 1",
            );
            if let Some(before) = before {
                query.push(" AND id < ").push_bind(before);
            }
            if let Some(user_id) = &filter.user_id {
                query.push(" AND user_id = ").push_bind(user_id);
            }
            if let Some(kind) = &filter.kind {
                query.push(" AND kind = ").push_bind(kind);
            }
            if let Some(since) = filter.since_ms {
                query.push(" AND at_ms >= ").push_bind(since);
            }
            if let Some(until) = filter.until_ms {
                query.push(" AND at_ms < ").push_bind(until);
            }
            query
                .push(" ORDER BY id DESC LIMIT ")
                .push_bind(i64::try_from(limit).unwrap_or(i64::MAX));
            query
                .build_query_as::<StoredAuditRow>()
                .fetch_all(pool)
                .await
        })
        .map_err(classify)
    }

    /// Deletes rows older than `before_ms`, a batch at a time. Returns how many.
    pub async fn purge(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut total = 0;
        loop {
            let deleted = match &self.pool {
                // MySQL allows LIMIT on DELETE but not in a subquery; SQLite the reverse.
                Pool::MySql(pool) => {
                    sqlx::query("DELETE FROM audit_events WHERE at_ms < ? LIMIT ?")
                        .bind(before_ms)
                        .bind(PURGE_BATCH)
                        .execute(pool)
                        .await
                        .map(|done| done.rows_affected())
                }
                Pool::Sqlite(pool) => sqlx::query(
                    "DELETE FROM audit_events WHERE id IN \
                     (SELECT id FROM audit_events WHERE at_ms < ? LIMIT ?)",
                )
                .bind(before_ms)
                .bind(PURGE_BATCH)
                .execute(pool)
                .await
                .map(|done| done.rows_affected()),
            }
            .map_err(classify)?;
            total += deleted;
            if deleted < u64::try_from(PURGE_BATCH).unwrap_or(u64::MAX) {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::width;

    /// The widths above are the MySQL migration's: a column widened or added there
    /// without its width here would let one long value fail a whole batch again.
    #[test]
    fn widths_match_the_mysql_migration() {
        let migration =
            include_str!("../../migrations/mysql/20261201000001_create_audit_events.sql");
        let declared = |column: &str| -> usize {
            let line = migration
                .lines()
                .map(str::trim)
                .find(|l| l.split_whitespace().next() == Some(column))
                .unwrap_or_else(|| panic!("no column {column}"));
            let (_, rest) = line.split_once('(').unwrap_or_else(|| panic!("{line}"));
            let (n, _) = rest.split_once(')').unwrap_or_else(|| panic!("{line}"));
            n.parse().unwrap_or_else(|_| panic!("{line}"))
        };
        for (column, width) in [
            ("kind", width::KIND),
            ("user_id", width::USER_ID),
            ("username_hash", width::USERNAME_HASH),
            ("client_ip", width::CLIENT_IP),
            ("user_agent", width::USER_AGENT),
            ("session_id", width::SESSION_ID),
            ("jti", width::JTI),
            ("detail", width::DETAIL),
        ] {
            assert_eq!(declared(column), width, "{column}");
        }
        let text_columns = migration.lines().filter(|l| l.contains("CHAR(")).count();
        assert_eq!(text_columns, 8, "a text column without a width here");
    }
}
