# shellcheck shell=bash
# needs: venv
# moto_server (PyPI moto[server]) for the SNS/SQS tests: a free loopback port, reached over HTTP.
# Sourced by .ci/run, which provides free_port, started, wait_port and $LOGS.
moto_port=$(free_port)
moto_server -H 127.0.0.1 -p "$moto_port" >"$LOGS/moto.log" 2>&1 &
started $!
wait_port moto "$moto_port" 30
export HEDWIG_TEST_MOTO_URL="http://127.0.0.1:$moto_port"
