#!/usr/bin/env node
// Hear what became of the texts: a queue of the web app's own, bound to sms.events.
//
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f QUEUE=webapp.sms-events \
//     node consume.js [--max-events N] [--timeout SECONDS]
//
// Prints one line per event handled; runs until stopped, N events or the timeout.
// Needs amqplib (npm ci in this folder).
const { parseArgs } = require('node:util');
const amqp = require('amqplib');

// Every final status, then a student's reply and a job smsgw could not read. Binding only
// "*.failed" would miss the texts that were suppressed (opted out, SMS disabled), expired
// or undelivered: they did not reach the student either.
const BINDINGS = [
  '*.delivered', '*.failed', '*.undelivered', '*.suppressed', '*.expired', '*.cancelled',
  'reply.received', 'job.rejected',
];

const { values: args } = parseArgs({
  options: { 'max-events': { type: 'string' }, timeout: { type: 'string' } },
});
const maxEvents = Number(args['max-events'] || 0);
const queue = process.env.QUEUE || 'webapp.sms-events';

// In the web app these live in the database: event_id as a unique key, and the seq of the
// last status stored beside the message.
const seenEvents = new Set();
const lastSeq = new Map();

// The line to print for an event, or null for one to ignore.
function handle(key, event) {
  if (seenEvents.has(event.event_id)) return null; // at least once: a copy already handled
  seenEvents.add(event.event_id);
  if (key === 'reply.received') {
    // job_id is null when smsgw found no message the reply answers: match "from".
    return `${key} job=${event.job_id} from=${event.from} body=${event.body}`;
  }
  if (key === 'job.rejected') return `${key} job=${event.job_id} error=${event.error}`;
  // A status: events may arrive out of order; a lower seq is older news.
  if (event.seq <= (lastSeq.get(event.message_id) || 0)) return null;
  lastSeq.set(event.message_id, event.seq);
  return `${key} job=${event.job_id} message=${event.message_id} seq=${event.seq} reason=${event.reason}`;
}

async function main() {
  const connection = await amqp.connect(process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f');
  const channel = await connection.createChannel();
  // Durable, and a quorum queue as smsgw's own are: events wait here while the web app is
  // down. An event published while no queue is bound is lost, so bind before publishing jobs.
  await channel.assertQueue(queue, { durable: true, arguments: { 'x-queue-type': 'quorum' } });
  for (const key of BINDINGS) await channel.bindQueue(queue, 'sms.events', key); // smsgw's
  await channel.prefetch(50);
  console.error(`listening on ${queue}`);

  let handled = 0;
  let stopping = false;
  // The channel first: its acks are sent before it closes. Deliveries not acked go back
  // to the queue.
  const stop = () => {
    stopping = true;
    channel.close().then(() => connection.close()).catch(() => {});
  };
  if (args.timeout) setTimeout(stop, Number(args.timeout) * 1000).unref();
  await channel.consume(queue, (message) => {
    if (stopping || message === null) return;
    const line = handle(message.fields.routingKey, JSON.parse(message.content.toString()));
    if (line) {
      console.log(line);
      handled += 1;
    }
    channel.ack(message); // only once handled
    if (maxEvents && handled >= maxEvents) stop();
  });
}

main().catch((err) => {
  console.error(`consume failed: ${err.message}`);
  process.exit(1);
});
