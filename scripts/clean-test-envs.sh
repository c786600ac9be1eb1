#!/usr/bin/env bash
# Removes the vhosts, databases and cluster nodes that test runs left behind when they
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
fi
# The RabbitMQ nodes of test clusters (tests/cluster.rs) whose test was killed.
pkill -9 -f 'smsgw-cluster-[0-9]+-[0-9]+@localhost' 2>/dev/null
rm -rf "${TMPDIR:-/tmp}"/smsgw-cluster-* 2>/dev/null
exit 0
