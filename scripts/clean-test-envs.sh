#!/usr/bin/env bash
# Removes the vhosts, databases, roles and cluster nodes that test runs left behind when they
# were killed (a test removes its own when it ends normally). Run before a test run, not
# during one.
set -uo pipefail
if command -v rabbitmqctl >/dev/null; then
    rabbitmqctl list_vhosts --quiet 2>/dev/null | grep '^smsgw_test_' | while read -r vhost; do
        rabbitmqctl delete_vhost --quiet "$vhost" >/dev/null 2>&1
    done
fi
if command -v psql >/dev/null; then
    url=${SMSGW_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/smsgw}
    admin=${url%/*}/postgres
    psql "$admin" -tAc "SELECT datname FROM pg_database WHERE datname LIKE 'smsgw_test_%'" 2>/dev/null |
        while read -r db; do
            psql "$admin" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1
        done
    # The roles of tests of deploy/postgresql/roles.sql: their grants went with the
    # databases above.
    psql "$admin" -tAc "SELECT rolname FROM pg_roles WHERE rolname LIKE 'smsgw\\_test\\_%'" 2>/dev/null |
        while read -r role; do
            psql "$admin" -qc "DROP ROLE IF EXISTS \"$role\"" >/dev/null 2>&1
        done
fi
# The RabbitMQ nodes and directories of test clusters (tests/cluster.rs) whose test
# process is gone; their names carry that process's id.
orphaned() { ! kill -0 "$1" 2>/dev/null; }
pgrep -af 'smsgw-cluster-[0-9]+-[0-9]+@localhost' 2>/dev/null | while read -r pid args; do
    owner=$(grep -oE 'smsgw-cluster-[0-9]+-' <<<"$args" | head -1 | tr -dc '0-9')
    if [ -n "$owner" ] && orphaned "$owner"; then kill -9 "$pid" 2>/dev/null; fi
done
for dir in "${TMPDIR:-/tmp}"/smsgw-cluster-*; do
    [ -d "$dir" ] || continue
    owner=$(basename "$dir" | cut -d- -f3)
    if [ -n "$owner" ] && orphaned "$owner"; then rm -rf "$dir"; fi
done
exit 0
