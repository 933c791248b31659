"""Hedwig settings for Google Pub/Sub, as a Hedwig (authedwig) service writes them.

Credentials come from GOOGLE_APPLICATION_CREDENTIALS or Google's default chain; with
PUBSUB_EMULATOR_HOST set (the emulator), none are used.
"""

from __future__ import annotations

import os
from pathlib import Path

HEDWIG_QUEUE = os.environ.get("ORDERS_QUEUE", "dev-orders")  # subscriptions hedwig-dev-orders-<topic>
HEDWIG_PUBLISHER = "orders"
HEDWIG_JSONSCHEMA_FILE = str(Path(__file__).with_name("schema.json"))
HEDWIG_CALLBACKS = {("order-placed", "1.*"): "callbacks.order_placed"}
HEDWIG_MESSAGE_ROUTING = {("order-placed", "1.*"): "order-placed-v1"}  # topic hedwig-order-placed-v1
HEDWIG_SUBSCRIPTIONS = ["order-placed-v1"]
HEDWIG_CONSUMER_BACKEND = "hedwig.backends.gcp.GooglePubSubConsumerBackend"
HEDWIG_PUBLISHER_BACKEND = "hedwig.backends.gcp.GooglePubSubPublisherBackend"

GOOGLE_CLOUD_PROJECT = os.environ.get("GOOGLE_CLOUD_PROJECT", "hedwig-example")
PUBSUB_EMULATOR_HOST = os.environ.get("PUBSUB_EMULATOR_HOST")  # the emulator locally; unset in production
