-- Quiet hours (contract section 11): a nightly window in the school's local time
-- (`timezone`) during which reminders, confirmations and announcements wait. Both null,
-- or equal: no window. A window whose end is not after its start crosses midnight.
ALTER TABLE sms_school_settings ADD COLUMN IF NOT EXISTS quiet_hours_start time NULL;
ALTER TABLE sms_school_settings ADD COLUMN IF NOT EXISTS quiet_hours_end time NULL;
