//! Coalescing of AdminService refusals in the audit trail.
//!
//! A caller refused over and over (a plain user looping GetUser) must not flood the audit
//! queue, where real rows (`login_failed`, `lockout`) would then be dropped. Each caller —
//! a user id, or the address of a certificate caller — gets at most one `admin_denied`
//! row per [`WINDOW_SECS`]: its first refusal opens a window (and logs a line at once),
//! the refusals within the window are counted, and when the window is over one row is
//! written carrying the count (`refusals=N`) and the method and reason of the first
//! refusal. Windows are closed by a task that looks every second
//! ([`DeniedCoalescer::due`]), and the open ones are written when the service stops
//! ([`DeniedCoalescer::drain`]).
//!
//! Memory is bounded: at most `capacity` callers are tracked. A new caller past that
//! closes the oldest window early (its row is written then, with its count so far):
//! no refusal goes uncounted.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::auth::audit::AuditEvent;

/// The window within which one caller gets at most one row, in seconds.
pub const WINDOW_SECS: i64 = 60;
/// Callers tracked at most by default.
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Per-caller windows of refusals.
#[derive(Debug)]
pub struct DeniedCoalescer {
    callers: Mutex<HashMap<String, Window>>,
    capacity: usize,
}

/// A caller's open window.
#[derive(Debug, Clone)]
struct Window {
    /// When the first refusal came (unix seconds).
    opened: i64,
    /// Refusals since, the first included.
    refusals: u64,
    /// The first refusal's row, its detail without the count.
    event: AuditEvent,
    /// That detail.
    detail: String,
}

impl Window {
    /// The row this window stands for.
    fn row(self) -> AuditEvent {
        let detail = format!(
            "{}; refusals={} in {WINDOW_SECS} s from {}",
            self.detail, self.refusals, self.opened
        );
        self.event.detail(detail)
    }
}

impl DeniedCoalescer {
    /// Tracks at most `capacity` callers.
    pub fn new(capacity: usize) -> Self {
        Self {
            callers: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Window>> {
        // Every change is an insert or a remove: a panic cannot leave it unusable.
        self.callers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One refusal of `caller` at `now`, whose row would be `event` with `detail`. Rows to
    /// write at once (a window over that the task has not closed yet, or the oldest one
    /// closed early to make room); `first` is true when this refusal opened a window.
    pub fn refused(
        &self,
        caller: &str,
        now: i64,
        event: AuditEvent,
        detail: String,
    ) -> (Vec<AuditEvent>, bool) {
        let mut callers = self.lock();
        let mut rows = Vec::new();
        if let Some(window) = callers.get_mut(caller) {
            if now.saturating_sub(window.opened) < WINDOW_SECS {
                window.refusals = window.refusals.saturating_add(1);
                return (rows, false);
            }
            if let Some(over) = callers.remove(caller) {
                rows.push(over.row());
            }
        }
        if callers.len() >= self.capacity {
            let oldest = callers
                .iter()
                .min_by_key(|(_, w)| w.opened)
                .map(|(k, _)| k.clone());
            if let Some(window) = oldest.and_then(|k| callers.remove(&k)) {
                rows.push(window.row());
            }
        }
        callers.insert(
            caller.to_owned(),
            Window {
                opened: now,
                refusals: 1,
                event,
                detail,
            },
        );
        (rows, true)
    }

    /// Closes the windows that are over at `now`: their rows.
    pub fn due(&self, now: i64) -> Vec<AuditEvent> {
        let mut callers = self.lock();
        let over: Vec<String> = callers
            .iter()
            .filter(|(_, w)| now.saturating_sub(w.opened) >= WINDOW_SECS)
            .map(|(k, _)| k.clone())
            .collect();
        over.iter()
            .filter_map(|k| callers.remove(k))
            .map(Window::row)
            .collect()
    }

    /// Closes every window: their rows (at shutdown).
    pub fn drain(&self) -> Vec<AuditEvent> {
        self.lock().drain().map(|(_, w)| w.row()).collect()
    }

    /// Callers tracked now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::ClientInfo;
    use crate::auth::audit::AuditKind;

    fn refuse(c: &DeniedCoalescer, caller: &str, now: i64) -> (Vec<String>, bool) {
        let client = ClientInfo::default();
        let (rows, first) = c.refused(
            caller,
            now,
            AuditEvent::new(AuditKind::AdminDenied, &client),
            format!("GetUser: {caller}"),
        );
        (
            rows.iter().map(|r| r.detail_text().to_owned()).collect(),
            first,
        )
    }

    fn details(rows: Vec<AuditEvent>) -> Vec<String> {
        let mut d: Vec<String> = rows.iter().map(|r| r.detail_text().to_owned()).collect();
        d.sort();
        d
    }

    #[test]
    fn one_row_per_caller_per_window_carrying_the_count() {
        let c = DeniedCoalescer::new(10);
        assert_eq!(refuse(&c, "u", 1000), (vec![], true));
        for _ in 0..199 {
            assert_eq!(refuse(&c, "u", 1030), (vec![], false));
        }
        assert_eq!(refuse(&c, "v", 1030), (vec![], true));
        assert!(c.due(1059).is_empty());
        assert_eq!(
            details(c.due(1060)),
            ["GetUser: u; refusals=200 in 60 s from 1000"]
        );
        // A window over that the task has not closed yet is written by the next refusal.
        assert_eq!(
            refuse(&c, "v", 1095),
            (
                vec!["GetUser: v; refusals=1 in 60 s from 1030".to_owned()],
                true
            )
        );
        assert_eq!(
            details(c.drain()),
            ["GetUser: v; refusals=1 in 60 s from 1095"]
        );
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn a_full_table_closes_the_oldest_window_early() {
        let c = DeniedCoalescer::new(2);
        refuse(&c, "a", 0);
        refuse(&c, "a", 1);
        refuse(&c, "b", 5);
        assert_eq!(
            refuse(&c, "c", 6),
            (
                vec!["GetUser: a; refusals=2 in 60 s from 0".to_owned()],
                true
            )
        );
        assert_eq!(c.len(), 2);
        for i in 0..10_000 {
            refuse(&c, &format!("x{i}"), 7);
        }
        assert_eq!(c.len(), 2);
    }
}
