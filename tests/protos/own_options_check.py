"""Round-trip messages compiled against hedwig_tasks' own option file; print the results as JSON.

Run in a subprocess by ``tests/test_protobuf_validator.py``: ``own_options_pb2`` declares extension
51235 through ``hedwig_tasks/validators/protobuf_options.proto``, and protobuf refuses a second
declaration of it, so it cannot be imported where authedwig's ``options_pb2`` already is.
"""

from __future__ import annotations

import json
import sys

from protos import own_options_pb2 as pb

from hedwig_tasks import Message
from hedwig_tasks.validators.protobuf import ProtobufValidator, messages_of

USER_ID = "4a0d6dc4-3b5f-4f0e-9d55-7b1f0a1d2c3e"
TS = 1795719935116
ORDER_ID = "0b8e2f7c-95a4-4c2b-a6b1-3f4e5d6c7b8a"


def messages() -> list[Message]:
    order = pb.OrderPlacedV2(order_id="O-1", items=[pb.LineItem(sku="S-1", quantity=2)])
    user = pb.UserCreatedV1(user_id="U_7")
    return [
        Message.new("OrderPlaced", "2.1", order, {"request_id": "r-1"}, id=ORDER_ID, publisher="shop", timestamp=7),
        Message.new("user-created", "1.0", user, {"request_id": "r-2"}, id=USER_ID, publisher="shop", timestamp=TS),
    ]


def main() -> None:
    validator = ProtobufValidator(messages_of(pb))
    round_trips: list[bool] = []
    user_created: dict[str, dict[str, object]] = {}
    for container in (False, True):
        for message in messages():
            encoded = validator.encode(message, container=container)
            round_trips.append(validator.decode(encoded.body, encoded.attributes) == message)
            if message.type == "user-created":
                form = "container" if container else "attributes"
                user_created[form] = {"body": encoded.body.hex(), "attributes": dict(encoded.attributes)}
    report = {
        "authedwig_loaded": "hedwig" in sys.modules,
        "known": sorted(validator.known_types()),
        "latest": {f"{t}/{m}": str(validator.latest_version(t, m)) for t, m in validator.known_types()},
        "round_trips": round_trips,
        "user_created": user_created,
    }
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
