# shellcheck shell=bash
# RabbitMQ on 127.0.0.1:5672 (guest/guest) for the Kombu tests. Sourced by .ci/run.
# It normally runs on the machine already; when it does not answer, start it detached (it is
# left running afterwards: it is the machine's service, not one this run owns).
if ! answers 5672; then
  echo "rabbitmq is down: starting it"
  rabbitmq-server -detached >>"$LOGS/rabbitmq.log" 2>&1
fi
wait_port rabbitmq 5672 60
# The port answers before the app is up; wait until the broker itself says it runs.
if command -v rabbitmqctl >/dev/null; then
  rabbitmqctl await_startup --timeout 60 >>"$LOGS/rabbitmq.log" 2>&1 || true
fi
export HEDWIG_TEST_AMQP_URL=${HEDWIG_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672//}
