//! The second factor's rows (`totp_credentials`, `recovery_codes`): part of the users
//! store, on the same pool. Every acceptance is one conditional write, so of two calls
//! presenting the same code at once exactly one wins.

use super::{UserStore, classify};
use crate::store::StoreError;

/// A user's TOTP credential, as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TotpCredential {
    /// The secret, sealed (see `auth::totp::SecretBox`).
    pub secret_sealed: String,
    /// Always `SHA1` today.
    pub algorithm: String,
    /// Digits per code.
    pub digits: i64,
    /// Seconds per step.
    pub period_seconds: i64,
    /// Steps of skew accepted either side.
    pub skew_steps: i64,
    /// The last step whose code was accepted (0: none).
    pub last_step: i64,
    /// When ConfirmTotp activated it; `None` while pending.
    pub confirmed_at: Option<i64>,
}

/// A new credential, pending until confirmed.
#[derive(Debug, Clone)]
pub struct NewTotp<'a> {
    /// Owner.
    pub user_id: &'a str,
    /// The sealed secret.
    pub secret_sealed: &'a str,
    /// Digits per code.
    pub digits: i64,
    /// Seconds per step.
    pub period_seconds: i64,
    /// Steps of skew.
    pub skew_steps: i64,
    /// Now (unix seconds).
    pub now: i64,
}

/// What ListSessions tells about the recovery codes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryStatus {
    /// Unused codes left.
    pub remaining: u32,
    /// The latest use: when (unix seconds) and from which address.
    pub last_used: Option<(i64, String)>,
}

impl UserStore {
    /// The user's TOTP credential, confirmed or pending.
    pub async fn totp_credential(
        &self,
        user_id: &str,
    ) -> Result<Option<TotpCredential>, StoreError> {
        let select = async {
            on_pool!(self, |pool| sqlx::query_as::<_, TotpCredential>(
                "SELECT secret_sealed, algorithm, CAST(digits AS SIGNED) AS digits, \
                 CAST(period_seconds AS SIGNED) AS period_seconds, \
                 CAST(skew_steps AS SIGNED) AS skew_steps, last_step, confirmed_at \
                 FROM totp_credentials WHERE user_id = ?"
            )
            .bind(user_id)
            .fetch_optional(pool)
            .await)
        };
        self.within(select, std::convert::identity)
            .await
            .map_err(classify)
    }

    /// How many users have a TOTP credential (confirmed or pending): at start-up, to
    /// refuse running without the key that opens them.
    pub async fn count_totp_credentials(&self) -> Result<i64, StoreError> {
        let select = async {
            on_pool!(self, |pool| sqlx::query_scalar::<_, i64>(
                "SELECT COUNT(*) FROM totp_credentials"
            )
            .fetch_one(pool)
            .await)
        };
        self.within(select, std::convert::identity)
            .await
            .map_err(classify)
    }

    /// One stored credential's owner and sealed secret (any one), or `None` when there
    /// is none: at start-up, to check that the configured key opens what is stored.
    pub async fn any_sealed_totp_secret(&self) -> Result<Option<(String, String)>, StoreError> {
        let select = async {
            on_pool!(self, |pool| sqlx::query_as::<_, (String, String)>(
                "SELECT user_id, secret_sealed FROM totp_credentials LIMIT 1"
            )
            .fetch_optional(pool)
            .await)
        };
        self.within(select, std::convert::identity)
            .await
            .map_err(classify)
    }

