-- The second factor (embedded mode). Same tables and meaning as migrations/mysql.
CREATE TABLE IF NOT EXISTS totp_credentials (
    user_id          TEXT    NOT NULL PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    secret_sealed    TEXT    NOT NULL,
    algorithm        TEXT    NOT NULL,
    digits           INTEGER NOT NULL,
    period_seconds   INTEGER NOT NULL,
    skew_steps       INTEGER NOT NULL,
    last_step        INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    confirmed_at     INTEGER NULL
);

CREATE TABLE IF NOT EXISTS recovery_codes (
    user_id    TEXT    NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    code_hash  TEXT    NOT NULL,
    used_at    INTEGER NULL,
    used_ip    TEXT    NULL,
    PRIMARY KEY (user_id, code_hash)
);
