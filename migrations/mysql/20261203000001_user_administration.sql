-- Administration: roles (a comma-framed list, `,admin,ops,`, empty for none, so one
-- LIKE '%,role,%' finds a role's holders), a disabled flag that refuses logins, and a
-- flag that asks the user to change the password set by an operator. Existing users
-- keep working: no roles, enabled, no change required.
ALTER TABLE users
    ADD COLUMN roles                    VARCHAR(1024) NOT NULL DEFAULT '',
    ADD COLUMN disabled                 BOOLEAN       NOT NULL DEFAULT FALSE,
    ADD COLUMN password_change_required BOOLEAN       NOT NULL DEFAULT FALSE;
