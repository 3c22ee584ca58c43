"""The gRPC layer: `app` (assembly, `spurguard serve`, the builder API), `servicer` (proto <->
engine), `models` (loading, readiness, the scoring path), `batcher`, `jobs`, `metrics`, `paths`
and `status` (errors to status codes).

Nothing is re-exported here, so that `python -m spurguard.server.rpc.app` runs its module once.
"""
