"""A Hedwig project's settings, as Hedwig's quick start lists them (read by the settings tests)."""

from __future__ import annotations

import os
from pathlib import Path

HEDWIG_QUEUE = "DEV-MYAPP"
HEDWIG_PUBLISHER = "myapp"
HEDWIG_JSONSCHEMA_FILE = str(Path(__file__).parent.parent / "schemas" / "schema.json")
HEDWIG_CALLBACKS = {("send_email", "1.*"): "apps.hedwig_callbacks.send_email"}
HEDWIG_MESSAGE_ROUTING = {("send_email", "1.*"): "send-email-v1"}
HEDWIG_TRANSPORT_URL = os.environ.get("HEDWIG_TEST_BUS_URL")
