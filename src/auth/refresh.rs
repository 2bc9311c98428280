//! Refresh tokens (docs/design.md §10): opaque, self-locating and MAC'd, rotated on
//! every use, with the session as the token family.
//!
//! A token reads `rt1.<user_id>.<session_id>.<generation>.<secret>.<tag>`:
//! - `secret` is 256 bits: random for generation 0 (Login), and for every later
//!   generation HMAC(k, "next" ‖ predecessor), so the successor of a token is a
//!   function of the token and the session's key `k`. Concurrent Refresh calls with
//!   one token, and a replay within the grace window, all compute the same successor
//!   without it ever being stored;
//! - `tag` is HMAC(k, everything before it), cut to 128 bits, where `k` is a random
//!   256-bit key of the session, kept in the session store. A token whose tag does not
//!   hold was not made by authd for this session: it is refused and changes nothing, so
//!   knowing a session id (every access token carries one) is not enough to end it.
//!
//! The store keeps only SHA-256 hashes of the current and the previous token, never a
//! token. Nothing here is ever logged or shown by `Debug`.

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use crate::store::sessions::RefreshState;

/// The longest refresh token accepted, in bytes: a well-formed one is about 180.
pub const MAX_REFRESH_TOKEN_BYTES: usize = 512;

/// The version prefix of the format above.
const PREFIX: &str = "rt1";
/// The longest user or session id a token may name, in bytes.
const MAX_ID_BYTES: usize = 64;
/// Bytes of the tag kept.
const TAG_BYTES: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// A session's refresh key `k`: 256 random bits.
#[derive(Clone, PartialEq, Eq)]
pub struct RefreshKey([u8; 32]);

impl std::fmt::Debug for RefreshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefreshKey(..)")
    }
}

/// A refresh token as read, before anything is known about it but its shape.
#[derive(Clone, PartialEq, Eq)]
pub struct Presented<'a> {
    text: &'a str,
    /// The user it claims to belong to.
    pub user_id: &'a str,
    /// The session it claims to belong to.
    pub session_id: &'a str,
    /// Its place in the session's chain: 0 from Login, one more per rotation.
    pub generation: u64,
    /// Everything the tag covers.
    body: &'a str,
    tag: [u8; TAG_BYTES],
}

impl std::fmt::Debug for Presented<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presented")
            .field("user_id", &self.user_id)
            .field("session_id", &self.session_id)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Reads a token's shape; `None` for anything that is not one of ours in shape.
pub fn parse(text: &str) -> Option<Presented<'_>> {
    if text.len() > MAX_REFRESH_TOKEN_BYTES {
        return None;
    }
    let (body, tag) = text.rsplit_once('.')?;
    let mut parts = body.split('.');
    let (prefix, user_id, session_id, generation, secret) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if parts.next().is_some() || prefix != PREFIX {
        return None;
    }
    let id_ok = |id: &str| {
        !id.is_empty()
            && id.len() <= MAX_ID_BYTES
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if !id_ok(user_id) || !id_ok(session_id) {
        return None;
    }
    // One spelling per number: no sign, no leading zero.
    if generation.is_empty()
        || generation.len() > 20
        || (generation.len() > 1 && generation.starts_with('0'))
        || !generation.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let generation = generation.parse().ok()?;
    if secret.len() != 64
        || !secret
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let tag = from_hex::<TAG_BYTES>(tag)?;
    Some(Presented {
        text,
        user_id,
        session_id,
        generation,
        body,
        tag,
    })
}

impl Presented<'_> {
    /// The token itself.
    pub fn text(&self) -> &str {
        self.text
    }
}

impl RefreshKey {
    /// A new random key, for a new session.
    pub fn generate() -> Self {
        Self(rand::random())
    }

    /// The key as stored (64 hex digits); `None` for anything else.
    pub fn from_hex(s: &str) -> Option<Self> {
        from_hex::<32>(s).map(Self)
    }

