-- A cancelled lesson's reminder never goes out (interface section 15).
--
-- A booking_cancellation withdraws the same school's unsent booking_reminder and
-- booking_confirmation of its booking: they end `cancelled`, a new final status. The
-- constraint is replaced NOT VALID (a moment's lock, no scan of the table); the next
-- migration validates it without holding up writes.
ALTER TABLE sms_messages DROP CONSTRAINT IF EXISTS sms_messages_status_check;
ALTER TABLE sms_messages ADD CONSTRAINT sms_messages_status_check CHECK (status IN (
    'queued', 'sending', 'sent', 'delivered', 'undelivered',
    'failed', 'retrying', 'suppressed', 'expired', 'cancelled')) NOT VALID;

-- The bookings cancelled, so that a reminder or confirmation of one that arrives after
-- its cancellation is withdrawn too. booking_id is the context's `booking_id` as text
-- (the number 981 and the string "981" are one booking). Kept for SMSGW_WITHDRAW_WINDOW:
-- a lookup ignores older rows, and retention deletes them.
CREATE TABLE IF NOT EXISTS sms_withdrawals (
    school_id       bigint NOT NULL,
    booking_id      text NOT NULL,
    withdrawn_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (school_id, booking_id)
);
CREATE INDEX IF NOT EXISTS sms_withdrawals_withdrawn_at ON sms_withdrawals (withdrawn_at);
