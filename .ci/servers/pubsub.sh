# shellcheck shell=bash
# Google's Pub/Sub emulator (Debian package google-cloud-cli-pubsub-emulator, with its Java) for
# the GCP tests, on a free loopback port. Sourced by .ci/run, which provides free_port, started,
# wait_port and $LOGS. The launcher script execs java (and setsid execs it, not forking, in a
# background job), so the pid recorded with `started` is the JVM itself, which .ci/run's
# cleanup stops; setsid keeps it out of the terminal's process group.
pubsub_launcher=$(dpkg -L google-cloud-cli-pubsub-emulator 2>/dev/null | grep 'bin/cloud-pubsub-emulator$' | head -n 1)
if [ -z "$pubsub_launcher" ]; then
  echo "the Pub/Sub emulator is not installed (apt-get install google-cloud-cli-pubsub-emulator)" >&2
  return 1
fi
pubsub_port=$(free_port)
setsid "$pubsub_launcher" --host=127.0.0.1 --port="$pubsub_port" >"$LOGS/pubsub.log" 2>&1 &
started $!
wait_port pubsub "$pubsub_port" 60
export HEDWIG_TEST_PUBSUB_EMULATOR_HOST="127.0.0.1:$pubsub_port"
