"""spurguard server side: engine, backends, store, demo (everything with torch in it)."""
