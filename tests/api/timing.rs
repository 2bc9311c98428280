//! Login's response time must not tell an unknown user from a wrong or empty password
//! (each pays one bcrypt verify, padded to the costliest stored hash), whatever the cost
//! of the user's hash (an imported one may cost more or less than `BCRYPT_COST`), nor a
//! throttled account that exists from one that does not (neither pays any), nor a user
//! with a second factor from one without (a wrong password never reads the factor). Measured over a few hundred interleaved calls per class
//! and compared with robust statistics and generous bounds (P(slower) within 0.25–0.75,
//! medians within 50%), so a busy machine does not make it flaky, while a missing or
//! extra bcrypt (a 10× difference in time, P near 0 or 1) would still show.

use std::time::{Duration, Instant};

use tonic::Code;

use crate::support::*;

const ROUNDS: usize = 200;
const ACCOUNTS: usize = 20;
/// Locks an account: more failures than any account sees during the measurement
/// (2 × ROUNDS / ACCOUNTS).
const THRESHOLD: usize = 25;

/// `BCRYPT_COST`, and the costs of two sets of imported hashes: one cheaper, one
/// costlier (8 times the work: without padding a wrong password for such a user would
/// take 8 times as long as for an unknown user).
const COST: u32 = 5;
const CHEAP_COST: u32 = 4;
const COSTLY_COST: u32 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    UnknownUser,
    WrongPassword,
    EmptyPassword,
    WrongPasswordCheapHash,
    WrongPasswordCostlyHash,
    OverlongPassword,
    ThrottledKnown,
    ThrottledUnknown,
    WrongPasswordSecondFactor,
}

const CLASSES: [Class; 9] = [
    Class::UnknownUser,
    Class::WrongPassword,
    Class::EmptyPassword,
    Class::WrongPasswordCheapHash,
    Class::WrongPasswordCostlyHash,
    Class::OverlongPassword,
    Class::ThrottledKnown,
    Class::ThrottledUnknown,
    Class::WrongPasswordSecondFactor,
];

impl Class {
    fn expected(self) -> Code {
        match self {
            Class::UnknownUser
            | Class::WrongPassword
            | Class::EmptyPassword
            | Class::WrongPasswordCheapHash
            | Class::WrongPasswordCostlyHash
            | Class::WrongPasswordSecondFactor => Code::Unauthenticated,
            Class::OverlongPassword => Code::InvalidArgument,
            Class::ThrottledKnown | Class::ThrottledUnknown => Code::ResourceExhausted,
        }
    }

    fn call(self, round: usize) -> (String, String) {
        let account = format!("timer{}", round % ACCOUNTS);
        match self {
            Class::UnknownUser => (format!("ghost{}", round % ACCOUNTS), PASSWORD.into()),
            Class::WrongPassword => (account, "Wrong-Horse-9".into()),
            Class::EmptyPassword => (account, String::new()),
            Class::WrongPasswordCheapHash => {
                (format!("cheap{}", round % ACCOUNTS), "Wrong-Horse-9".into())
            }
            Class::WrongPasswordCostlyHash => (
                format!("costly{}", round % ACCOUNTS),
                "Wrong-Horse-9".into(),
            ),
            Class::OverlongPassword => (account, "x".repeat(73)),
            Class::WrongPasswordSecondFactor => {
                (format!("mfa{}", round % ACCOUNTS), "Wrong-Horse-9".into())
            }
            Class::ThrottledKnown => ("lockedknown".into(), PASSWORD.into()),
            Class::ThrottledUnknown => ("lockedghost".into(), PASSWORD.into()),
        }
    }
}

