"""`spurguard ui`: the labelling page, the method's human step in a browser (the `[ui]` extra).

It talks to spurguard only through the public gRPC API (spurguard.client) with the user's token,
so it works against any server. `gateway` reads what each page shows, `events` streams
Visualize and live labels, `app` holds the routes, `server` runs them on uvicorn.
"""
