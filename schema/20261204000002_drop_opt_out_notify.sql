-- Opt-outs are not cached any more, so nothing listens for their changes; and the trigger
-- sent each changed number in full through pg_notify, which any role that can connect to
-- the database may LISTEN to. The settings trigger stays: the settings cache needs it.
DROP TRIGGER IF EXISTS smsgw_opt_outs_changed ON sms_opt_outs;
DROP FUNCTION IF EXISTS smsgw_notify_opt_outs();
