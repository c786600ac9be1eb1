-- One rate for the whole account (contract section 12): every replica takes its call
-- slots from one clock per rate, kept here, so that the calls of all replicas together
-- stay spaced at the rate.
--
-- A clock's `next_slot` is the earliest instant not yet handed out. A lease takes
-- `slots` consecutive instants from it, `step` seconds apart, starting at `next_slot` or
-- now, whichever is later, and moves `next_slot` past them. Leases are serialised by the
-- row lock, so no two replicas ever get the same instant, and instants handed out are
-- never closer together than their clock's spacing.
CREATE TABLE IF NOT EXISTS sms_rate_clocks (
    name text PRIMARY KEY,
    next_slot timestamptz NOT NULL
);

-- Leases `slots` call slots on every named clock at once (a call governed by two rates
-- takes one slot of each, at the same instant). `spacings` are the clocks' own spacings
-- in seconds, in the order of `names`. Says when the first slot is, twice: how many
-- seconds after the lease (`starts_in`) and as a Unix time (`starts_at`), so that the
-- replica can place it on its own clock both ways; the slots are max(spacings) apart.
CREATE OR REPLACE FUNCTION sms_lease_slots(
    names text[], spacings float8[], slots integer,
    OUT starts_in float8, OUT starts_at float8)
LANGUAGE plpgsql AS $$
DECLARE
    leased_at timestamptz;
    start_at timestamptz;
    step float8;
BEGIN
    INSERT INTO sms_rate_clocks (name, next_slot)
    SELECT clock_name, clock_timestamp() FROM unnest(names) AS clock_name
    ON CONFLICT (name) DO NOTHING;
    -- In name order, so that two leases over the same clocks cannot deadlock.
    PERFORM 1 FROM sms_rate_clocks WHERE name = ANY (names) ORDER BY name FOR UPDATE;
    leased_at := clock_timestamp();
    SELECT greatest(leased_at, max(next_slot)) INTO start_at
      FROM sms_rate_clocks WHERE name = ANY (names);
    SELECT max(spacing) INTO step FROM unnest(spacings) AS spacing;
    UPDATE sms_rate_clocks AS clock
       SET next_slot = start_at + make_interval(secs => (slots - 1) * step + own.spacing)
      FROM unnest(names, spacings) AS own (name, spacing)
     WHERE clock.name = own.name;
    starts_in := extract(epoch FROM start_at - leased_at);
    starts_at := extract(epoch FROM start_at);
END;
$$;
