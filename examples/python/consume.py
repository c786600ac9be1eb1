#!/usr/bin/env python3
"""Hear what became of the texts: a queue of the web app's own, bound to sms.events.

    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f QUEUE=webapp.sms-events \
        python3 consume.py [--max-events N] [--timeout SECONDS]

Prints one line per event handled; runs until stopped, N events or the timeout.
Needs pika (Debian: python3-pika; PyPI: pika).
"""

import argparse
import json
import os
import sys
import time

import pika

# Every final status, then a student's reply and a job smsgw could not read. Binding only
# "*.failed" would miss the texts that were suppressed (opted out, SMS disabled), expired
# or undelivered: they did not reach the student either.
BINDINGS = [
    "*.delivered",
    "*.failed",
    "*.undelivered",
    "*.suppressed",
    "*.expired",
    "*.cancelled",
    "reply.received",
    "job.rejected",
]

parser = argparse.ArgumentParser(description="Print the events smsgw publishes.")
parser.add_argument("--max-events", type=int, help="stop after handling this many")
parser.add_argument("--timeout", type=float, help="stop after this many seconds")
args = parser.parse_args()

url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
queue = os.environ.get("QUEUE", "webapp.sms-events")
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
# Durable, and a quorum queue as smsgw's own are: events wait here while the web app is
# down. An event published while no queue is bound is lost, so bind before publishing jobs.
channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
for key in BINDINGS:
    channel.queue_bind(queue, "sms.events", routing_key=key)  # sms.events: smsgw's
channel.basic_qos(prefetch_count=50)
print(f"listening on {queue}", file=sys.stderr, flush=True)

# In the web app these live in the database: event_id as a unique key, and the seq of the
# last status stored beside the message.
seen_events = set()
last_seq = {}


def handle(key, event):
    """The line to print for an event, or None for one to ignore."""
    if event["event_id"] in seen_events:
        return None  # at least once: a copy of an event already handled
    seen_events.add(event["event_id"])
    if key == "reply.received":
        # job_id is null when smsgw found no message the reply answers: match "from".
        return f"{key} job={event['job_id']} from={event['from']} body={event['body']}"
    if key == "job.rejected":
        return f"{key} job={event['job_id']} error={event['error']}"
    # A status: events may arrive out of order; a lower seq is older news.
    if event["seq"] <= last_seq.get(event["message_id"], 0):
        return None
    last_seq[event["message_id"]] = event["seq"]
    return (
        f"{key} job={event['job_id']} message={event['message_id']} "
        f"seq={event['seq']} reason={event['reason']}"
    )


handled = 0
deadline = time.monotonic() + args.timeout if args.timeout else None
for method, _properties, body in channel.consume(queue, inactivity_timeout=0.5):
    if method is not None:
        line = handle(method.routing_key, json.loads(body))
        if line:
            print(line, flush=True)
            handled += 1
        channel.basic_ack(method.delivery_tag)  # only once handled
    if args.max_events and handled >= args.max_events:
        break
    if deadline and time.monotonic() > deadline:
        break
channel.cancel()
connection.close()
