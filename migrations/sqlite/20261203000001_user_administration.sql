-- Administration (embedded mode). Same columns and meaning as migrations/mysql.
ALTER TABLE users ADD COLUMN roles TEXT NOT NULL DEFAULT '';
ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN password_change_required INTEGER NOT NULL DEFAULT 0;
