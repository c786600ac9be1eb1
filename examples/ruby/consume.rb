#!/usr/bin/env ruby
# Hear what became of the texts: a queue of the web app's own, bound to sms.events.
#
#   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f QUEUE=webapp.sms-events \
#     ruby consume.rb [--max-events N] [--timeout SECONDS]
#
# Prints one line per event handled; runs until stopped, N events or the timeout.
# Needs bunny (Debian: ruby-bunny; RubyGems: bunny).
require "bunny"
require "json"
require "optparse"
require "set"

# Every final status, then a student's reply and a job smsgw could not read. Binding only
# "*.failed" would miss the texts that were suppressed (opted out, SMS disabled), expired
# or undelivered: they did not reach the student either.
BINDINGS = %w[
  *.delivered *.failed *.undelivered *.suppressed *.expired *.cancelled reply.received
  job.rejected
].freeze

args = {}
OptionParser.new do |o|
  o.on("--max-events N", Integer, "stop after handling this many")
  o.on("--timeout SECONDS", Float, "stop after this many seconds")
end.parse!(into: args)

# In the web app these live in the database: event_id as a unique key, and the seq of the
# last status stored beside the message.
seen_events = Set.new
last_seq = Hash.new(0)

# The line to print for an event, or nil for one to ignore.
handle = lambda do |key, event|
  return nil unless seen_events.add?(event["event_id"]) # at least once: a copy
  case key
  when "reply.received"
    # job_id is null when smsgw found no message the reply answers: match "from".
    "#{key} job=#{event['job_id']} from=#{event['from']} body=#{event['body']}"
  when "job.rejected"
    "#{key} job=#{event['job_id']} error=#{event['error']}"
  else
    # A status: events may arrive out of order; a lower seq is older news.
    return nil if event["seq"] <= last_seq[event["message_id"]]
    last_seq[event["message_id"]] = event["seq"]
    "#{key} job=#{event['job_id']} message=#{event['message_id']} " \
      "seq=#{event['seq']} reason=#{event['reason']}"
  end
end

connection = Bunny.new(ENV.fetch("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
connection.start
channel = connection.create_channel
channel.prefetch(50)
# Durable, and a quorum queue as smsgw's own are: events wait here while the web app is
# down. An event published while no queue is bound is lost, so bind before publishing jobs.
queue = channel.queue(ENV.fetch("QUEUE", "webapp.sms-events"),
                      durable: true, arguments: { "x-queue-type" => "quorum" })
BINDINGS.each { |key| queue.bind("sms.events", routing_key: key) } # sms.events: smsgw's
warn "listening on #{queue.name}"
$stdout.sync = true

handled = 0
done = Queue.new
# Deliveries are handled one at a time, on bunny's consumer thread.
consumer = queue.subscribe(manual_ack: true) do |delivery, _properties, body|
  next if handled == args[:"max-events"] # stopping: back to the queue on close
  line = handle.call(delivery.routing_key, JSON.parse(body))
  if line
    puts line
    handled += 1
  end
  channel.ack(delivery.delivery_tag) # only once handled
  done << :enough if handled == args[:"max-events"]
end
Thread.new { sleep args[:timeout]; done << :timeout } if args[:timeout]
done.pop
consumer.cancel
connection.close