    /// 64 hex digits, as stored.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    fn mac(&self, label: &[u8], data: &[u8]) -> [u8; 32] {
        // HMAC takes keys of any length: `new_from_slice` cannot fail on 32 bytes.
        let Ok(mac) = HmacSha256::new_from_slice(&self.0) else {
            return [0; 32];
        };
        mac.chain_update(label)
            .chain_update(data)
            .finalize()
            .into_bytes()
            .into()
    }

    fn token(&self, user_id: &str, session_id: &str, generation: u64, secret: &[u8]) -> String {
        let body = format!(
            "{PREFIX}.{user_id}.{session_id}.{generation}.{}",
            hex(secret)
        );
        let tag = self.mac(b"authd-refresh-tag:", body.as_bytes());
        format!("{body}.{}", hex(&tag[..TAG_BYTES]))
    }

    /// Generation 0 of a session's chain, with a fresh random secret.
    pub fn first(&self, user_id: &str, session_id: &str) -> String {
        let secret: [u8; 32] = rand::random();
        self.token(user_id, session_id, 0, &secret)
    }

    /// Whether `presented` was made with this key (in constant time).
    pub fn made(&self, presented: &Presented<'_>) -> bool {
        let Ok(mac) = HmacSha256::new_from_slice(&self.0) else {
            return false;
        };
        mac.chain_update(b"authd-refresh-tag:")
            .chain_update(presented.body.as_bytes())
            .verify_truncated_left(&presented.tag)
            .is_ok()
    }

    /// The one successor of `presented`: the same for every caller that computes it.
    pub fn successor(&self, presented: &Presented<'_>) -> String {
        let secret = self.mac(b"authd-refresh-next:", presented.text.as_bytes());
        self.token(
            presented.user_id,
            presented.session_id,
            presented.generation.saturating_add(1),
            &secret,
        )
    }

    /// The `jti` of the access token issued with refresh token `token` (32 hex digits,
    /// like a random one): every caller that gets `token` gets an access token with this
    /// `jti`, which the session holds.
    pub fn access_jti(&self, token: &str) -> String {
        hex(&self.mac(b"authd-refresh-jti:", token.as_bytes())[..16])
    }
}

/// What the store keeps of a token: 64 hex digits of its SHA-256.
pub fn token_hash(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// How long after a rotation, by the judging instance's clock, the previous token is
/// still taken for a call that overlapped it, whatever `REFRESH_REUSE_GRACE` says (even
/// 0): rotation times are whole seconds, so two calls sent at once may be judged a
/// second apart, and instances' clocks differ by a little more. A thief this close
/// behind the owner cannot be told from the owner's own parallel call (docs/design.md
/// §10).
pub const RACE_WINDOW: i64 = 2;

/// What a presented token is, judged against its session's state.
#[derive(Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The current token: rotate to `successor` (generation `generation`).
    Rotate {
        /// The new token.
        successor: String,
    },
    /// The previous token, within the grace window, or the loser of a concurrent
    /// rotation: answer the current token again.
    Replay {
        /// The current token, the presented one's successor.
        successor: String,
    },
    /// An older token of the chain (or the previous one past the grace): theft.
    Reused,
    /// Not one of this session's tokens, or the session is over: refused, nothing
    /// changes.
    Invalid,
}

impl std::fmt::Debug for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The successor is a live refresh token: never printed.
        f.write_str(match self {
            Self::Rotate { .. } => "Rotate { .. }",
            Self::Replay { .. } => "Replay { .. }",
            Self::Reused => "Reused",
            Self::Invalid => "Invalid",
        })
    }
}

/// How a presented token came to be judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Read once: nothing else is known about when it was presented.
    First,
    /// This very call read the token as the session's current one, and then lost its
    /// compare-and-set: another call rotated the session between the two, so the
    /// rotation it now finds happened while this call was under way. Clocks play no
    /// part in that.
    LostRace,
}

/// Judges `presented` against its session (`None`: no such session, or one without a
/// refresh key) at `now`, with `grace` seconds of forgiveness for the previous token.
///
/// The previous token gets its successor again (`Replay`) only when the session's
/// current token is exactly that successor (one rotation on, made from this token), and
/// the rotation overlapped this call: this call lost the race to it (`Seen::LostRace`,
/// whatever the clocks say), or it happened at most max(`grace`, [`RACE_WINDOW`])
/// seconds ago by this instance's clock. Anything older is reuse.
pub fn judge(
    presented: &Presented<'_>,
    state: Option<&RefreshState>,
    now: i64,
    grace: i64,
    seen: Seen,
) -> Verdict {
    let Some(state) = state else {
        return Verdict::Invalid;
    };
    let Some(key) = RefreshKey::from_hex(&state.key) else {
        return Verdict::Invalid;
    };
    if !key.made(presented) || now >= state.ends_at || now >= state.idle_expires_at {
        return Verdict::Invalid;
    }
    let hash = token_hash(presented.text);
    if hash == state.current {
        return Verdict::Rotate {
            successor: key.successor(presented),
        };
    }
    let overlapped =
        seen == Seen::LostRace || now.saturating_sub(state.rotated_at) <= grace.max(RACE_WINDOW);
    if state.previous.as_deref() == Some(hash.as_str()) && overlapped {
        let successor = key.successor(presented);
        if token_hash(&successor) == state.current {
            return Verdict::Replay { successor };
        }
    }
    if presented.generation < state.generation {
        return Verdict::Reused;
    }
    Verdict::Invalid
}

