-- The guards' admission (sms_guard_admit, and the functions it calls) plans its lookups
-- afresh at each call. PL/pgSQL keeps a generic plan per connection after a few calls;
-- made while sms_messages was small (a new database, the first minutes of a day), it
-- scans the whole table for each message's lookup by id, and each admission then costs
-- more the more messages there are: on a fresh database, 14 ms against 0.4 ms after
-- 50,000 messages. Planning each time costs far less than that.
ALTER FUNCTION sms_guard_admit(uuid[], text[], bigint, integer, integer, boolean, integer,
                               double precision, integer)
    SET plan_cache_mode = force_custom_plan;
