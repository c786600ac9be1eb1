-- A rate clock recovers from a clock step. A clock's `next_slot` far ahead of the
-- database's time (a failover to a host whose clock is behind, an NTP step back, a hand
-- edit) made every replica wait until then. The replicas together hold at most a lease
-- or so each ahead of now; a clock further ahead than a minute plus a hundred leases is
-- taken for a step and starts again from now, and the lease says so (`stepped`) for the
-- daemon to report.
--
-- The OUT columns change, so the function is dropped and made again (in this migration's
-- transaction): a daemon of the previous version reads `starts_in` and `starts_at` by
-- name and keeps working.
DROP FUNCTION IF EXISTS sms_lease_slots(text[], float8[], integer);

CREATE FUNCTION sms_lease_slots(
    names text[], spacings float8[], slots integer,
    OUT starts_in float8, OUT starts_at float8, OUT stepped boolean)
LANGUAGE plpgsql AS $$
DECLARE
    leased_at timestamptz;
    start_at timestamptz;
    step float8;
    reset integer;
BEGIN
    INSERT INTO sms_rate_clocks (name, next_slot)
    SELECT clock_name, clock_timestamp() FROM unnest(names) AS clock_name
    ON CONFLICT (name) DO NOTHING;
    -- In name order, so that two leases over the same clocks cannot deadlock.
    PERFORM 1 FROM sms_rate_clocks WHERE name = ANY (names) ORDER BY name FOR UPDATE;
    leased_at := clock_timestamp();
    SELECT max(spacing) INTO step FROM unnest(spacings) AS spacing;
    UPDATE sms_rate_clocks SET next_slot = leased_at
     WHERE name = ANY (names)
       AND next_slot > leased_at + make_interval(secs => 60 + 100 * slots * step);
    GET DIAGNOSTICS reset = ROW_COUNT;
    stepped := reset > 0;
    SELECT greatest(leased_at, max(next_slot)) INTO start_at
      FROM sms_rate_clocks WHERE name = ANY (names);
    UPDATE sms_rate_clocks AS clock
       SET next_slot = start_at + make_interval(secs => (slots - 1) * step + own.spacing)
      FROM unnest(names, spacings) AS own (name, spacing)
     WHERE clock.name = own.name;
    starts_in := extract(epoch FROM start_at - leased_at);
    starts_at := extract(epoch FROM start_at);
END;
$$;
