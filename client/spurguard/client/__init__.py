"""Thin spurguard client: grpcio, protobuf and numpy only."""
