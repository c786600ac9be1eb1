-- smsgw:no-transaction
-- The messages a cancellation withdraws, found by school and booking: one index entry
-- per reminder or confirmation that names a booking, none for any other message. The
-- booking is read from `context`, which never changes after the insert, so the daemon's
-- updates of a message stay in place (HOT), and no column duplicates what the context
-- holds. Queries repeat the predicate word for word, so the planner can use the index.
--
-- Built CONCURRENTLY, so the daemon goes on writing meanwhile. A build cut off leaves an
-- invalid index behind: drop it first, so this file can run again.
ALTER TABLE sms_messages VALIDATE CONSTRAINT sms_messages_status_check;
DROP INDEX CONCURRENTLY IF EXISTS sms_messages_booking;
CREATE INDEX CONCURRENTLY sms_messages_booking
    ON sms_messages (school_id, (context ->> 'booking_id'))
    WHERE type IN ('booking_reminder', 'booking_confirmation')
      AND jsonb_typeof(context -> 'booking_id') IN ('string', 'number');
