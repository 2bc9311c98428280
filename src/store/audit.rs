//! The audit trail's table, `audit_events`, next to the users (MySQL or SQLite).

use sqlx::QueryBuilder;

use super::StoreError;
use super::users::{Pool, classify};

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

    /// Inserts up to [`MAX_BATCH`] rows in one statement.
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
                    .push_bind(e.kind)
                    .push_bind(e.user_id.as_deref())
                    .push_bind(e.username_hash.as_deref())
                    .push_bind(e.client_ip.as_str())
                    .push_bind(e.user_agent.as_str())
                    .push_bind(e.session_id.as_deref())
                    .push_bind(e.jti.as_deref())
                    .push_bind(e.detail.as_str());
            });
            query.build().execute(pool).await.map(|_| ())
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
