-- Replies (two-way SMS), and an outbox for events that are not status changes.
--
-- sms_outbox holds events with a payload of their own (reply.received, job.rejected):
-- each is published as its `payload`, verbatim, under its `routing_key`, with `event_id`
-- as the message id. It is written in the transaction of the change it reports, like a
-- status event in sms_events, and relayed by the same turns with the same guarantees. A
-- table of its own, not new columns on sms_events: a build that knows only status events
-- (during a rolling update, or after a rollback) relays sms_events as before and leaves
-- these rows to a build that knows them.
CREATE TABLE IF NOT EXISTS sms_outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    uuid NOT NULL,
    routing_key text NOT NULL,
    payload     jsonb NOT NULL,
    occurred_at timestamptz NOT NULL DEFAULT now()
);

-- Every inbound text that is not an opt-out or opt-in keyword.
CREATE TABLE IF NOT EXISTS sms_replies (
    -- Derived from the provider and its message id: a replay, even after retention
    -- removed the row, gets the same id and its event the same event_id.
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
