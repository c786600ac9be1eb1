-- The guards' admission in batches (group commit). sms_guard_admit admits one message, or
-- one announcement, per statement and per transaction; under load every message of a
-- school with a budget paid a statement, a commit and the planning of the function's
-- lookups (most of its 1 ms), and a school's messages took turns on its month's row one
-- statement at a time. sms_guard_admit_many admits what a process has waiting, messages of
-- many schools, in one statement, by the same rules, message by message in the order
-- given: each gets its own answer, as if admitted alone in that order.
--
-- An entry is one message, or an announcement's recipients (the budget only: admitted
-- whole or refused whole). `message_entries`, `message_ids` and `message_numbers` are the
-- messages, each with its entry (1-based) and its recipient (E.164); a message appears
-- once in a call. Per entry: `entry_schools`, `entry_segments` (each message's),
-- `entry_budgets` (null: no budget) and `entry_exempt`, `entry_login` (a login code:
-- `login_limit` codes in `login_window` seconds), `entry_abroad` (a text abroad:
-- `international_limit` a UTC day); the limits are the account's, null when no entry
-- counts against them.
--
-- Returns each entry's refusal, as sms_guard_admit names them, or null when admitted
-- (or when every message of it has an outcome already: nothing is counted).
--
-- All rows are locked before any is read to decide: the numbers' (ascending), then the
-- day's, then the schools' months (ascending school, then month). sms_guard_admit locks
-- in the same order, so no two admissions, batched or not, of this replica or another,
-- wait for each other in a circle.
--
-- What each message counted before (its reservations) is read with the rest, before the
-- locks: an admission that waited for another's locks may not see what that one
-- reserved. It cannot count a message twice for it: reservations are inserted without
-- ON CONFLICT, so one already there makes the insert fail (a unique violation), the
-- batch counts nothing, and the replica admits its checks again, each alone, which then
-- find the reservation. That takes two admissions of one message at the same moment (a
-- redelivery racing its first delivery); every other batch reads each reservation once.
CREATE OR REPLACE FUNCTION sms_guard_admit_many(
    message_entries integer[], message_ids uuid[], message_numbers text[],
    entry_schools bigint[], entry_segments integer[], entry_budgets integer[],
    entry_exempt boolean[], entry_login boolean[], entry_abroad boolean[],
    login_limit integer, login_window float8, international_limit integer)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    entry_count integer := cardinality(entry_schools);
    today date := (now() AT TIME ZONE 'UTC')::date;
    refusals text[] := array_fill(NULL::text, ARRAY[entry_count]);
    -- Each message: whether it counts against its budget for the first time (it has no
    -- outcome, its recipient did not opt out, it has no reservation of its budget).
    message_fresh boolean[];
    -- Each entry: whether some message of it has no outcome; its first wanted message
    -- (null: every recipient opted out); its school's month (an index of month_*); whether
    -- its login code and its text abroad count for the first time; the segments it adds
    -- to its budget; whether it was admitted.
    entry_open boolean[];
    entry_first integer[];
    entry_month integer[];
    entry_login_new boolean[];
    entry_abroad_new boolean[];
    entry_adding bigint[];
    entry_admitted boolean[] := array_fill(false, ARRAY[entry_count]);
    -- The schools' months, in lock order: as locked, then as counted.
    month_schools bigint[];
    month_starts date[];
    month_used bigint[];
    month_warned boolean[];
    month_exhausted boolean[];
    -- The login codes' numbers, in lock order: codes still in the window, codes added.
    numbers text[];
    number_recent integer[];
    number_added integer[];
    abroad_today integer;
    abroad_added integer := 0;
    ent integer;
    num integer;
    mon integer;
    used_after bigint;
BEGIN
    -- A message with an outcome (a job published again) is not counted: its claim finds
    -- it done. A failed one may be replayed, and counts (once) like any other. Recipients
    -- who opted out are neither counted nor sent to (their claim refuses them). The month
    -- is the one the messages were created in, as `smsgw usage` counts them. Each
    -- message is 'done' (it has an outcome), 'opted_out', 'wanted' (to be sent; no
    -- budget, or counted on it before) or 'fresh' (to count on its budget now).
    WITH message AS (
        SELECT i.entry, i.n, x.created_at,
               CASE WHEN x.status IN ('sent', 'delivered', 'undelivered', 'suppressed',
                                      'expired', 'cancelled') THEN 'done'
                    WHEN EXISTS (SELECT 1 FROM sms_opt_outs o
                                  WHERE o.phone = i.number
                                    AND (o.school_id IS NULL
                                         OR o.school_id = entry_schools[i.entry])
                                 OFFSET 0) THEN 'opted_out'
                    WHEN entry_budgets[i.entry] IS NULL
                      OR EXISTS (SELECT 1 FROM sms_guard_reservations r
                                  WHERE r.message_id = i.id AND r.guard = 'budget'
                                 OFFSET 0) THEN 'wanted'
                    ELSE 'fresh'
               END AS state
          FROM unnest(message_entries, message_ids, message_numbers)
               WITH ORDINALITY AS i (entry, id, number, n)
          LEFT JOIN LATERAL (SELECT m.status, m.created_at FROM sms_messages m
                              WHERE m.id = i.id OFFSET 0) x ON true
    ), entry AS (
        SELECT g.entry, COALESCE(bool_or(m.state <> 'done'), false) AS open,
               min(m.n) FILTER (WHERE m.state IN ('wanted', 'fresh')) AS first,
               count(*) FILTER (WHERE m.state = 'fresh') * entry_segments[g.entry] AS adding,
               date_trunc('month', COALESCE(min(m.created_at) FILTER (WHERE m.state <> 'done'
                                                                       AND m.state <> 'opted_out'),
                                            now()) AT TIME ZONE 'UTC')::date AS month
          FROM generate_series(1, entry_count) AS g (entry)
          LEFT JOIN message m ON m.entry = g.entry
         GROUP BY g.entry
    ), budgeted AS (
        SELECT e.entry, entry_schools[e.entry] AS school, e.month,
               dense_rank() OVER (ORDER BY entry_schools[e.entry], e.month)::integer AS slot
          FROM entry e
         WHERE entry_budgets[e.entry] IS NOT NULL AND e.first IS NOT NULL
    )
    SELECT (SELECT array_agg(m.state = 'fresh' ORDER BY m.n) FROM message m),
           array_agg(e.open ORDER BY e.entry), array_agg(e.first::integer ORDER BY e.entry),
           array_agg(e.adding ORDER BY e.entry),
           array_agg(entry_login[e.entry] AND e.first IS NOT NULL
                     AND NOT EXISTS (SELECT 1 FROM sms_guard_reservations r
                                      WHERE r.message_id = message_ids[e.first]
                                        AND r.guard = 'recipient' OFFSET 0)
                     ORDER BY e.entry),
           array_agg(entry_abroad[e.entry] AND e.first IS NOT NULL
                     AND NOT EXISTS (SELECT 1 FROM sms_guard_reservations r
                                      WHERE r.message_id = message_ids[e.first]
                                        AND r.guard = 'international' OFFSET 0)
                     ORDER BY e.entry),
           array_agg(b.slot ORDER BY e.entry),
           ARRAY(SELECT DISTINCT ON (b.slot) b.school FROM budgeted b ORDER BY b.slot),
           ARRAY(SELECT DISTINCT ON (b.slot) b.month FROM budgeted b ORDER BY b.slot)
      INTO message_fresh, entry_open, entry_first, entry_adding, entry_login_new,
           entry_abroad_new, entry_month, month_schools, month_starts
      FROM entry e
      LEFT JOIN budgeted b ON b.entry = e.entry;

    IF login_limit IS NOT NULL THEN
        SELECT array_agg(DISTINCT message_numbers[entry_first[g.entry]]) INTO numbers
          FROM generate_series(1, entry_count) AS g (entry)
         WHERE entry_login[g.entry] AND entry_first[g.entry] IS NOT NULL;
    END IF;
    IF numbers IS NOT NULL THEN
        INSERT INTO sms_guard_recipients (phone, admitted)
        SELECT p.phone, '{}' FROM unnest(numbers) AS p (phone) ORDER BY p.phone
        ON CONFLICT (phone) DO NOTHING;
        SELECT array_agg(r.phone ORDER BY r.phone), array_agg(r.recent ORDER BY r.phone)
          INTO numbers, number_recent
          FROM (SELECT l.phone,
                       (SELECT count(*) FROM unnest(l.admitted) AS t (at)
                         WHERE t.at > now() - make_interval(secs => login_window))::integer
                         AS recent
                  FROM sms_guard_recipients l
                 WHERE l.phone = ANY (numbers)
                 ORDER BY l.phone
                   FOR UPDATE) r;
        number_added := array_fill(0, ARRAY[cardinality(numbers)]);
    END IF;

    IF international_limit IS NOT NULL THEN
        INSERT INTO sms_guard_days (day) VALUES (today) ON CONFLICT (day) DO NOTHING;
        SELECT d.international INTO abroad_today
          FROM sms_guard_days d WHERE d.day = today FOR UPDATE;
    END IF;

    IF cardinality(month_schools) > 0 THEN
        -- A school's first admission of a month starts from what it used of the month
        -- before it had a budget, as `smsgw usage` bills it (once a month: an index scan
        -- of its messages of the month).
        INSERT INTO sms_guard_budgets (school_id, month, used)
        SELECT s.school, s.month,
               (SELECT COALESCE(sum(m.segments), 0) FROM sms_messages m
                 WHERE m.school_id = s.school
                   AND m.created_at >= s.month::timestamp AT TIME ZONE 'UTC'
                   AND m.created_at < (s.month + interval '1 month') AT TIME ZONE 'UTC'
                   AND m.status IN ('sent', 'delivered', 'undelivered'))
          FROM unnest(month_schools, month_starts) AS s (school, month)
         WHERE NOT EXISTS (SELECT 1 FROM sms_guard_budgets b
                            WHERE b.school_id = s.school AND b.month = s.month OFFSET 0)
         ORDER BY s.school, s.month
        ON CONFLICT (school_id, month) DO NOTHING;
        SELECT array_agg(l.used ORDER BY l.school_id, l.month),
               array_agg(l.warned ORDER BY l.school_id, l.month),
               array_agg(l.exhausted ORDER BY l.school_id, l.month)
          INTO month_used, month_warned, month_exhausted
          FROM (SELECT b.school_id, b.month, b.used, b.warned, b.exhausted
                  FROM sms_guard_budgets b
                 WHERE b.school_id = ANY (month_schools) AND b.month = ANY (month_starts)
                   AND (b.school_id, b.month) IN (
                       SELECT s.school, s.month
                         FROM unnest(month_schools, month_starts) AS s (school, month))
                 ORDER BY b.school_id, b.month
                   FOR UPDATE) l;
    END IF;

    -- Each entry in turn, against the counts as the entries before it left them: every
    -- count checked before any is added to, so a refusal counts nothing.
    FOR ent IN 1 .. entry_count LOOP
        CONTINUE WHEN NOT entry_open[ent];
        IF entry_first[ent] IS NULL THEN
            refusals[ent] := 'opted_out';
            CONTINUE;
        END IF;
        IF entry_login_new[ent] THEN
            num := array_position(numbers, message_numbers[entry_first[ent]]);
            IF number_recent[num] + number_added[num] >= login_limit THEN
                refusals[ent] := 'recipient_limit';
                CONTINUE;
            END IF;
        END IF;
        IF entry_abroad_new[ent] AND abroad_today + abroad_added >= international_limit THEN
            refusals[ent] := 'international_limit';
            CONTINUE;
        END IF;
        mon := entry_month[ent];
        IF entry_adding[ent] > 0 AND NOT entry_exempt[ent]
           AND month_used[mon] + entry_adding[ent] > entry_budgets[ent] THEN
            -- A message that does not fit writes budget.exhausted the first time.
            IF NOT month_exhausted[mon] THEN
                PERFORM sms_guard_budget_event('budget.exhausted', entry_schools[ent],
                                               month_starts[mon], entry_budgets[ent],
                                               month_used[mon]);
                month_exhausted[mon] := true;
            END IF;
            refusals[ent] := 'budget_exhausted';
            CONTINUE;
        END IF;

        entry_admitted[ent] := true;
        IF entry_login_new[ent] THEN
            number_added[num] := number_added[num] + 1;
        END IF;
        IF entry_abroad_new[ent] THEN
            abroad_added := abroad_added + 1;
        END IF;
        IF entry_adding[ent] > 0 THEN
            -- budget.warning at 80%, budget.exhausted at 100%, each the first time in the
            -- month (both, in that order, when one entry passes both).
            used_after := month_used[mon] + entry_adding[ent];
            IF NOT month_warned[mon] AND used_after * 5 >= entry_budgets[ent]::bigint * 4 THEN
                PERFORM sms_guard_budget_event('budget.warning', entry_schools[ent],
                                               month_starts[mon], entry_budgets[ent],
                                               used_after);
                month_warned[mon] := true;
            END IF;
            IF NOT month_exhausted[mon] AND used_after >= entry_budgets[ent] THEN
                PERFORM sms_guard_budget_event('budget.exhausted', entry_schools[ent],
                                               month_starts[mon], entry_budgets[ent],
                                               used_after);
                month_exhausted[mon] := true;
            END IF;
            month_used[mon] := used_after;
        END IF;
    END LOOP;

    -- Without ON CONFLICT: a reservation made since it was looked for fails the batch
    -- rather than count its message twice (see above).
    INSERT INTO sms_guard_reservations (message_id, guard)
    SELECT message_ids[entry_first[g.entry]], 'recipient'
      FROM generate_series(1, entry_count) AS g (entry)
     WHERE entry_admitted[g.entry] AND entry_login_new[g.entry]
    UNION ALL
    SELECT message_ids[entry_first[g.entry]], 'international'
      FROM generate_series(1, entry_count) AS g (entry)
     WHERE entry_admitted[g.entry] AND entry_abroad_new[g.entry]
    UNION ALL
    SELECT w.id, 'budget'
      FROM unnest(message_entries, message_ids, message_fresh) AS w (entry, id, fresh)
     WHERE w.fresh AND entry_admitted[w.entry];

    IF numbers IS NOT NULL THEN
        UPDATE sms_guard_recipients r
           SET admitted = ARRAY(SELECT t.at FROM unnest(r.admitted) AS t (at)
                                 WHERE t.at > now() - make_interval(secs => login_window)
                                 ORDER BY t.at)
                          || array_fill(now(), ARRAY[a.added]),
               updated_at = now()
          FROM unnest(numbers, number_added) AS a (phone, added)
         WHERE r.phone = a.phone AND a.added > 0;
    END IF;
    IF abroad_added > 0 THEN
        UPDATE sms_guard_days d SET international = d.international + abroad_added
         WHERE d.day = today;
    END IF;
    IF cardinality(month_schools) > 0 THEN
        UPDATE sms_guard_budgets b
           SET used = c.used, warned = c.warned, exhausted = c.exhausted
          FROM unnest(month_schools, month_starts, month_used, month_warned, month_exhausted)
               AS c (school, month, used, warned, exhausted)
         WHERE b.school_id = c.school AND b.month = c.month
           AND (b.used, b.warned, b.exhausted) IS DISTINCT FROM (c.used, c.warned, c.exhausted);
    END IF;
    RETURN refusals;
END
$$;

-- The function keeps one plan per statement and connection: planning them at every call,
-- as sms_guard_admit does, costs more than running them (a batch of one: 1.5 ms against
-- 0.4, measured), and left to choose, PostgreSQL keeps planning afresh. Every lookup in
-- it is by a key, a few rows of tables that only grow, so a plan that scans one of them
-- whole is never right: without seqscans, a plan made while a table was small (a new
-- database, the first minutes of a day) is still right when it has grown.
ALTER FUNCTION sms_guard_admit_many(integer[], uuid[], text[], bigint[], integer[],
                                    integer[], boolean[], boolean[], boolean[], integer,
                                    double precision, integer)
    SET plan_cache_mode = force_generic_plan
    SET enable_seqscan = off;
