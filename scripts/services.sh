#!/usr/bin/env bash
# Starts the local RabbitMQ and PostgreSQL if they are not answering, and waits until both
# accept connections. Does nothing when they already run (or when they are not local).
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if ! port_open 5432; then
    echo "services: starting PostgreSQL"
    cluster=$(ls /etc/postgresql | sort -V | tail -n 1)
    pg_ctlcluster --skip-systemctl-redirect "$cluster" main start
fi
if ! port_open 5672; then
    echo "services: starting RabbitMQ"
    rabbitmq-server -detached
fi

for _ in $(seq 1 120); do
    if port_open 5432 && port_open 5672; then
        # The port opens before RabbitMQ's applications have booted.
        if command -v rabbitmqctl >/dev/null; then
            rabbitmqctl await_startup --timeout 60 >/dev/null 2>&1 || true
        fi
        exit 0
    fi
    sleep 0.5
done
echo "services: RabbitMQ (5672) or PostgreSQL (5432) did not come up" >&2
exit 1
