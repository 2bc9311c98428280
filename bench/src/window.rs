//! The revocation window of issue #21: how long after Logout is acknowledged on one
//! instance (A) another instance (B) still answers ValidateToken with valid=true.
//!
//! Per trial: a fresh session (written through authd's library, `Preparer`), two
//! ValidateTokens on B (with SESSION_CACHE=on the second is a cache hit), Logout on A;
//! from the moment A's reply arrives, ValidateToken on B back to back until it answers
//! valid=false. The window is the time from A's acknowledgement to the arrival of B's
//! first refusal: it includes that one call's round trip, so it is an upper bound.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use authd::proto::auth::v1 as pb;
use authd::proto::auth::v1::auth_service_client::AuthServiceClient;
use hdrhistogram::Histogram;
use tonic::transport::Channel;

use crate::{Preparer, bearer, code_label};

/// Past this, a trial counts as never refused and the next one starts.
const GIVE_UP: Duration = Duration::from_secs(5);

/// The trials of one pair of instances.
pub struct Window {
    pub name: String,
    /// B runs with SESSION_CACHE=on (else: the strict control).
    pub cached: bool,
    pub trials: u64,
    /// Ack → first refusal (ns), of the trials refused within `GIVE_UP`.
    pub hist: Histogram<u64>,
    /// Trials whose very first ValidateToken after the ack was already refused.
    pub first_call_refused: u64,
    /// Trials still valid on B `GIVE_UP` after the ack.
    pub never_refused: u64,
    /// Most ValidateTokens one trial sent to B before the refusal.
    pub most_calls: u64,
    /// Anything else: a setup call that failed, a session not valid before Logout.
    pub errors: BTreeMap<String, u64>,
}

impl Window {
    pub fn micros(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn max_micros(&self) -> f64 {
        self.hist.max() as f64 / 1000.0
    }

    pub fn error_text(&self) -> String {
        crate::load::error_text(&self.errors)
    }

    fn error(&mut self, label: String) {
        *self.errors.entry(label).or_default() += 1;
    }
}

async fn validate(
    client: &mut AuthServiceClient<Channel>,
    token: &str,
) -> Result<pb::ValidateTokenResponse, String> {
    client
        .validate_token(pb::ValidateTokenRequest {
            token: token.to_owned(),
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| code_label(&s))
}

/// `trials` trials, one after the other: Logout on `a`, ValidateToken on `b`.
pub async fn measure(
    name: &str,
    cached: bool,
    preparer: &Preparer,
    user_prefix: &str,
    a: Channel,
    b: Channel,
    trials: u64,
) -> anyhow::Result<Window> {
    let mut a = AuthServiceClient::new(a);
    let mut b = AuthServiceClient::new(b);
    let mut out = Window {
        name: name.to_owned(),
        cached,
        trials,
        hist: crate::load::histogram(),
        first_call_refused: 0,
        never_refused: 0,
        most_calls: 0,
        errors: BTreeMap::new(),
    };
    let started = Instant::now();
    for trial in 0..trials {
        if trial % 100 == 0 {
            eprint!(
                "\r  window {name}: trial {trial}/{trials}, {:.1} s      ",
                started.elapsed().as_secs_f64()
            );
        }
        let token = preparer.session(&format!("{user_prefix}{trial}")).await?;
        // Twice on B: the first fills its cache, the second is served from it.
        let mut live = true;
        for _ in 0..2 {
            match validate(&mut b, &token).await {
                Ok(r) if r.valid => {}
                Ok(r) => {
                    live = false;
                    out.error(format!(
                        "INVALID_BEFORE_LOGOUT:{}",
                        pb::InvalidReason::try_from(r.reason).map_or("?", |r| r.as_str_name())
                    ));
                }
                Err(e) => {
                    live = false;
                    out.error(format!("VALIDATE_BEFORE_LOGOUT:{e}"));
                }
            }
        }
        if !live {
            continue;
        }
        if let Err(s) = a.logout(bearer(&token, pb::LogoutRequest {})?).await {
            out.error(format!("LOGOUT:{}", code_label(&s)));
            continue;
        }
        let ack = Instant::now();
        let mut calls = 0u64;
        loop {
            calls += 1;
            match validate(&mut b, &token).await {
                Ok(r) if !r.valid => {
                    let nanos = u64::try_from(ack.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    out.hist.saturating_record(nanos.max(1));
                    if calls == 1 {
                        out.first_call_refused += 1;
                    }
                    break;
                }
                Ok(_) => {}
                Err(e) => out.error(format!("VALIDATE_AFTER_LOGOUT:{e}")),
            }
            if ack.elapsed() > GIVE_UP {
                out.never_refused += 1;
                break;
            }
        }
        out.most_calls = out.most_calls.max(calls);
    }
    eprintln!(
        "\r  window {name}: {trials} trials in {:.1} s      ",
        started.elapsed().as_secs_f64()
    );
    Ok(out)
}
