#!/usr/bin/env node
// Publish one SMS job to smsgw, as the web app does, and print the job's id.
//
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f node publish.js \
//     --school 42 --to +447700900123 --type login_code --body "Your code is 4711"
//
// Exits 1, saying why, when the broker did not take the job: then it was not published.
// Needs amqplib (npm ci in this folder).
const { randomUUID } = require('node:crypto');
const { parseArgs } = require('node:util');
const amqp = require('amqplib');

const text = { type: 'string' };
const { values: args } = parseArgs({
  // --id: to publish a job again (default: a new one); --context: a JSON object smsgw
  // sends back in the job's events.
  options: { school: text, to: text, type: text, body: text, id: text, context: text },
});
for (const name of ['school', 'to', 'type', 'body']) {
  if (!args[name]) {
    console.error(`usage: publish.js --school ID --to NUMBER --type TYPE --body TEXT [--id UUID] [--context JSON] (--${name} is missing)`);
    process.exit(2);
  }
}

// The id is the idempotency key: smsgw texts one id at most once. Keep it with whatever the
// text is about (the booking, the login attempt) and publish the same id to retry.
const job = {
  id: args.id || randomUUID(),
  type: args.type,
  school_id: Number(args.school),
  to: args.to,
  body: args.body,
};
if (args.context) job.context = JSON.parse(args.context);

async function main() {
  const connection = await amqp.connect(process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f');
  try {
    // A confirm channel: the broker acks each message once it has taken it, or nacks it.
    const channel = await connection.createConfirmChannel();
    let failure = null;
    channel.on('error', (err) => { failure = err; }); // e.g. no exchange sms.jobs
    // With mandatory below, a job no queue would take comes back here before its ack.
    channel.on('return', () => { failure = new Error('the job was returned unroutable (is smsgw\'s topology declared?)'); });
    channel.publish('sms.jobs', job.type, Buffer.from(JSON.stringify(job)), {
      mandatory: true,
      persistent: true, // the job survives a broker restart
      contentType: 'application/json',
      messageId: job.id,
      // When it was published: a job without expires_at (a login code) expires its type's
      // default time (15 minutes) after this, so it is never sent late.
      timestamp: Math.floor(Date.now() / 1000),
    });
    // Rejects when the broker nacked the job or the channel closed before its ack.
    await channel.waitForConfirms().catch((err) => { failure = failure || err; });
    if (failure) throw failure;
  } finally {
    await connection.close().catch(() => {});
  }
  console.log(job.id);
}

main().catch((err) => {
  console.error(`publish failed: ${err.message}`);
  process.exit(1);
});
