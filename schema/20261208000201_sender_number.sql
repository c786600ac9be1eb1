-- The right text (interface section 15): a school's own number, the sender of its texts
-- to countries whose carriers refuse an alphanumeric sender_id (the United States,
-- Canada, ...). E.164; anything else fails those messages as invalid_sender_number.
ALTER TABLE sms_school_settings ADD COLUMN IF NOT EXISTS sender_number text NULL;
