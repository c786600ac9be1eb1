-- Guards against fraud and spend (interface section 14).
--
-- The web app sets, per school, where it may text and how many billable segments it may
-- use a UTC calendar month. smsgw counts what the guards limit here, in PostgreSQL, so
-- that every replica shares one count: each count changes under its row's lock, in the
-- statement that admits a message, and never passes its limit whatever number of
-- replicas run. A message is counted once: its reservation of each counter is a row of
-- sms_guard_reservations, keyed by the message, and a message retried, redelivered or
-- taken over finds its reservations and passes without counting again. A reservation is
-- never given back: a message admitted counts, whether it then goes out or not.

-- ISO 3166 alpha-2 codes the school may text; null: its own country and the account's
-- SMSGW_ALLOWED_COUNTRIES.
ALTER TABLE sms_school_settings ADD COLUMN IF NOT EXISTS allowed_countries text[] NULL;
-- Billable segments a UTC calendar month; null: no budget.
ALTER TABLE sms_school_settings ADD COLUMN IF NOT EXISTS monthly_segment_budget integer NULL;

-- Login codes to each number: when each was admitted, oldest first, those still inside
-- the window (SMSGW_LOGIN_CODE_LIMIT) and at most its count.
CREATE TABLE IF NOT EXISTS sms_guard_recipients (
    phone       text PRIMARY KEY,               -- E.164
    admitted    timestamptz[] NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS sms_guard_recipients_updated ON sms_guard_recipients (updated_at);

-- Texts to a number outside its school's country, per UTC day, for the whole account.
CREATE TABLE IF NOT EXISTS sms_guard_days (
    day             date PRIMARY KEY,
    international   integer NOT NULL DEFAULT 0
);

-- Segments each school used, per UTC calendar month (the month its messages were created
-- in, as `smsgw usage` counts them), and whether its budget events were written.
CREATE TABLE IF NOT EXISTS sms_guard_budgets (
    school_id   bigint NOT NULL,
    month       date NOT NULL,                  -- the month's first day
    used        bigint NOT NULL DEFAULT 0,
    warned      boolean NOT NULL DEFAULT false, -- budget.warning written
    exhausted   boolean NOT NULL DEFAULT false, -- budget.exhausted written
    PRIMARY KEY (school_id, month)
);

-- What each message has counted, once: 'recipient' (a login code), 'international',
-- 'budget' (its segments).
CREATE TABLE IF NOT EXISTS sms_guard_reservations (
    message_id  uuid NOT NULL,
    guard       text NOT NULL CHECK (guard IN ('recipient', 'international', 'budget')),
    reserved_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (message_id, guard)
);
CREATE INDEX IF NOT EXISTS sms_guard_reservations_reserved
    ON sms_guard_reservations (reserved_at);

-- A budget event (budget.warning, budget.exhausted) through the outbox, in the
-- transaction of the change that caused it, published verbatim under its name.
CREATE OR REPLACE FUNCTION sms_guard_budget_event(
    name text, school bigint, month_start date, budget integer, used_now bigint)
RETURNS void LANGUAGE sql AS $$
    INSERT INTO sms_outbox (event_id, routing_key, payload)
    SELECT e.id, name, jsonb_build_object(
               'event_id', e.id, 'school_id', school,
               'month', to_char(month_start, 'YYYY-MM'),
               'budget', budget, 'used', used_now,
               'occurred_at', to_char(now() AT TIME ZONE 'UTC',
                                      'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))
      FROM (SELECT gen_random_uuid() AS id) e
     WHERE smsgw_events_enabled();
$$;

-- Counts `adding` more segments on a school's month (its row, as read and locked, is
-- `counted`) and writes each budget event the new use reaches for the first time that
-- month: budget.warning at 80%, budget.exhausted at 100% (both, in that order, when one
-- change passes both).
CREATE OR REPLACE FUNCTION sms_guard_budget_used(
    school bigint, month_start date, budget integer, counted sms_guard_budgets, adding bigint)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    after bigint := counted.used + adding;
    warn boolean := NOT counted.warned AND after > 0 AND after * 5 >= budget::bigint * 4;
    exhaust boolean := NOT counted.exhausted AND after > 0 AND after >= budget;
BEGIN
    UPDATE sms_guard_budgets b
       SET used = after, warned = b.warned OR warn, exhausted = b.exhausted OR exhaust
     WHERE b.school_id = school AND b.month = month_start;
    IF warn THEN
        PERFORM sms_guard_budget_event('budget.warning', school, month_start, budget, after);
    END IF;
    IF exhaust THEN
        PERFORM sms_guard_budget_event('budget.exhausted', school, month_start, budget, after);
    END IF;
END
$$;

-- Locks a school's month (created with the month's billable use so far) and says whether
-- the messages `wanted` fit its budget:
-- `adding`, the segments of those not counted before; `counted`, the month's row as
-- locked; `fits`. A message that does not fit writes budget.exhausted the first time.
-- The month is the one the messages were created in, as `smsgw usage` counts them.
CREATE OR REPLACE FUNCTION sms_guard_budget_room(
    wanted uuid[], school bigint, segments integer, budget integer, exempt boolean,
    OUT month_start date, OUT counted sms_guard_budgets, OUT adding bigint,
    OUT fits boolean)
LANGUAGE plpgsql AS $$
BEGIN
    month_start := date_trunc('month',
        COALESCE((SELECT min(m.created_at) FROM sms_messages m WHERE m.id = ANY (wanted)),
                 now()) AT TIME ZONE 'UTC')::date;
    IF NOT EXISTS (SELECT 1 FROM sms_guard_budgets b
                    WHERE b.school_id = school AND b.month = month_start) THEN
        -- A school's first admission of the month starts from what it used of the month
        -- before it had a budget, as `smsgw usage` bills it (once a month: an index scan
        -- of its messages of the month).
        INSERT INTO sms_guard_budgets (school_id, month, used)
        SELECT school, month_start, COALESCE(sum(m.segments), 0)
          FROM sms_messages m
         WHERE m.school_id = school
           AND m.created_at >= month_start::timestamp AT TIME ZONE 'UTC'
           AND m.created_at < (month_start + interval '1 month') AT TIME ZONE 'UTC'
           AND m.status IN ('sent', 'delivered', 'undelivered')
        ON CONFLICT (school_id, month) DO NOTHING;
    END IF;
    SELECT * INTO counted FROM sms_guard_budgets b
     WHERE b.school_id = school AND b.month = month_start FOR UPDATE;
    SELECT count(*) * segments INTO adding
      FROM unnest(wanted) AS w (id)
     WHERE NOT EXISTS (SELECT 1 FROM sms_guard_reservations g
                        WHERE g.message_id = w.id AND g.guard = 'budget');
    fits := adding = 0 OR exempt OR counted.used + adding <= budget;
    IF NOT fits AND NOT counted.exhausted THEN
        PERFORM sms_guard_budget_event('budget.exhausted', school, month_start, budget,
                                       counted.used);
        UPDATE sms_guard_budgets b SET exhausted = true
         WHERE b.school_id = school AND b.month = month_start;
    END IF;
END
$$;

-- Admits messages past the guards, or names the guard that refuses them: 'opted_out'
-- (every recipient opted out: nothing is counted), 'recipient_limit',
-- 'international_limit', 'budget_exhausted'; null when admitted (or when every message
-- has an outcome already: nothing is counted, and the claim finds them done).
--
-- `ids` and `recipients` are the messages, one, or an announcement's recipients at once
-- (the budget only: an announcement that does not fit whole is refused whole). The
-- counters involved are given: `login_limit` and `login_window` (seconds) for a login
-- code, `international_limit` for a text abroad (both for one message only), `budget` and
-- `exempt` for a school with a budget, `segments` being each message's.
--
-- Each counter's row is locked in one order (the number's, the day's, the school's
-- month), so two admissions never wait for each other in a circle; all are checked before
-- any is counted, so a refusal counts nothing. Recipients who opted out are neither
-- counted nor sent to (their claim refuses them).
CREATE OR REPLACE FUNCTION sms_guard_admit(
    ids uuid[], recipients text[], school bigint, segments integer,
    budget integer, exempt boolean,
    login_limit integer, login_window float8, international_limit integer)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    wanted uuid[];
    recent timestamptz[];
    today date := (now() AT TIME ZONE 'UTC')::date;
    abroad_today integer;
    room record;
    login_new boolean := false;
    abroad_new boolean := false;
