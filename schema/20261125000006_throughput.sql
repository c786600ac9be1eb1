-- Throughput. The started attempt is recorded on the message row itself (status
-- 'sending', attempt_started_at, attempt_claim); the sms_attempts row is written once,
-- complete, when the call ends (or, for a call cut off by a crash, when the next delivery
-- takes over). The provider's id is looked up through sms_attempts, so finishing a
-- message changes no indexed column of sms_messages and PostgreSQL can update it in place
-- (a HOT update, helped by free space on each page).
ALTER TABLE sms_messages ADD COLUMN IF NOT EXISTS attempt_started_at timestamptz NULL;
ALTER TABLE sms_messages ADD COLUMN IF NOT EXISTS attempt_claim uuid NULL;
ALTER TABLE sms_messages ADD COLUMN IF NOT EXISTS last_outcome_unknown boolean NOT NULL DEFAULT false;
ALTER TABLE sms_messages SET (fillfactor = 85);

ALTER TABLE sms_attempts ADD COLUMN IF NOT EXISTS provider_message_id text NULL;
CREATE INDEX IF NOT EXISTS sms_attempts_provider_message_id
    ON sms_attempts (provider_message_id) WHERE provider_message_id IS NOT NULL;
DROP INDEX IF EXISTS sms_messages_provider_message_id;

-- Settings and opt-outs are cached in the daemon; a change is announced so that it takes
-- effect within a second.
CREATE OR REPLACE FUNCTION smsgw_notify_settings() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('smsgw_changes', 'settings:' || COALESCE(NEW.school_id, OLD.school_id));
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

CREATE OR REPLACE FUNCTION smsgw_notify_opt_outs() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('smsgw_changes', 'opt_out:' || COALESCE(NEW.phone, OLD.phone));
    IF TG_OP = 'UPDATE' AND NEW.phone IS DISTINCT FROM OLD.phone THEN
        PERFORM pg_notify('smsgw_changes', 'opt_out:' || OLD.phone);
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql;

DROP TRIGGER IF EXISTS smsgw_settings_changed ON sms_school_settings;
CREATE TRIGGER smsgw_settings_changed
    AFTER INSERT OR UPDATE OR DELETE ON sms_school_settings
    FOR EACH ROW EXECUTE FUNCTION smsgw_notify_settings();

DROP TRIGGER IF EXISTS smsgw_opt_outs_changed ON sms_opt_outs;
CREATE TRIGGER smsgw_opt_outs_changed
    AFTER INSERT OR UPDATE OR DELETE ON sms_opt_outs
    FOR EACH ROW EXECUTE FUNCTION smsgw_notify_opt_outs();
