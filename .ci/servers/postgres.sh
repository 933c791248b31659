# shellcheck shell=bash
# PostgreSQL on 127.0.0.1:5432 for the state store's tests. Sourced by .ci/run.
# It runs on the machine (trust auth for local connections, database `test`); this checks that
# it answers and, when it does not, starts the cluster Debian's tools know of (recorded, so
# .ci/run stops it at exit). The tests make schemas of their own and drop only those.
if ! answers 5432; then
  echo "postgresql is down: starting it"
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    read -r pg_version pg_cluster _ < <(pg_lsclusters --no-header | head -n 1)
    pg_ctlcluster "$pg_version" "$pg_cluster" start >>"$LOGS/postgres.log" 2>&1 || true
    pg_pid=$(head -n 1 "/var/run/postgresql/$pg_version-$pg_cluster.pid" 2>/dev/null || true)
    [ -z "$pg_pid" ] || started "$pg_pid"
  fi
fi
wait_port postgres 5432 30
export HEDWIG_TEST_POSTGRES_URL=${HEDWIG_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/test}
# a port that accepts is not yet a server that answers queries (recovery, start-up)
for _ in $(seq 1 50); do
  if pg_isready -q -h 127.0.0.1 -p 5432 -d test 2>/dev/null; then break; fi
  sleep 0.2
done
pg_isready -h 127.0.0.1 -p 5432 -d test
