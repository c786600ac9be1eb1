-- Per-school fallback gateway, and delivery receipts.
ALTER TABLE sms_school_settings ADD COLUMN IF NOT EXISTS fallback_provider text NULL;

-- The provider's own latest status word and error code, from receipts.
ALTER TABLE sms_messages ADD COLUMN IF NOT EXISTS provider_status text NULL;
ALTER TABLE sms_messages ADD COLUMN IF NOT EXISTS error_code text NULL;

-- Every receipt as it came: an audit trail, and receipts that arrive before the send's
-- own record (a fast carrier) wait here until the provider's id is known.
CREATE TABLE IF NOT EXISTS sms_receipts (
    id                  bigserial PRIMARY KEY,
    provider            text NOT NULL,
    provider_message_id text NOT NULL,
    provider_status     text NOT NULL,
    status              text NULL,          -- ours: sent, delivered, undelivered, failed
    error_code          text NULL,
    received_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS sms_receipts_message ON sms_receipts (provider_message_id);
