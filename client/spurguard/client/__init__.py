"""Thin spurguard client: grpcio, protobuf and numpy only (no torch, no PIL). Its results are the
shared vocabulary's dataclasses (spurguard.vocab), re-exported here.

    from spurguard.client import Client
    with Client("127.0.0.1:50051") as client:
        for result in client.score("mycnn", ["cat.jpg", "dog.png"]):
            print(result.image_id, result.predictions[0].name, result.trigger)
"""
from spurguard.client.client import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT_S,
    MAX_MESSAGE_BYTES,
    Client,
    ImageItem,
    ImageLike,
    SpurguardClientError,
    Stream,
    tls_credentials,
)
from spurguard.vocab import *  # noqa: F403 - the result and request types are the client's API too
from spurguard.vocab import __all__ as _vocab_names

__all__ = [
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "MAX_MESSAGE_BYTES",
    "Client",
    "ImageItem",
    "ImageLike",
    "SpurguardClientError",
    "Stream",
    "tls_credentials",
    *_vocab_names,
]
