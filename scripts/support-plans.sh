#!/usr/bin/env bash
# The query plans of the support lookups and of `smsgw usage` on a large message log
# (docs/operations.md, "Query plans"). Builds a scratch database of ROWS messages (default
# 20 million, 180 days, as SMSGW_LOG_RETENTION keeps), times the support-lookups
# migration on it, then prints EXPLAIN (ANALYZE, BUFFERS) of each query smsgw runs.
#
#   scripts/support-plans.sh [ROWS]      # build, time the migration, explain
#   scripts/support-plans.sh explain     # explain again on the database built before
#
# The database is PLANS_DATABASE (default smsgw_plans).
#
# Connects with psql's usual variables (PGHOST, PGUSER, ...; default 127.0.0.1, postgres).
# PLANS_INSERT_COST=0 leaves out the measure of what the context index costs an insert.
# Needs about half a GB of disk per million rows. The database is dropped first and kept
# afterwards, for more EXPLAINs; drop it when done.
set -euo pipefail

rows=${1:-20000000}
[[ $rows == explain ]] && rows=0
db=${PLANS_DATABASE:-smsgw_plans}
export PGHOST=${PGHOST:-127.0.0.1} PGUSER=${PGUSER:-postgres}
cd "$(dirname "$0")/.."
lookups=schema/20261204000005_support_lookups.sql

run() { psql -q -v ON_ERROR_STOP=1 -d "$db" "$@"; }

