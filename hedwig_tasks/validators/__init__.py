"""Validators: the wire formats for JSON-Schema and protobuf messages."""
