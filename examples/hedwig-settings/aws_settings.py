"""Hedwig settings for SNS/SQS, as a Hedwig (authedwig) service writes them.

Credentials come from boto3's usual chain (environment, profile, instance role). Against moto,
set AWS_ENDPOINT_URL (and moto's fake credentials); in production leave it unset.
"""

from __future__ import annotations

import os
from pathlib import Path

HEDWIG_QUEUE = os.environ.get("ORDERS_QUEUE", "DEV-ORDERS")  # SQS queue HEDWIG-DEV-ORDERS and its -DLQ
HEDWIG_PUBLISHER = "orders"
HEDWIG_JSONSCHEMA_FILE = str(Path(__file__).with_name("schema.json"))
HEDWIG_CALLBACKS = {("order-placed", "1.*"): "callbacks.order_placed"}
HEDWIG_MESSAGE_ROUTING = {("order-placed", "1.*"): "order-placed-v1"}  # SNS topic hedwig-order-placed-v1
HEDWIG_CONSUMER_BACKEND = "hedwig.backends.aws.AWSSQSConsumerBackend"
HEDWIG_PUBLISHER_BACKEND = "hedwig.backends.aws.AWSSNSPublisherBackend"
HEDWIG_VISIBILITY_TIMEOUT_S = 30

AWS_REGION = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
AWS_ACCOUNT_ID = os.environ.get("AWS_ACCOUNT_ID", "123456789012")
AWS_ENDPOINT_SNS = os.environ.get("AWS_ENDPOINT_URL")  # moto's URL locally; unset in production
AWS_ENDPOINT_SQS = os.environ.get("AWS_ENDPOINT_URL")