    /// Stores a pending credential in place of any pending one. False when the user
    /// has a confirmed credential (which is kept).
    pub async fn begin_totp(&self, t: &NewTotp<'_>) -> Result<bool, StoreError> {
        let begin = async {
            on_pool!(self, |pool| {
                let mut tx = pool.begin().await?;
                sqlx::query(
                    "DELETE FROM totp_credentials WHERE user_id = ? AND confirmed_at IS NULL",
                )
                .bind(t.user_id)
                .execute(&mut *tx)
                .await?;
                let inserted = sqlx::query(
                    "INSERT INTO totp_credentials (user_id, secret_sealed, algorithm, digits, \
                     period_seconds, skew_steps, last_step, created_at, confirmed_at) \
                     VALUES (?, ?, 'SHA1', ?, ?, ?, 0, ?, NULL)",
                )
                .bind(t.user_id)
                .bind(t.secret_sealed)
                .bind(t.digits)
                .bind(t.period_seconds)
                .bind(t.skew_steps)
                .bind(t.now)
                .execute(&mut *tx)
                .await;
                match inserted {
                    Ok(_) => {
                        tx.commit().await?;
                        Ok(true)
                    }
                    Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                        tx.rollback().await?;
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            })
        };
        self.within(begin, std::convert::identity)
            .await
            .map_err(classify)
    }

    /// Activates the pending credential whose sealed secret is `secret_sealed`,
    /// recording `step` as used, and replaces the recovery codes with `code_hashes`, in
    /// one transaction. False when that enrolment is not pending any more (confirmed,
    /// replaced by a newer EnrollTotp, or the step is not past the last one).
    pub async fn confirm_totp(
        &self,
        user_id: &str,
        secret_sealed: &str,
        step: i64,
        now: i64,
        code_hashes: &[String],
    ) -> Result<bool, StoreError> {
        let confirm = async {
            on_pool!(self, |pool| {
                let mut tx = pool.begin().await?;
                let done = sqlx::query(
                    "UPDATE totp_credentials SET confirmed_at = ?, last_step = ? \
                     WHERE user_id = ? AND secret_sealed = ? AND confirmed_at IS NULL \
                     AND last_step < ?",
                )
                .bind(now)
                .bind(step)
                .bind(user_id)
                .bind(secret_sealed)
                .bind(step)
                .execute(&mut *tx)
                .await?;
                if done.rows_affected() != 1 {
                    tx.rollback().await?;
                    return Ok(false);
                }
                sqlx::query("DELETE FROM recovery_codes WHERE user_id = ?")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                for hash in code_hashes {
                    sqlx::query("INSERT INTO recovery_codes (user_id, code_hash) VALUES (?, ?)")
                        .bind(user_id)
                        .bind(hash)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await?;
                Ok(true)
            })
        };
        self.within(confirm, std::convert::identity)
            .await
            .map_err(classify)
    }

    /// Accepts a code of `step` for the user's confirmed credential: moves `last_step`
    /// to it if it is later (compare-and-set). False when it is not: the code, or a
    /// later one, was already used.
    pub async fn accept_totp_step(&self, user_id: &str, step: i64) -> Result<bool, StoreError> {
        let update = async {
            on_pool!(self, |pool| sqlx::query(
                "UPDATE totp_credentials SET last_step = ? \
                 WHERE user_id = ? AND confirmed_at IS NOT NULL AND last_step < ?"
            )
            .bind(step)
            .bind(user_id)
            .bind(step)
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

    /// Marks an unused recovery code used, with when and from where. False when there
    /// is no such unused code.
    pub async fn use_recovery_code(
        &self,
        user_id: &str,
        code_hash: &str,
        now: i64,
        ip: &str,
    ) -> Result<bool, StoreError> {
        let update = async {
            on_pool!(self, |pool| sqlx::query(
                "UPDATE recovery_codes SET used_at = ?, used_ip = ? \
                 WHERE user_id = ? AND code_hash = ? AND used_at IS NULL"
            )
            .bind(now)
            .bind(ip)
            .bind(user_id)
            .bind(code_hash)
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

    /// Replaces the user's recovery codes with `code_hashes`, in one transaction.
    pub async fn replace_recovery_codes(
        &self,
        user_id: &str,
        code_hashes: &[String],
    ) -> Result<(), StoreError> {
        let replace = async {
            on_pool!(self, |pool| {
                let mut tx = pool.begin().await?;
                sqlx::query("DELETE FROM recovery_codes WHERE user_id = ?")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                for hash in code_hashes {
                    sqlx::query("INSERT INTO recovery_codes (user_id, code_hash) VALUES (?, ?)")
                        .bind(user_id)
                        .bind(hash)
                        .execute(&mut *tx)
                        .await?;
                }
                tx.commit().await
            })
        };
        self.within(replace, std::convert::identity)
            .await
            .map_err(classify)
    }

    /// Removes the user's TOTP credential (confirmed or pending) and recovery codes.
    /// True when a confirmed credential was removed.
    pub async fn remove_second_factor(&self, user_id: &str) -> Result<bool, StoreError> {
        let remove = async {
            on_pool!(self, |pool| {
                let mut tx = pool.begin().await?;
                let confirmed = sqlx::query(
                    "DELETE FROM totp_credentials WHERE user_id = ? AND confirmed_at IS NOT NULL",
                )
                .bind(user_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                sqlx::query("DELETE FROM totp_credentials WHERE user_id = ?")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("DELETE FROM recovery_codes WHERE user_id = ?")
                    .bind(user_id)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(confirmed == 1)
            })
        };
        self.within(remove, std::convert::identity)
            .await
            .map_err(classify)
    }

    /// How many recovery codes are left, and the latest use.
    pub async fn recovery_status(&self, user_id: &str) -> Result<RecoveryStatus, StoreError> {
        let select = async {
            on_pool!(self, |pool| sqlx::query_as::<
                _,
                (Option<i64>, Option<String>),
            >(
                "SELECT used_at, used_ip FROM recovery_codes WHERE user_id = ?"
            )
            .bind(user_id)
            .fetch_all(pool)
            .await)
        };
        let rows = self
            .within(select, std::convert::identity)
            .await
            .map_err(classify)?;
        let mut status = RecoveryStatus::default();
        for (used_at, used_ip) in rows {
            match used_at {
                None => status.remaining += 1,
                Some(at) if status.last_used.as_ref().is_none_or(|(t, _)| at > *t) => {
                    status.last_used = Some((at, used_ip.unwrap_or_default()));
                }
                Some(_) => {}
            }
        }
        Ok(status)
    }
}
