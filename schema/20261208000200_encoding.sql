-- The right text (interface section 15): the encoding a message was sent in, beside its
-- segments. Both describe the text as sent, after smart encoding replaced any GSM-7
-- look-alikes. Null for rows written before this column, and for rows that never had a
-- text to encode.
ALTER TABLE sms_messages ADD COLUMN IF NOT EXISTS encoding text NULL
    CONSTRAINT sms_messages_encoding_check CHECK (encoding IN ('GSM-7', 'UCS-2'));
