"""The Django project's settings: Hedwig's settings, as a Hedwig service has them, plus the bus."""

from __future__ import annotations

import os
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = True
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "hedwig_tasks.django.HedwigTasksConfig",  # builds the app at start-up; discovers handlers.py
    "shop",
]
# No models here: an in-memory database is enough for transaction.atomic() and on_commit.
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}

HEDWIG_QUEUE = "SHOP"
HEDWIG_PUBLISHER = "shop"
HEDWIG_JSONSCHEMA_FILE = str(BASE_DIR / "schema.json")
HEDWIG_MESSAGE_ROUTING = {
    ("order-placed", "1.*"): "order-placed-v1",
    ("send_receipt", "1.*"): "send-receipt-v1",
}
# The embedded bus for this example; in production an aws:// or gcp:// URL, or Hedwig's
# HEDWIG_CONSUMER_BACKEND / HEDWIG_PUBLISHER_BACKEND with the AWS_* or GOOGLE_* settings.
HEDWIG_TRANSPORT_URL = os.environ.get("HEDWIG_TRANSPORT_URL", f"sqlite:///{BASE_DIR / '.hedwig' / 'bus.db'}")
