-- Which delivery claimed an attempt: when the commit of a claim is lost with its
-- connection, the retried claim recognises its own attempt instead of taking it for
-- another worker's.
ALTER TABLE sms_attempts ADD COLUMN IF NOT EXISTS claim uuid NULL;
