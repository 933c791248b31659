"""A Django project configured for Hedwig exactly as Hedwig's quick start lists (plus the bus URL)."""

from __future__ import annotations

import os
from pathlib import Path

SECRET_KEY = "test-only"
INSTALLED_APPS = ["django.contrib.contenttypes", "hedwig_tasks.django.HedwigTasksConfig", "apps.django_project.shop"]
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
USE_TZ = True

HEDWIG_QUEUE = "DEV-SHOP"
HEDWIG_PUBLISHER = "shop"
HEDWIG_JSONSCHEMA_FILE = str(Path(__file__).parent.parent.parent / "schemas" / "schema.json")
HEDWIG_CALLBACKS = {("send_email", "1.*"): "apps.hedwig_callbacks.send_email"}
HEDWIG_MESSAGE_ROUTING = {("send_email", "1.*"): "send-email-v1", ("user-created", "1.*"): "user-created-v1"}
HEDWIG_TRANSPORT_URL = os.environ["HEDWIG_TEST_BUS_URL"]
