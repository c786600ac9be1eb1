#!/usr/bin/env python3
"""Publish one SMS job to smsgw, as the web app does, and print the job's id.

    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f python3 publish.py \
        --school 42 --to +447700900123 --type login_code --body "Your code is 4711"

Exits 1, saying why, when the broker did not take the job: then it was not published.
Needs pika (Debian: python3-pika; PyPI: pika).
"""

import argparse
import json
import os
import sys
import time
import uuid

import pika

parser = argparse.ArgumentParser(description="Publish one SMS job to smsgw.")
parser.add_argument("--school", type=int, required=True, help="the school's id")
parser.add_argument("--to", required=True, help="E.164 or the school's national format")
parser.add_argument("--type", required=True, help="login_code, booking_reminder, ...")
parser.add_argument("--body", required=True, help="the text, 1 to 1,600 characters")
parser.add_argument("--id", help="the job's id, to publish a job again (default: a new one)")
parser.add_argument("--context", help="a JSON object smsgw sends back in the job's events")
args = parser.parse_args()

# The id is the idempotency key: smsgw texts one id at most once. Keep it with whatever the
# text is about (the booking, the login attempt) and publish the same id to retry.
job = {
    "id": args.id or str(uuid.uuid4()),
    "type": args.type,
    "school_id": args.school,
    "to": args.to,
    "body": args.body,
}
if args.context:
    job["context"] = json.loads(args.context)

url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
# Publisher confirms: basic_publish now waits until the broker has taken the job, and
# raises if it refused it (a nack) or, with mandatory=True, if no queue would take it.
channel.confirm_delivery()
try:
    channel.basic_publish(
        exchange="sms.jobs",  # declared by smsgw: publish to it, never declare it
        routing_key=job["type"],  # the routing key is the job's type
        body=json.dumps(job),
        properties=pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,  # persistent: the job survives a broker restart
            message_id=job["id"],
            # When it was published: a job without expires_at (a login code) expires
            # its type's default time (15 minutes) after this, so it is never sent late.
            timestamp=int(time.time()),
        ),
        mandatory=True,
    )
except pika.exceptions.UnroutableError:
    sys.exit("publish failed: the job was returned unroutable (is smsgw's topology declared?)")
except pika.exceptions.NackError:
    sys.exit("publish failed: the broker nacked the job")
finally:
    connection.close()
print(job["id"])
