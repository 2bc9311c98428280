-- The audit trail (embedded mode). Same columns and meaning as migrations/mysql.
CREATE TABLE IF NOT EXISTS audit_events (
    id            INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    at_ms         INTEGER NOT NULL,
    kind          TEXT    NOT NULL,
    user_id       TEXT    NULL,
    username_hash TEXT    NULL,
    client_ip     TEXT    NOT NULL,
    user_agent    TEXT    NOT NULL,
    session_id    TEXT    NULL,
    jti           TEXT    NULL,
    detail        TEXT    NOT NULL
);

CREATE INDEX IF NOT EXISTS audit_events_at ON audit_events (at_ms);
CREATE INDEX IF NOT EXISTS audit_events_user ON audit_events (user_id, at_ms);
CREATE INDEX IF NOT EXISTS audit_events_username ON audit_events (username_hash, at_ms);