/// 0..n in an order that depends on `round` (Fisher–Yates over a xorshift generator):
/// every class is preceded by every other about equally often.
fn shuffled(n: usize, round: usize) -> Vec<usize> {
    let mut state = (round as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    order
}

fn median(xs: &[Duration]) -> Duration {
    let mut v = xs.to_vec();
    v.sort_unstable();
    v[v.len() / 2]
}

/// The probability that a call of `a` takes longer than one of `b` (ties count half):
/// the Mann–Whitney U statistic over all pairs, scaled to 0..1; 0.5 when the two
/// classes cannot be told apart.
fn superiority(a: &[Duration], b: &[Duration]) -> f64 {
    let mut wins = 0.0;
    for x in a {
        for y in b {
            wins += match x.cmp(y) {
                std::cmp::Ordering::Greater => 1.0,
                std::cmp::Ordering::Equal => 0.5,
                std::cmp::Ordering::Less => 0.0,
            };
        }
    }
    wins / (a.len() * b.len()) as f64
}

/// Inserts users `{prefix}0..` with a hash of `PASSWORD` at `cost`, as an import would.
async fn import_users(app: &TestApp, prefix: &str, cost: u32) {
    let db = app.db().await;
    let hash = bcrypt::hash(PASSWORD, cost).unwrap();
    for i in 0..ACCOUNTS {
        sqlx::query("INSERT INTO users (id, username, password_hash) VALUES (?, ?, ?)")
            .bind(format!("imported-{prefix}-{i}"))
            .bind(format!("{prefix}{i}"))
            .bind(&hash)
            .execute(&db)
            .await
            .unwrap();
    }
}

async fn measure(backend: Backend) {
    // Failures are padded to the costliest hash, cost 8 (about 15 ms on an idle core):
    // far above a no-work call (a few hundred µs) even when other tests share the two
    // cores, and 1,000 padded failures still take seconds.
    let threshold = THRESHOLD.to_string();
    let app = backend
        .app()
        .envs(&[
            ("BCRYPT_COST", &COST.to_string()),
            ("THROTTLE_ACCOUNT_THRESHOLD", &threshold),
            ("THROTTLE_ADDRESS_THRESHOLD", "1000000"),
        ])
        .spawn()
        .await;
    for i in 0..ACCOUNTS {
        app.register(&format!("timer{i}"), PASSWORD).await.unwrap();
    }
    // Users with a confirmed second factor (rows as ConfirmTotp leaves them; a wrong
    // password never opens the secret).
    let db = app.db().await;
    for i in 0..ACCOUNTS {
        let user = app.register(&format!("mfa{i}"), PASSWORD).await.unwrap();
        sqlx::query(
            "INSERT INTO totp_credentials (user_id, secret_sealed, algorithm, digits, \
             period_seconds, skew_steps, last_step, created_at, confirmed_at) \
             VALUES (?, 'v1:AAAA', 'SHA1', 6, 30, 1, 0, 0, 1)",
        )
        .bind(&user.user_id)
        .execute(&db)
        .await
        .unwrap();
    }
    import_users(&app, "cheap", CHEAP_COST).await;
    import_users(&app, "costly", COSTLY_COST).await;
    app.register("lockedknown", PASSWORD).await.unwrap();
    for name in ["lockedknown", "lockedghost"] {
        for _ in 0..THRESHOLD {
            assert_code(
                app.login(name, "Wrong-Horse-9").await,
                Code::Unauthenticated,
            );
        }
    }

    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(ROUNDS); CLASSES.len()];
    for round in 0..ROUNDS {
        // Interleaved, in a fresh order every round: a call can leave work behind (an
        // audit row, a padding timer), and a fixed order would give each class the same
        // predecessor every time, so that work would count against one class only.
        for index in shuffled(CLASSES.len(), round) {
            let class = CLASSES[index];
            let (username, password) = class.call(round);
            let started = Instant::now();
            let result = app.login(&username, &password).await;
            times[index].push(started.elapsed());
            assert_code(result, class.expected());
        }
    }

    let medians: Vec<Duration> = times.iter().map(|t| median(t)).collect();
    eprintln!("{backend:?} login medians over {ROUNDS} calls each:");
    for (class, m) in CLASSES.iter().zip(&medians) {
        eprintln!("  {class:?}: {m:?}");
    }
    let bcrypt_classes = [0, 1, 2, 3, 4, 8];
    let no_work_classes = [5, 6, 7];
    let compare = |a: usize, b: usize| {
        let p = superiority(&times[a], &times[b]);
        let (ma, mb) = (medians[a].as_secs_f64(), medians[b].as_secs_f64());
        let gap = (ma - mb).abs() / ma.max(mb);
        eprintln!(
            "  {:?} vs {:?}: P(slower) = {p:.3}, medians differ by {:.1}%",
            CLASSES[a],
            CLASSES[b],
            gap * 100.0
        );
        (p, gap)
    };
    for (i, &a) in bcrypt_classes.iter().enumerate() {
        for &b in &bcrypt_classes[i + 1..] {
            let (p, gap) = compare(a, b);
            assert!(
                (0.25..=0.75).contains(&p),
                "{:?} vs {:?}: P = {p}",
                CLASSES[a],
                CLASSES[b]
            );
            assert!(
                gap < 0.5,
                "{:?} vs {:?}: medians {gap:.2} apart",
                CLASSES[a],
                CLASSES[b]
            );
        }
    }
    // A throttled account that exists and one that does not: the same no work.
    let (p, gap) = compare(6, 7);
    assert!(
        (0.25..=0.75).contains(&p),
        "throttled known vs unknown: P = {p}"
    );
    assert!(
        gap < 0.5,
        "throttled known vs unknown: medians {gap:.2} apart"
    );
    let _ = compare(5, 6);
    // No bcrypt at all: every no-work class is well under any bcrypt class.
    let fastest_bcrypt = bcrypt_classes.iter().map(|&i| medians[i]).min().unwrap();
    for &i in &no_work_classes {
        assert!(
            medians[i] * 2 < fastest_bcrypt,
            "{:?} ({:?}) is not clearly cheaper than a bcrypt verify ({fastest_bcrypt:?})",
            CLASSES[i],
            medians[i]
        );
    }
}

#[tokio::test]
async fn login_timing_does_not_tell_failure_classes_apart_on_mysql_and_redis() {
    measure(Backend::MySqlRedis).await;
}

#[tokio::test]
async fn login_timing_does_not_tell_failure_classes_apart_embedded() {
    measure(Backend::Embedded).await;
}
