-- Users of authd. Usernames are stored lower-case, so the unique key makes them
-- unique case-insensitively. sessions_valid_after (unix seconds) is bumped by a
-- password change: tokens issued before it are refused when the session store
-- cannot be asked.
CREATE TABLE IF NOT EXISTS users (
    id                   CHAR(36)     NOT NULL,
    username             VARCHAR(32)  NOT NULL,
    password_hash        VARCHAR(255) NOT NULL,
    sessions_valid_after BIGINT       NOT NULL DEFAULT 0,
    created_at           DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at           DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    PRIMARY KEY (id),
    UNIQUE KEY users_username (username)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