BEGIN
    -- A message with an outcome (a job published again) is not counted: its claim finds
    -- it done. A failed one may be replayed, and counts (once) like any other.
    SELECT array_agg(i.id), array_agg(i.number) INTO ids, recipients
      FROM unnest(ids, recipients) AS i (id, number)
     WHERE NOT EXISTS (SELECT 1 FROM sms_messages m
                        WHERE m.id = i.id
                          AND m.status IN ('sent', 'delivered', 'undelivered', 'suppressed',
                                           'expired'));
    IF ids IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT array_agg(i.id) INTO wanted
      FROM unnest(ids, recipients) AS i (id, number)
     WHERE NOT EXISTS (SELECT 1 FROM sms_opt_outs o
                        WHERE o.phone = i.number
                          AND (o.school_id IS NULL OR o.school_id = school)
                       OFFSET 0);
    IF wanted IS NULL THEN
        RETURN 'opted_out';
    END IF;

    IF login_limit IS NOT NULL THEN
        INSERT INTO sms_guard_recipients (phone, admitted) VALUES (recipients[1], '{}')
        ON CONFLICT (phone) DO NOTHING;
        SELECT ARRAY(SELECT t FROM unnest(r.admitted) AS t
                      WHERE t > now() - make_interval(secs => login_window) ORDER BY t)
          INTO recent
          FROM sms_guard_recipients r WHERE r.phone = recipients[1] FOR UPDATE;
        login_new := NOT EXISTS (SELECT 1 FROM sms_guard_reservations g
                                  WHERE g.message_id = wanted[1] AND g.guard = 'recipient');
        IF login_new AND cardinality(recent) >= login_limit THEN
            RETURN 'recipient_limit';
        END IF;
    END IF;

    IF international_limit IS NOT NULL THEN
        INSERT INTO sms_guard_days (day) VALUES (today) ON CONFLICT (day) DO NOTHING;
        SELECT d.international INTO abroad_today
          FROM sms_guard_days d WHERE d.day = today FOR UPDATE;
        abroad_new := NOT EXISTS (SELECT 1 FROM sms_guard_reservations g
                                   WHERE g.message_id = wanted[1] AND g.guard = 'international');
        IF abroad_new AND abroad_today >= international_limit THEN
            RETURN 'international_limit';
        END IF;
    END IF;

    IF budget IS NOT NULL THEN
        SELECT * INTO room FROM sms_guard_budget_room(wanted, school, segments, budget, exempt);
        IF NOT room.fits THEN
            RETURN 'budget_exhausted';
        END IF;
    END IF;

    IF login_new THEN
        UPDATE sms_guard_recipients r SET admitted = recent || now(), updated_at = now()
         WHERE r.phone = recipients[1];
        INSERT INTO sms_guard_reservations (message_id, guard) VALUES (wanted[1], 'recipient');
    END IF;
    IF abroad_new THEN
        UPDATE sms_guard_days d SET international = d.international + 1 WHERE d.day = today;
        INSERT INTO sms_guard_reservations (message_id, guard)
        VALUES (wanted[1], 'international');
    END IF;
    IF budget IS NOT NULL THEN
        IF room.adding > 0 THEN
            INSERT INTO sms_guard_reservations (message_id, guard)
            SELECT w.id, 'budget' FROM unnest(wanted) AS w (id)
            ON CONFLICT (message_id, guard) DO NOTHING;
            PERFORM sms_guard_budget_used(school, room.month_start, budget, room.counted,
                                          room.adding);
        END IF;
    END IF;
    RETURN NULL;
END
$$;
