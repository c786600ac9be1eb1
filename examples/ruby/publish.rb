#!/usr/bin/env ruby
# Publish one SMS job to smsgw, as the web app does, and print the job's id.
#
#   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f ruby publish.rb \
#     --school 42 --to +447700900123 --type login_code --body "Your code is 4711"
#
# Exits 1, saying why, when the broker did not take the job: then it was not published.
# Needs bunny (Debian: ruby-bunny; RubyGems: bunny).
require "bunny"
require "json"
require "optparse"
require "securerandom"

args = {}
parser = OptionParser.new do |o|
  o.banner = "usage: publish.rb --school ID --to NUMBER --type TYPE --body TEXT [--id UUID] [--context JSON]"
  o.on("--school ID", Integer, "the school's id")
  o.on("--to NUMBER", "E.164 or the school's national format")
  o.on("--type TYPE", "login_code, booking_reminder, ...")
  o.on("--body TEXT", "the text, 1 to 1,600 characters")
  o.on("--id UUID", "the job's id, to publish a job again (default: a new one)")
  o.on("--context JSON", "a JSON object smsgw sends back in the job's events")
end
parser.parse!(into: args)
missing = %i[school to type body].reject { |name| args[name] }
abort("#{parser.banner} (--#{missing.first} is missing)") unless missing.empty?

# The id is the idempotency key: smsgw texts one id at most once. Keep it with whatever the
# text is about (the booking, the login attempt) and publish the same id to retry.
job = {
  id: args[:id] || SecureRandom.uuid,
  type: args[:type],
  school_id: args[:school],
  to: args[:to],
  body: args[:body],
}
job[:context] = JSON.parse(args[:context]) if args[:context]

connection = Bunny.new(ENV.fetch("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
connection.start
begin
  channel = connection.create_channel
  # Publisher confirms: the broker acks each message once it has taken it, or nacks it.
  channel.confirm_select
  # sms.jobs is smsgw's: passive only checks that it exists (it never declares it).
  exchange = channel.topic("sms.jobs", passive: true)
  returned = false
  # With mandatory below, a job no queue would take comes back here before its ack.
  exchange.on_return { returned = true }
  exchange.publish(
    JSON.generate(job),
    routing_key: job[:type], # the routing key is the job's type
    mandatory: true,
    persistent: true, # the job survives a broker restart
    content_type: "application/json",
    message_id: job[:id],
    # When it was published: a job without expires_at (a login code) expires its type's
    # default time (15 minutes) after this, so it is never sent late.
    timestamp: Time.now.to_i,
  )
  acked = channel.wait_for_confirms # false when the broker nacked it
  abort("publish failed: the job was returned unroutable (is smsgw's topology declared?)") if returned
  abort("publish failed: the broker nacked the job") unless acked
rescue Bunny::Exception => e
  abort("publish failed: #{e.message}")
ensure
  connection.close
end
puts job[:id]
