-- Retention: the purge task finds old rows by age.
CREATE INDEX IF NOT EXISTS sms_messages_created ON sms_messages (created_at);
