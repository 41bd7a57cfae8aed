-- The sink's two PostgreSQL roles, run once by a superuser in the sink's database (the
-- TimescaleDB image runs it at initialisation: 100-sink-roles.sh).  psql variables:
--   owner_role, owner_password    owns the schema and what migrations create; runs `migrate`
--   writer_role, writer_password  the running sink and `sink-dlq replay`
--   schema                        TIMESCALE_SCHEMA
-- Safe to run again: missing roles are created, passwords set, grants repeated.
--
-- The writer's privileges on the tables come from `kafka-timescale-sink migrate` run as the
-- owner with TIMESCALE_WRITER_ROLE set (the tables do not exist yet); what is granted here is
-- what the owner cannot grant: the database-level privileges.
\set ON_ERROR_STOP on

SELECT format('CREATE ROLE %I', :'owner_role')
WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = :'owner_role') \gexec
SELECT format('CREATE ROLE %I', :'writer_role')
WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = :'writer_role') \gexec

-- Neither may create roles, databases or bypass row security; both log in with a password.
ALTER ROLE :"owner_role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'owner_password';
ALTER ROLE :"writer_role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'writer_password';

-- The owner's schema.  Also made the owner's when it exists already (a re-run after the
-- schema was created some other way).
CREATE SCHEMA IF NOT EXISTS :"schema" AUTHORIZATION :"owner_role";
ALTER SCHEMA :"schema" OWNER TO :"owner_role";

-- CONNECT for both; TEMPORARY for the writer's per-batch staging table.
SELECT format('GRANT CONNECT ON DATABASE %I TO %I, %I', current_database(), :'owner_role', :'writer_role') \gexec
SELECT format('GRANT TEMPORARY ON DATABASE %I TO %I', current_database(), :'writer_role') \gexec
