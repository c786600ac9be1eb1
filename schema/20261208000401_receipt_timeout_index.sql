-- smsgw:no-transaction
-- The walk of accepted attempts in the order they started (see 20261208000400). Only
-- accepted attempts are in it; setting an attempt's outcome already writes an index entry
-- (its provider message id), so the messages' own updates stay in place (HOT) and an
-- attempt costs one small entry more.
--
-- Built CONCURRENTLY, so the daemon goes on writing meanwhile. A build cut off leaves an
-- invalid index behind: drop it first, so this file can run again.
DROP INDEX CONCURRENTLY IF EXISTS sms_attempts_accepted;
CREATE INDEX CONCURRENTLY sms_attempts_accepted
    ON sms_attempts (started_at, message_id) WHERE outcome = 'sent';
