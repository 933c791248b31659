# shellcheck shell=bash
# Redis on 127.0.0.1:6379 for the Kombu tests. Sourced by .ci/run.
# It normally runs on the machine already; when it does not answer, start it daemonized and
# record it, so .ci/run stops it at exit. The tests use database 9 and names of their own.
if ! answers 6379; then
  echo "redis is down: starting it"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log --pidfile "$LOGS/redis.pid" >>"$LOGS/redis.log" 2>&1
  wait_port redis 6379 30
  started "$(cat "$LOGS/redis.pid")"
fi
wait_port redis 6379 30
export HEDWIG_TEST_REDIS_URL=${HEDWIG_TEST_REDIS_URL:-redis://127.0.0.1:6379/9}
