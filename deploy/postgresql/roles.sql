-- smsgw's database roles: a NOLOGIN group role for each kind of user, with the grants it
-- needs on smsgw's tables. You then grant a group to each login:
--
--   CREATE ROLE smsgw_app LOGIN PASSWORD '...';  GRANT smsgw_daemon TO smsgw_app;
--   CREATE ROLE alice LOGIN PASSWORD '...';      GRANT smsgw_support TO alice;
--
-- Run it with psql, connected to smsgw's database, after `smsgw migrate`, as a superuser or
-- as the tables' owner if that role may create roles:
--
--   psql -v ON_ERROR_STOP=1 -f deploy/postgresql/roles.sql 'postgres://admin@db/smsgw'
--
-- Not a migration: role names are the operator's to choose (one set per database, say,
-- when staging and production share a server), roles belong to the whole server rather
-- than to smsgw's database, and the owner `smsgw migrate` runs as need not be allowed to
-- create them. Give other names with -v (each has a default):
--
--   -v daemon=NAME   smsgw_daemon   the daemon and ops' tools: reads and writes every table
--   -v webapp=NAME   smsgw_webapp   the web app: writes sms_school_settings and
--                                  sms_opt_outs, reads the message log
--   -v support=NAME  smsgw_support  support: reads every table (smsgw status, replies, usage)
--   -v billing=NAME  smsgw_billing  billing: reads sms_messages and the budgets (smsgw usage)
--
-- Running it again changes nothing that is already in place, so run it after every upgrade:
-- the daemon's and support's grants reach tables later migrations add by themselves
-- (default privileges of the tables' owner), the web app's and billing's name their
-- tables. Details: docs/operations.md, "Database roles".

\set ON_ERROR_STOP on
\if :{?daemon}
\else
\set daemon smsgw_daemon
\endif
\if :{?webapp}
\else
\set webapp smsgw_webapp
\endif
\if :{?support}
\else
\set support smsgw_support
\endif
\if :{?billing}
\else
\set billing smsgw_billing
\endif

-- The database, and the owner of its tables (whoever ran `smsgw migrate`).
SELECT current_database() AS dbname,
       (SELECT tableowner FROM pg_tables
         WHERE schemaname = 'public' AND tablename = 'sms_messages') AS owner
\gset
\if :{?owner}
\else
\echo 'roles.sql: no sms_messages table here: run smsgw migrate on this database first'
\quit
\endif

-- The group roles, where they do not exist yet.
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'daemon') AS create_daemon,
       NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'webapp') AS create_webapp,
       NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'support') AS create_support,
       NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'billing') AS create_billing
\gset
\if :create_daemon
CREATE ROLE :"daemon" NOLOGIN;
\endif
\if :create_webapp
CREATE ROLE :"webapp" NOLOGIN;
\endif
\if :create_support
CREATE ROLE :"support" NOLOGIN;
\endif
\if :create_billing
CREATE ROLE :"billing" NOLOGIN;
\endif

BEGIN;

GRANT CONNECT ON DATABASE :"dbname" TO :"daemon", :"webapp", :"support", :"billing";
GRANT USAGE ON SCHEMA public TO :"daemon", :"webapp", :"support", :"billing";

-- The daemon (and smsgw's tools: dlq, status, check, send) reads and writes every table;
-- the triggers on sms_messages write sms_events as the daemon. No DDL: `smsgw migrate`
-- runs as the owner (in development `smsgw run` migrates, so it runs as the owner there).
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"daemon";
GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO :"daemon";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"daemon";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO :"daemon";

-- The web app writes the schools' settings and the opt-outs, and reads the log.
GRANT SELECT, INSERT, UPDATE, DELETE ON sms_school_settings, sms_opt_outs TO :"webapp";
GRANT USAGE ON SEQUENCE sms_opt_outs_id_seq TO :"webapp";
GRANT SELECT ON sms_messages, sms_attempts, sms_replies TO :"webapp";

-- Support reads everything and writes nothing: `smsgw status`, `smsgw replies` and
-- `smsgw usage` only read.
GRANT SELECT ON ALL TABLES IN SCHEMA public TO :"support";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner" IN SCHEMA public
    GRANT SELECT ON TABLES TO :"support";

-- Billing reads what `smsgw usage` shows and nothing else: the message log's rows it
-- counts, and each school's monthly budget beside its use.
GRANT SELECT ON sms_messages, sms_school_settings, sms_guard_budgets TO :"billing";

COMMIT;
