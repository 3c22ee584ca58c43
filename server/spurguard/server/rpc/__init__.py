"""The gRPC layer, thin: `app` (assembly, `spurguard serve`, the builder API), `servicer`
(messages <-> the data plane, through spurguard.wire), `status` (errors to status codes) and
`process` (the server as a child process).

Nothing is re-exported here, so that `python -m spurguard.server.rpc.app` runs its module once.
"""
