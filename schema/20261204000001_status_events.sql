-- Status events (contract section 9): the transactional outbox.
--
-- Every status change of a message writes one row to sms_events in the same transaction,
-- by trigger, whichever statement made the change (the pipeline's batches, receipts,
-- replays, support tools). The daemon's relay publishes the rows to `sms.events` and
-- deletes them once the broker confirmed. A change that commits always has its row; a
-- change that rolls back never does.
--
-- A daemon started with SMSGW_EVENTS=off sets `smsgw.events = off` on its connections,
-- and its changes write no rows.

-- One more for each status change of the message: the events' `seq`. The row lock that
-- every update takes orders a message's changes, so seq grows in commit order.
ALTER TABLE sms_messages ADD COLUMN IF NOT EXISTS status_seq integer NOT NULL DEFAULT 1;

CREATE TABLE IF NOT EXISTS sms_events (
    -- Relay order. Identity values are handed out in the order the changes were made;
    -- two changes of one message can never commit out of order (see status_seq).
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_id          uuid NOT NULL,
    seq                 integer NOT NULL,
    bulk_id             uuid NULL,
    type                text NOT NULL,
    school_id           bigint NOT NULL,
    status              text NOT NULL,
    previous_status     text NULL,
    reason              text NULL,
    error_code          text NULL,
    provider            text NULL,
    provider_message_id text NULL,
    attempts            integer NOT NULL,
    segments            integer NULL,
    context             jsonb NULL,
    occurred_at         timestamptz NOT NULL DEFAULT now()
);

CREATE OR REPLACE FUNCTION smsgw_events_enabled() RETURNS boolean
    LANGUAGE sql STABLE AS
$$ SELECT current_setting('smsgw.events', true) IS DISTINCT FROM 'off' $$;

CREATE OR REPLACE FUNCTION smsgw_count_status_change() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    NEW.status_seq := OLD.status_seq + 1;
    RETURN NEW;
END
$$;

-- Statement-level triggers with transition tables: one INSERT per statement, however
-- many rows it changed (a batch of 512 costs one insert, not 512).
CREATE OR REPLACE FUNCTION smsgw_events_of_inserts() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    INSERT INTO sms_events (message_id, seq, bulk_id, type, school_id, status,
                            previous_status, reason, error_code, provider,
                            provider_message_id, attempts, segments, context)
    SELECT n.id, n.status_seq, n.bulk_id, n.type, n.school_id, n.status,
           NULL, n.reason, n.error_code, n.provider, n.provider_message_id, n.attempts,
           n.segments, n.context
      FROM new_rows n;
    RETURN NULL;
END
$$;

-- The error code is the receipt's when a receipt brought one, else the attempt's.
CREATE OR REPLACE FUNCTION smsgw_events_of_updates() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    INSERT INTO sms_events (message_id, seq, bulk_id, type, school_id, status,
                            previous_status, reason, error_code, provider,
                            provider_message_id, attempts, segments, context)
    SELECT n.id, n.status_seq, n.bulk_id, n.type, n.school_id, n.status,
           o.status, n.reason,
           CASE WHEN n.status IN ('retrying', 'failed', 'undelivered') THEN
               COALESCE(CASE WHEN n.error_code IS DISTINCT FROM o.error_code
                             THEN n.error_code END,
                        (SELECT a.error_code FROM sms_attempts a
                          WHERE a.message_id = n.id AND a.attempt = n.attempts))
           END,
           n.provider, n.provider_message_id, n.attempts, n.segments, n.context
      FROM new_rows n JOIN old_rows o ON o.id = n.id
     WHERE n.status IS DISTINCT FROM o.status;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS smsgw_status_seq ON sms_messages;
CREATE TRIGGER smsgw_status_seq
    BEFORE UPDATE OF status ON sms_messages
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION smsgw_count_status_change();

DROP TRIGGER IF EXISTS smsgw_events_inserted ON sms_messages;
CREATE TRIGGER smsgw_events_inserted
    AFTER INSERT ON sms_messages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT WHEN (smsgw_events_enabled())
    EXECUTE FUNCTION smsgw_events_of_inserts();

DROP TRIGGER IF EXISTS smsgw_events_updated ON sms_messages;
CREATE TRIGGER smsgw_events_updated
    AFTER UPDATE ON sms_messages
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT WHEN (smsgw_events_enabled())
    EXECUTE FUNCTION smsgw_events_of_updates();
