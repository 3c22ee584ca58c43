"""The gRPC layer, thin: `app` (assembly, `spurguard serve`, the builder API), `servicer`
(spurguard.v1 messages <-> the data plane, through spurguard.wire), `inference` (the Open
Inference Protocol, KServe v2, on the same port), `handlers` (status mapping and metrics around
every handler), `auth` (bearer tokens with roles, one interceptor for every call), `status`
(errors to status codes) and `process` (the server as a child process).

Nothing is re-exported here, so that `python -m spurguard.server.rpc.app` runs its module once.
"""
