-- Replies (two-way SMS) and events that are not status changes.
--
-- The outbox (sms_events) also carries events with a payload of their own: a row with
-- `routing_key` set is published as its `payload`, verbatim, under that key, with
-- `event_id` as the message id. It is written in the transaction of the change it
-- reports, like a status event, and relayed in the same order and with the same
-- guarantees. Status events leave the new columns null; their own columns are null on
-- the others.
ALTER TABLE sms_events
    ALTER COLUMN message_id DROP NOT NULL,
    ALTER COLUMN seq DROP NOT NULL,
    ALTER COLUMN type DROP NOT NULL,
    ALTER COLUMN school_id DROP NOT NULL,
    ALTER COLUMN status DROP NOT NULL,
    ALTER COLUMN attempts DROP NOT NULL,
    ADD COLUMN IF NOT EXISTS event_id uuid NULL,
    ADD COLUMN IF NOT EXISTS routing_key text NULL,
    ADD COLUMN IF NOT EXISTS payload jsonb NULL;

-- Every inbound text that is not an opt-out or opt-in keyword.
CREATE TABLE IF NOT EXISTS sms_replies (
    id                  uuid PRIMARY KEY,
    received_at         timestamptz NOT NULL DEFAULT now(),
    from_number         text NOT NULL,          -- E.164
    to_number           text NOT NULL,          -- the number it was sent to, as the provider gave it
    body                text NULL,              -- null once purged (SMSGW_BODY_RETENTION)
    provider            text NOT NULL,          -- the provider type: twilio, vonage, inbox
    provider_message_id text NOT NULL,
    -- The message it answers (the newest sent to from_number within SMSGW_REPLY_WINDOW),
    -- and that message's school; null when none was found.
    school_id           bigint NULL,
    in_reply_to         uuid NULL,
    -- A replayed webhook adds nothing.
    UNIQUE (provider, provider_message_id)
);

CREATE INDEX IF NOT EXISTS sms_replies_from ON sms_replies (from_number, received_at);
CREATE INDEX IF NOT EXISTS sms_replies_school ON sms_replies (school_id, received_at);
CREATE INDEX IF NOT EXISTS sms_replies_received ON sms_replies (received_at);
