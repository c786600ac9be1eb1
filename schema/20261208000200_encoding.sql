-- The right text (interface section 15): the encoding a message was sent in, beside its
-- segments. Both describe the text as sent, after smart encoding replaced any GSM-7
-- look-alikes. Null for rows written before this column.
ALTER TABLE sms_messages ADD COLUMN IF NOT EXISTS encoding text NULL;
-- NOT VALID: every existing row is null, and checking them would scan the whole log under
-- the ALTER's exclusive lock; new and updated rows are checked all the same.
ALTER TABLE sms_messages ADD CONSTRAINT sms_messages_encoding_check
    CHECK (encoding IN ('GSM-7', 'UCS-2')) NOT VALID;
