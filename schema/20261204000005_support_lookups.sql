-- smsgw:no-transaction
-- Support lookups (`smsgw status --context KEY=VALUE`): messages by what the web app
-- attached, e.g. {"booking_id": 981}, found with `context @> ...`. jsonb_path_ops keeps
-- one small entry per key and value (not per key and per value), which is all that
-- containment needs. The other lookups use indexes that exist already: recipient and
-- created_at (`--to`), school_id and created_at (`--school`, usage of one school),
-- created_at (`--since`, usage of every school). `context` never changes after the
-- insert, so the daemon's updates of a message stay in place (HOT).
--
-- Built CONCURRENTLY, so the daemon goes on writing meanwhile. A build cut off leaves an
-- invalid index behind: drop it first, so this file can run again.
DROP INDEX CONCURRENTLY IF EXISTS sms_messages_context;
CREATE INDEX CONCURRENTLY sms_messages_context
    ON sms_messages USING gin (context jsonb_path_ops);
