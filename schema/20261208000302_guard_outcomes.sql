-- A withdrawn message (status cancelled, interface section 15) has its outcome like an
-- expired one: sms_guard_admit counts it for no guard. The function as the guards'
-- migration wrote it, with 'cancelled' among the statuses of a message with an outcome.
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
                                           'expired', 'cancelled'));
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
