-- An attempt whose outcome we could not learn (timeout, connection lost, unreadable 2xx):
-- the next attempt asks the provider before sending again.
ALTER TABLE sms_attempts ADD COLUMN IF NOT EXISTS outcome_unknown boolean NOT NULL DEFAULT false;
