#!/bin/sh
# Runs once, when the PostgreSQL data volume is first initialised (docker-entrypoint-initdb.d).
# Creates the `platform` database whose tables Debezium captures and the `debezium` role with
# REPLICATION (logical decoding needs wal_level=logical, set on the server's command line).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE ROLE debezium WITH LOGIN REPLICATION PASSWORD '${DEBEZIUM_PASSWORD}';
CREATE DATABASE platform OWNER ${POSTGRES_USER};
SQL
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname platform <<SQL
GRANT CREATE ON DATABASE platform TO debezium;  -- publication.autocreate.mode=filtered creates the publication
GRANT USAGE ON SCHEMA public TO debezium;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO debezium;
SQL
