-- The outbox's bound (SMSGW_EVENTS_MAX_BACKLOG). When no relay can publish (the broker
-- refuses `sms.events`, every node is down), events would pile up in sms_events until
-- the disk fills and every status change, so every send, fails. Past the bound, new
-- events are dropped instead, and counted.
--
-- The relays decide (every few seconds, from the backlog they already read for the
-- metrics) and write the decision here; the triggers read one row per statement, never
-- the backlog itself. A gate, not a count per insert: it closes at the bound and opens
-- again only once the relay has brought the backlog a tenth below it, so events are not
-- dropped one in two while the outbox hovers at its bound.
CREATE TABLE IF NOT EXISTS sms_events_gate (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    open       boolean NOT NULL DEFAULT true,
    changed_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO sms_events_gate DEFAULT VALUES ON CONFLICT DO NOTHING;

-- One value taken for each event dropped: a sequence, so that counting takes no lock
-- and survives the transactions that roll back.
CREATE SEQUENCE IF NOT EXISTS sms_events_dropped;

CREATE OR REPLACE FUNCTION smsgw_events_gate_open() RETURNS boolean
    LANGUAGE sql STABLE AS
$$ SELECT COALESCE((SELECT open FROM sms_events_gate), true) $$;

CREATE OR REPLACE FUNCTION smsgw_events_drop(how_many bigint) RETURNS void
    LANGUAGE sql AS
$$ SELECT count(nextval('sms_events_dropped')) FROM generate_series(1, how_many) $$;

-- The status events' triggers, as in the status_events migration, behind the gate.
CREATE OR REPLACE FUNCTION smsgw_events_of_inserts() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    IF NOT smsgw_events_gate_open() THEN
        PERFORM smsgw_events_drop((SELECT count(*) FROM new_rows));
        RETURN NULL;
    END IF;
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

CREATE OR REPLACE FUNCTION smsgw_events_of_updates() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    IF NOT smsgw_events_gate_open() THEN
        PERFORM smsgw_events_drop((SELECT count(*) FROM new_rows n JOIN old_rows o
                                     ON o.id = n.id
                                    WHERE n.status IS DISTINCT FROM o.status));
        RETURN NULL;
    END IF;
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

-- The other events (replies, rejected jobs, budget warnings) are few: one row each,
-- kept back by a row trigger.
CREATE OR REPLACE FUNCTION smsgw_outbox_gate() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    IF smsgw_events_gate_open() THEN
        RETURN NEW;
    END IF;
    PERFORM smsgw_events_drop(1);
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS smsgw_outbox_gate ON sms_outbox;
CREATE TRIGGER smsgw_outbox_gate
    BEFORE INSERT ON sms_outbox
    FOR EACH ROW EXECUTE FUNCTION smsgw_outbox_gate();