# Builds the scratch database and times the migration on it.
build() {
    psql -q -d postgres -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"

    # The schema as the daemon has it before the support lookups: every earlier migration.
    for file in schema/*.sql; do
        [[ $file < $lookups ]] && run -f "$file"
    done

    echo "loading $rows messages"
    run <<SQL
SET smsgw.events = 'off';          -- no status events for the load
SET maintenance_work_mem = '512MB';
-- Load without the secondary indexes, then build them again as they were.
CREATE TABLE saved_indexes AS
    SELECT indexdef FROM pg_indexes
    WHERE tablename = 'sms_messages' AND indexname <> 'sms_messages_pkey';
DO \$\$ DECLARE i record; BEGIN
    FOR i IN SELECT indexname FROM pg_indexes
             WHERE tablename = 'sms_messages' AND indexname <> 'sms_messages_pkey' LOOP
        EXECUTE 'DROP INDEX ' || quote_ident(i.indexname);
    END LOOP;
END \$\$;

-- In created_at order, as the daemon appends them. 2,000 schools, the first ones busiest;
-- a million recipients; 5 million bookings with a few texts each (a tenth of them with
-- the id as a string); announcements in runs of 500 recipients; bodies purged after 30
-- days; statuses roughly as production has them.
INSERT INTO sms_messages (id, bulk_id, school_id, type, recipient, body, context, status,
                          reason, provider, provider_message_id, segments, attempts,
                          created_at, sent_at, delivered_at, updated_at)
SELECT gen_random_uuid(),
       CASE WHEN kind = 'announcement' THEN md5('bulk' || (i / 500))::uuid END,
       school, kind, recipient,
       CASE WHEN at > now() - interval '30 days'
            THEN 'Reminder: driving lesson ' || md5(i::text) || ' with Sam. Reply STOP to opt out.' END,
       CASE kind
           WHEN 'announcement' THEN jsonb_build_object('ref', 'user-' || (random() * 300000)::int)
           WHEN 'login_code' THEN jsonb_build_object('user_id', (random() * 300000)::int)
           ELSE jsonb_build_object(
                    'booking_id', CASE WHEN random() < 0.1 THEN to_jsonb(booking::text)
                                       ELSE to_jsonb(booking) END,
                    'user_id', (random() * 300000)::int)
       END,
       status,
       CASE status WHEN 'suppressed' THEN 'opted_out' WHEN 'failed' THEN 'permanent_failure' END,
       CASE WHEN random() < 0.9 THEN 'twilio' ELSE 'vonage' END,
       CASE WHEN status IN ('sent', 'delivered', 'undelivered') THEN 'SM' || md5(i::text) END,
       CASE WHEN random() < 0.8 THEN 1 WHEN random() < 0.75 THEN 2 ELSE 3 END,
       CASE WHEN status IN ('suppressed', 'expired') THEN 0 ELSE 1 END,
       at,
       CASE WHEN status IN ('sent', 'delivered', 'undelivered') THEN at + interval '1 second' END,
       CASE WHEN status = 'delivered' THEN at + interval '5 seconds' END,
       at + interval '5 seconds'
FROM (
    SELECT i, at, booking,
           1 + (2000 * random() ^ 2)::int AS school,
           '+447700' || lpad((random() * 999999)::int::text, 6, '0') AS recipient,
           CASE WHEN t < 0.35 THEN 'booking_reminder' WHEN t < 0.55 THEN 'booking_confirmation'
                WHEN t < 0.63 THEN 'booking_change' WHEN t < 0.68 THEN 'booking_cancellation'
                WHEN t < 0.93 THEN 'announcement' ELSE 'login_code' END AS kind,
           CASE WHEN at > now() - interval '2 minutes' THEN 'queued'
                WHEN s < 0.78 THEN 'delivered' WHEN s < 0.86 THEN 'sent'
                WHEN s < 0.89 THEN 'failed' WHEN s < 0.91 THEN 'undelivered'
                WHEN s < 0.96 THEN 'suppressed' WHEN s < 0.97 THEN 'expired'
                ELSE 'retrying' END AS status
    FROM (
        SELECT i, random() AS t, random() AS s, (random() * 5000000)::int AS booking,
               now() - interval '180 days' + (i::float8 / $rows) * interval '180 days' AS at
        FROM generate_series(1, $rows) AS i
    ) base
) spread;

DO \$\$ DECLARE i record; BEGIN
    FOR i IN SELECT indexdef FROM saved_indexes LOOP EXECUTE i.indexdef; END LOOP;
END \$\$;
DROP TABLE saved_indexes;
SQL
    run -c "VACUUM ANALYZE sms_messages"

    echo "applying $lookups"
    start=$(date +%s)
    run -f "$lookups"
    echo "took $(($(date +%s) - start)) s"
    run -c "ANALYZE sms_messages"
    run -c "SELECT count(*) AS messages, pg_size_pretty(pg_table_size('sms_messages')) AS heap,
                   pg_size_pretty(pg_indexes_size('sms_messages')) AS indexes,
                   pg_size_pretty(pg_relation_size('sms_messages_context')) AS context_index
            FROM sms_messages"
}
[[ $rows != 0 ]] && build

# A recipient, a booking and a school that the data above holds; and the busiest school.
recipient=$(run -At -c "SELECT recipient FROM sms_messages ORDER BY created_at DESC LIMIT 1")
school=$(run -At -c "SELECT school_id FROM sms_messages WHERE recipient = '$recipient' LIMIT 1")
booking=$(run -At -c "SELECT context->>'booking_id' FROM sms_messages
                      WHERE context ? 'booking_id' ORDER BY created_at DESC LIMIT 1")
busiest=1
echo "recipient ${recipient:0:3}*******${recipient: -3}, school $school, booking $booking"

# The statements as smsgw sends them (src/store/lookups.rs), with their parameters.
explain() {
    echo
    echo "== $1"
    run -c "PREPARE q AS $2" -c "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) EXECUTE q$3"
}
columns="id, bulk_id, school_id, type, recipient, body, context, status, reason, provider,
         provider_message_id, provider_status, error_code, segments, attempts, created_at,
         sent_at, delivered_at, updated_at"
newest='ORDER BY created_at DESC, id DESC'
day="now() - interval '24 hours'"
explain "status --to NUMBER" \
    "SELECT $columns FROM sms_messages WHERE recipient = \$1 $newest LIMIT \$2" \
    "('$recipient', 51)"
explain "status --to NUMBER --school ID --since 24h" \
    "SELECT $columns FROM sms_messages
     WHERE recipient = \$1 AND school_id = \$2 AND created_at >= \$3 $newest LIMIT \$4" \
    "('$recipient', $school, $day, 51)"
explain "status --context booking_id=$booking" \
    "SELECT $columns FROM sms_messages
     WHERE (context @> \$1 OR context @> \$2) $newest LIMIT \$3" \
    "('{\"booking_id\": $booking}', '{\"booking_id\": \"$booking\"}', 51)"
explain "status --school $busiest --since 24h (the busiest school)" \
    "SELECT $columns FROM sms_messages WHERE school_id = \$1 AND created_at >= \$2 $newest LIMIT \$3" \
    "($busiest, $day, 51)"
usage="SELECT school_id, status, count(*) AS messages, COALESCE(sum(segments), 0)::bigint AS segments
       FROM sms_messages WHERE created_at >= \$1 AND created_at < \$2"
month="date_trunc('day', now() - interval '31 days'), date_trunc('day', now() - interval '1 day')"
explain "usage over 30 days, every school" \
    "$usage GROUP BY school_id, status" "($month)"
explain "usage over 30 days, school $busiest (the busiest)" \
    "$usage AND school_id = \$3 GROUP BY school_id, status" "($month, $busiest)"
explain "usage over 30 days, school $school" \
    "$usage AND school_id = \$3 GROUP BY school_id, status" "($month, $school)"

# What the context index costs the daemon's inserts: the same 200,000 rows (the newest
# month's first ones) into two empty copies of the table with its indexes, with and without
# the context index, in statements of 500 rows as the daemon writes them, three times.
message_columns="bulk_id, school_id, type, recipient, body, context, status, reason, provider,
                 provider_message_id, segments, attempts, created_at"
insert_cost() {
    run <<SQL
DROP TABLE IF EXISTS cost_$1;
CREATE TABLE cost_$1 (LIKE sms_messages INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
    WITH (fillfactor = 70);
DO \$\$ DECLARE i record; BEGIN
    FOR i IN SELECT indexdef FROM pg_indexes WHERE tablename = 'sms_messages'
              AND ('$1' = 'with' OR indexname <> 'sms_messages_context') LOOP
        EXECUTE replace(i.indexdef, 'sms_messages', 'cost_$1');
    END LOOP;
END \$\$;
SQL
    # Summed over the statements as the server counts them: the time it spent on each
    # and the WAL each wrote (which other work on the machine does not blur).
    for batch in $(seq 0 399); do
        echo "EXPLAIN (ANALYZE, WAL, COSTS OFF, TIMING OFF) INSERT INTO cost_$1 (id, $message_columns)
              SELECT gen_random_uuid(), $message_columns FROM cost_rows
              WHERE n > $((batch * 500)) AND n <= $((batch * 500 + 500));"
    done | run -At | awk -v index_="$1" -v rows="$(run -At -c "SELECT count(*) FROM cost_rows")" '
        /WAL:/ { for (i = 1; i <= NF; i++) if ($i ~ /^bytes=/) { sub("bytes=", "", $i); wal += $i } }
        /Execution Time:/ { ms += $3 }
        END { printf "insert %d rows, context index %s: %.0f ms, WAL %.1f MB\n",
                     rows, index_, ms, wal / 1048576 }'
    run -c "DROP TABLE cost_$1"
}
if [[ ${PLANS_INSERT_COST:-1} == 1 ]]; then
    echo
    run -c "DROP TABLE IF EXISTS cost_rows" \
        -c "CREATE UNLOGGED TABLE cost_rows AS
            SELECT row_number() OVER (ORDER BY created_at) AS n, $message_columns
            FROM sms_messages WHERE created_at >= now() - interval '30 days'
            ORDER BY created_at LIMIT 200000" \
        -c "CREATE INDEX ON cost_rows (n)" -c "VACUUM ANALYZE cost_rows"
    for round in 1 2 3; do
        insert_cost without
        insert_cost with
    done
    run -c "DROP TABLE cost_rows"
fi
