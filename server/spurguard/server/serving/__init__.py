"""The serving layer, between rpc and the engine: no protobuf, vocabulary types in and out.

`dataplane` (every operation of the service), `options` (requests checked once, on entry),
`models` (loading, readiness, the scoring path), `batcher` (shared forward passes), `guard` (a fit
and its labels as an immutable scorer), `jobs` (fit jobs that outlive their calls), `fitting`,
`evaluation` and `visualizing` (the long work), `paths` (data roots), `metrics` (Prometheus).
"""
