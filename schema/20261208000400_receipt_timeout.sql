-- Receipts that never come (SMSGW_RECEIPT_TIMEOUT): a message still `sent` that long after
-- its provider accepted it becomes `undelivered`, reason `no_receipt`.
--
-- The daemon walks the accepted attempts in the order they started, from where it last
-- stopped: each is looked at once, when it comes of age, so a look costs what is new since
-- the last one, never a scan of the log. This row is where the walk stands; every replica
-- takes it in turn (its row lock), so two never give up the same messages twice.
CREATE TABLE IF NOT EXISTS sms_receipt_watch (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    -- The last attempt looked at, (started_at, message_id) in the walk's order.
    started_at timestamptz NOT NULL,
    message_id uuid NOT NULL
);

-- Messages sent before this migration are walked too: from the beginning of time.
INSERT INTO sms_receipt_watch (started_at, message_id)
VALUES ('-infinity', '00000000-0000-0000-0000-000000000000')
ON CONFLICT DO NOTHING;
