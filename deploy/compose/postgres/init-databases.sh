#!/bin/sh
# Creates the bridge's and Synapse's roles and databases. Mounted into
# /docker-entrypoint-initdb.d/ by docker-compose.yml: the postgres image runs it once, as
# the superuser, when the data directory is empty. Passwords come from postgres.env.
set -eu

: "${BRIDGE_DB_PASSWORD:?set BRIDGE_DB_PASSWORD in postgres.env}"
: "${SYNAPSE_DB_PASSWORD:?set SYNAPSE_DB_PASSWORD in postgres.env}"

# psql variables (:'name') quote the passwords; the quoted here-document keeps the shell
# from touching them.
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
     -v bridge_password="$BRIDGE_DB_PASSWORD" -v synapse_password="$SYNAPSE_DB_PASSWORD" <<'SQL'
CREATE ROLE civic_bridge LOGIN PASSWORD :'bridge_password';
CREATE DATABASE civic_bridge OWNER civic_bridge;
CREATE ROLE synapse LOGIN PASSWORD :'synapse_password';
-- Synapse requires C collation and ctype.
CREATE DATABASE synapse OWNER synapse ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;
SQL
