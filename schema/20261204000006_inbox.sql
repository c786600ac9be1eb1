-- The development inbox (contract section 10): what the inbox provider shows of each
-- message the daemon handled, beside the message log.
--
-- The log (sms_messages) already has the status, reason, segments, type and school. The
-- inbox keeps what the log does not: the body as it was handled (the log empties a login
-- code's body once it has an outcome, and the web app's end-to-end tests must read the
-- code) and the sender ID that applied. Emptying the inbox deletes these rows and leaves
-- the log alone, so `smsgw status`, usage figures and support see what they saw.
--
-- Only a daemon whose provider is the inbox writes here, and production refuses that
-- provider: in production the table stays empty. Rows go after SMSGW_BODY_RETENTION (or
-- SMSGW_LOG_RETENTION, if shorter), like the bodies they copy.
CREATE TABLE IF NOT EXISTS sms_inbox (
    -- No foreign key: the copy is written when the message is handled, which may be a
    -- moment before its log row. The inbox shows a copy once its row is there.
    message_id uuid PRIMARY KEY,
    body       text NOT NULL,
    -- The school's sender ID; null when the provider's default sender applies.
    sender     text NULL,
    kept_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS sms_inbox_kept_at ON sms_inbox (kept_at);
