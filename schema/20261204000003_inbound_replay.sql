-- Webhooks applied once. Twilio's signature carries no time, so a captured inbound START
-- could be replayed to undo an opt-out: each inbound keyword is recorded here by the
-- provider's id for the message (Twilio's MessageSid), in the same statement that changes
-- the opt-out, and an id seen before changes nothing. Vonage receipts are recorded by
-- their signature, on top of their 5-minute timestamp window. No number and no text:
-- the retention task deletes rows older than SMSGW_LOG_RETENTION.
CREATE TABLE IF NOT EXISTS sms_webhooks_seen (
    provider    text NOT NULL,              -- 'twilio' (inbound MessageSid), 'vonage' (sig)
    webhook_id  text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, webhook_id)
);
CREATE INDEX IF NOT EXISTS sms_webhooks_seen_received ON sms_webhooks_seen (received_at);

-- The configured providers whose secret signed a receipt. A receipt only touches
-- messages sent through one of them, also when it waits for the send's own record.
-- Null on receipts kept before this migration.
ALTER TABLE sms_receipts ADD COLUMN IF NOT EXISTS signed_by text[] NULL;
