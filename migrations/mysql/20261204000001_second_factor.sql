-- The second factor (TOTP) and its recovery codes. Existing users have neither and log
-- in as before.
--
-- totp_credentials: one per user. The secret is AES-256-GCM sealed under
-- TOTP_ENCRYPTION_KEY (base64 of nonce || ciphertext || tag, the user id as associated
-- data). The parameters are stored with it, so a later default cannot break it.
-- last_step is the last 30 s step whose code was accepted: a code is accepted only by
-- the UPDATE that moves it forward (compare-and-set), so no code counts twice.
-- confirmed_at is NULL while the enrolment waits for ConfirmTotp: it does not change
-- how the user logs in.
CREATE TABLE IF NOT EXISTS totp_credentials (
    user_id          CHAR(36)     NOT NULL,
    secret_sealed    VARCHAR(255) NOT NULL,
    algorithm        VARCHAR(16)  NOT NULL,
    digits           INT          NOT NULL,
    period_seconds   INT          NOT NULL,
    skew_steps       INT          NOT NULL,
    last_step        BIGINT       NOT NULL DEFAULT 0,
    created_at       BIGINT       NOT NULL,
    confirmed_at     BIGINT       NULL,
    PRIMARY KEY (user_id),
    CONSTRAINT totp_credentials_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- recovery_codes: SHA-256 (hex) of user id and code; a used code keeps its row, marked
-- with when and from which address.
CREATE TABLE IF NOT EXISTS recovery_codes (
    user_id    CHAR(36)    NOT NULL,
    code_hash  CHAR(64)    NOT NULL,
    used_at    BIGINT      NULL,
    used_ip    VARCHAR(64) NULL,
    PRIMARY KEY (user_id, code_hash),
    CONSTRAINT recovery_codes_user FOREIGN KEY (user_id) REFERENCES users (id) ON DELETE CASCADE
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
