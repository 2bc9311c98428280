-- The audit trail: one row per login success or failure, throttle, lockout, logout,
-- password change and session revocation. Never a password, token or hash of either;
-- unknown usernames appear only as a keyed hash. at_ms is unix milliseconds; rows
-- older than AUDIT_RETENTION are deleted periodically.
CREATE TABLE IF NOT EXISTS audit_events (
    id            BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    at_ms         BIGINT          NOT NULL,
    kind          VARCHAR(32)     NOT NULL,
    user_id       CHAR(36)        NULL,
    username_hash CHAR(64)        NULL,
    client_ip     VARCHAR(64)     NOT NULL,
    user_agent    VARCHAR(512)    NOT NULL,
    session_id    VARCHAR(64)     NULL,
    jti           VARCHAR(64)     NULL,
    detail        VARCHAR(255)    NOT NULL,
    PRIMARY KEY (id),
    KEY audit_events_at (at_ms),
    KEY audit_events_user (user_id, at_ms),
    KEY audit_events_username (username_hash, at_ms)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
