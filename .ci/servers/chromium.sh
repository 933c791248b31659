# shellcheck shell=bash
# Chromium for the dashboard's browser tests (tests/test_dashboard.py), driven by Playwright with
# its executable path pointing here: `playwright install` cannot download browsers on CI. Sourced
# by .ci/run. Debian's package is installed when missing (apt-get update first if that fails).
CHROMIUM=${HEDWIG_TEST_CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  echo "chromium is missing: installing Debian's package"
  if ! apt-get install -y -q chromium >>"$LOGS/chromium.log" 2>&1; then
    apt-get update -q >>"$LOGS/chromium.log" 2>&1
    apt-get install -y -q chromium >>"$LOGS/chromium.log" 2>&1 || {
      echo "installing chromium failed; its log:" >&2
      tail -n 40 "$LOGS/chromium.log" >&2
      return 1
    }
  fi
fi
"$CHROMIUM" --version
export HEDWIG_TEST_CHROMIUM=$CHROMIUM
