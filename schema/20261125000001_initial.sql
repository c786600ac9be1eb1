-- smsgw initial schema. Append-only: never edit a migration that has landed;
-- add a new file instead.

-- Settings, written by the web app, read by the daemon.
CREATE TABLE IF NOT EXISTS sms_school_settings (
    school_id           bigint PRIMARY KEY,
    sms_enabled         boolean NOT NULL DEFAULT false,
    country             text NULL,          -- ISO 3166 alpha-2, for national numbers
    timezone            text NULL,
    sender_id           text NULL,          -- overrides the configured default sender
    provider            text NULL,          -- a provider name from the daemon's config; null = default
    allow_confirmations boolean NOT NULL DEFAULT true,
    allow_reminders     boolean NOT NULL DEFAULT true,
    allow_changes       boolean NOT NULL DEFAULT true,  -- changes and cancellations
    allow_announcements boolean NOT NULL DEFAULT true,
    allow_login_codes   boolean NOT NULL DEFAULT true,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS sms_opt_outs (
    id          bigserial PRIMARY KEY,
    school_id   bigint NULL,                -- null = every school
    phone       text NOT NULL,              -- E.164
    source      text NOT NULL,              -- 'web', 'provider', 'inbound', ...
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- One opt-out per (phone, school); the expression lets "every school" (null) be unique too.
CREATE UNIQUE INDEX IF NOT EXISTS sms_opt_outs_phone_school
    ON sms_opt_outs (phone, (COALESCE(school_id, -1)));

-- The log, written by the daemon, read by support.
CREATE TABLE IF NOT EXISTS sms_messages (
    id                  uuid PRIMARY KEY,
    bulk_id             uuid NULL,
    school_id           bigint NOT NULL,
    type                text NOT NULL,
    recipient           text NOT NULL,      -- E.164 once normalised; as given when it could not be
    body                text NULL,          -- null once purged
    context             jsonb NULL,
    status              text NOT NULL CHECK (status IN (
                            'queued', 'sending', 'sent', 'delivered', 'undelivered',
                            'failed', 'retrying', 'suppressed', 'expired')),
    reason              text NULL,
    provider            text NULL,
    provider_message_id text NULL,
    segments            integer NULL,
    attempts            integer NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz NULL,
    delivered_at        timestamptz NULL,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS sms_messages_provider_message_id
    ON sms_messages (provider_message_id) WHERE provider_message_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS sms_messages_recipient ON sms_messages (recipient, created_at);
CREATE INDEX IF NOT EXISTS sms_messages_school ON sms_messages (school_id, created_at);
CREATE INDEX IF NOT EXISTS sms_messages_bulk ON sms_messages (bulk_id) WHERE bulk_id IS NOT NULL;

CREATE TABLE IF NOT EXISTS sms_attempts (
    message_id      uuid NOT NULL REFERENCES sms_messages (id) ON DELETE CASCADE,
    attempt         integer NOT NULL,
    provider        text NOT NULL,
    started_at      timestamptz NOT NULL,
    duration_ms     integer NULL,           -- null while the call is under way (or was cut off)
    outcome         text NULL CHECK (outcome IN ('sent', 'temporary_failure', 'permanent_failure')),
    http_status     integer NULL,
    error_code      text NULL,
    error_message   text NULL,
    PRIMARY KEY (message_id, attempt)
);