/// Whether `presented` was made by authd for a session that is still live: its tag
/// holds under the session's key. Such a token cannot be a guess (a 128-bit tag under a
/// 256-bit key), so it is never throttled or counted as one, whatever its generation.
pub fn genuine(presented: &Presented<'_>, state: Option<&RefreshState>, now: i64) -> bool {
    state.is_some_and(|state| {
        now < state.ends_at
            && now < state.idle_expires_at
            && RefreshKey::from_hex(&state.key).is_some_and(|key| key.made(presented))
    })
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let bytes = s.as_bytes();
    if bytes.len() != N * 2 {
        return None;
    }
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(key: &RefreshKey, current: &str) -> RefreshState {
        RefreshState {
            key: key.to_hex(),
            current: token_hash(current),
            previous: None,
            generation: 0,
            rotated_at: 1000,
            ends_at: 10_000,
            idle_expires_at: 5000,
            login_time: 1000,
            username: "alice".into(),
            amr: "pwd".into(),
        }
    }

    #[test]
    fn a_first_token_parses_and_is_recognised_by_its_key_only() {
        let k = RefreshKey::generate();
        let t = k.first("u-1", "s1");
        let p = parse(&t).unwrap();
        assert_eq!((p.user_id, p.session_id, p.generation), ("u-1", "s1", 0));
        assert!(k.made(&p));
        assert!(!RefreshKey::generate().made(&p));
        assert_eq!(RefreshKey::from_hex(&k.to_hex()), Some(k));
    }

    #[test]
    fn the_successor_is_deterministic_and_one_generation_on() {
        let k = RefreshKey::generate();
        let t = k.first("u", "s");
        let p = parse(&t).unwrap();
        let next = k.successor(&p);
        assert_eq!(next, k.successor(&p));
        let n = parse(&next).unwrap();
        assert_eq!(n.generation, 1);
        assert!(k.made(&n));
        assert_ne!(k.access_jti(&t), k.access_jti(&next));
        assert_eq!(k.access_jti(&next).len(), 32);
    }

    #[test]
    fn any_changed_byte_breaks_the_tag_or_the_shape() {
        let k = RefreshKey::generate();
        let t = k.first("u", "s");
        for i in 0..t.len() {
            let mut b = t.clone().into_bytes();
            b[i] = if b[i] == b'1' { b'2' } else { b'1' };
            let Ok(changed) = String::from_utf8(b) else {
                continue;
            };
            if let Some(p) = parse(&changed) {
                assert!(!k.made(&p), "byte {i}");
            }
        }
    }

    #[test]
    fn garbage_is_not_a_token() {
        for bad in [
            "",
            "rt1",
            "rt1.u.s.0.00.00",
            "rt2.u.s.0.".to_string().as_str(),
            &format!("rt1.u.s.01.{}.{}", "a".repeat(64), "b".repeat(32)),
            &format!("rt1.u}}.s.1.{}.{}", "a".repeat(64), "b".repeat(32)),
            &format!("rt1.u.s.1.{}.{}", "A".repeat(64), "b".repeat(32)),
            &format!("rt1.u.s.1.{}.{}.x", "a".repeat(64), "b".repeat(32)),
            &"x".repeat(MAX_REFRESH_TOKEN_BYTES + 1),
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
        assert!(parse(&format!("rt1.u.s.1.{}.{}", "a".repeat(64), "b".repeat(32))).is_some());
    }

    #[test]
    fn judged_current_previous_in_and_out_of_grace_older_and_forged() {
        let k = RefreshKey::generate();
        let t0 = k.first("u", "s");
        let p0 = parse(&t0).unwrap();
        let mut s = state(&k, &t0);
        let Verdict::Rotate { successor: t1 } = judge(&p0, Some(&s), 1000, 30, Seen::First) else {
            panic!("current token not rotated");
        };
        // After the rotation at 1100: t1 current, t0 previous.
        s.previous = Some(s.current.clone());
        s.current = token_hash(&t1);
        s.generation = 1;
        s.rotated_at = 1100;
        assert_eq!(
            judge(&p0, Some(&s), 1130, 30, Seen::First),
            Verdict::Replay {
                successor: t1.clone()
            }
        );
        assert_eq!(judge(&p0, Some(&s), 1131, 30, Seen::First), Verdict::Reused);
        let p1 = parse(&t1).unwrap();
        let t2 = k.successor(&p1);
        s.previous = Some(s.current.clone());
        s.current = token_hash(&t2);
        s.generation = 2;
        // t0 is two behind: reuse even inside the window.
        assert_eq!(judge(&p0, Some(&s), 1101, 30, Seen::First), Verdict::Reused);
        // A token of the right session but another key: forged, nothing happens.
        let forged = RefreshKey::generate().first("u", "s");
        assert_eq!(
            judge(&parse(&forged).unwrap(), Some(&s), 1101, 30, Seen::First),
            Verdict::Invalid
        );
        // No session, or one past its end.
        assert_eq!(judge(&p1, None, 1101, 30, Seen::First), Verdict::Invalid);
        assert_eq!(
            judge(&p1, Some(&s), 5000, 30, Seen::First),
            Verdict::Invalid
        );
    }

    /// The state once `t0` was rotated to its successor at 1100.
    fn rotated(k: &RefreshKey, t0: &str) -> (RefreshState, String) {
        let t1 = k.successor(&parse(t0).unwrap());
        let mut s = state(k, &t1);
        s.previous = Some(token_hash(t0));
        s.generation = 1;
        s.rotated_at = 1100;
        (s, t1)
    }

    #[test]
    fn the_loser_of_a_race_replays_whatever_the_grace_and_the_clock_say() {
        let k = RefreshKey::generate();
        let t0 = k.first("u", "s");
        let p0 = parse(&t0).unwrap();
        let (s, t1) = rotated(&k, &t0);
        // With no grace, on an instance whose clock is a minute ahead: a call that saw
        // t0 as current and lost the compare-and-set overlapped the rotation.
        for grace in [0, 30] {
            assert_eq!(
                judge(&p0, Some(&s), 1160, grace, Seen::LostRace),
                Verdict::Replay {
                    successor: t1.clone()
                }
            );
            // The same token read first a minute on is a replay after the fact: reuse.
            assert_eq!(
                judge(&p0, Some(&s), 1160, grace, Seen::First),
                Verdict::Reused
            );
        }
        // Two rotations on, even a lost race is no excuse: t0 is not the previous token.
        let t2 = k.successor(&parse(&t1).unwrap());
        let mut s2 = state(&k, &t2);
        s2.previous = Some(token_hash(&t1));
        s2.generation = 2;
        s2.rotated_at = 1100;
        assert_eq!(
            judge(&p0, Some(&s2), 1100, 30, Seen::LostRace),
            Verdict::Reused
        );
    }

    #[test]
    fn with_no_grace_the_race_window_still_forgives_a_call_judged_a_moment_on() {
        let k = RefreshKey::generate();
        let t0 = k.first("u", "s");
        let p0 = parse(&t0).unwrap();
        let (s, t1) = rotated(&k, &t0);
        // The rotation's own second, the next ones (second rounding, a clock a little
        // ahead), and a clock behind.
        for now in [1090, 1100, 1101, 1100 + RACE_WINDOW] {
            assert_eq!(
                judge(&p0, Some(&s), now, 0, Seen::First),
                Verdict::Replay {
                    successor: t1.clone()
                },
                "{now}"
            );
        }
        assert_eq!(
            judge(&p0, Some(&s), 1101 + RACE_WINDOW, 0, Seen::First),
            Verdict::Reused
        );
    }

    #[test]
    fn a_verdict_never_shows_its_token() {
        let k = RefreshKey::generate();
        let t = k.first("u", "s");
        let successor = k.successor(&parse(&t).unwrap());
        let secret = successor.split('.').nth(4).unwrap();
        for v in [
            Verdict::Rotate {
                successor: successor.clone(),
            },
            Verdict::Replay {
                successor: successor.clone(),
            },
        ] {
            let shown = format!("{v:?} {v:#?}");
            assert!(!shown.contains(secret), "{shown}");
            assert!(!shown.contains(&successor), "{shown}");
        }
    }
}
