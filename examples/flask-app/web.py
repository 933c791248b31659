"""A Flask app that publishes sign-ups; its worker runs the handlers: hedwig-tasks worker -A web

Run from this folder:

    flask --app web run                          # the web app (POST /signup)
    hedwig-tasks worker -A web                   # the worker, from the same module
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flask import Flask, request

from hedwig_tasks.flask import HedwigTasks
from hedwig_tasks.models import Message

logger = logging.getLogger("web")
HERE = Path(__file__).resolve().parent

app = Flask(__name__)
app.config.update(
    HEDWIG_QUEUE="WEB",
    HEDWIG_PUBLISHER="web",
    HEDWIG_JSONSCHEMA_FILE=str(HERE / "schema.json"),
    HEDWIG_MESSAGE_ROUTING={("user-created", "1.*"): "user-created-v1", ("send_email", "1.*"): "send-email-v1"},
    HEDWIG_TRANSPORT_URL=os.environ.get("HEDWIG_TRANSPORT_URL", f"sqlite:///{HERE / '.hedwig' / 'bus.db'}"),
)
ext = HedwigTasks(app)  # ext.app is the Hedwig app those settings describe
assert ext.app is not None
hedwig = ext.app


@app.post("/signup")
def signup() -> tuple[dict[str, Any], int]:
    """Validate and publish at once: a bad e-mail is a 400 naming the field, and nothing is sent."""
    body = request.get_json(force=True)
    message = Message.new("user-created", "1.0", {"user_id": body["user_id"], "email": body["email"]}).publish()
    return {"id": message.id}, 202


@hedwig.handler("user-created", "1.*")
def welcome(message: Message) -> None:
    """Runs in the worker, outside a Flask app context; the worker made this app the default."""
    Message.new("send_email", "1.1", {"to": message.data["email"], "subject": "Welcome!"}).publish()


@hedwig.handler("send_email", "1.*")
def send_email(message: Message) -> None:
    with app.app_context():  # open one where a handler needs Flask's context (config, extensions)
        logger.info("e-mail to %s: %s (from %s)", message.data["to"], message.data["subject"], app.name)
