"""Persistent state of the server: fitted components (with their fit-image ids and alphas),
labels and job records.

One directory of safetensors + JSON for fits, atomic writes throughout, never pickle; labels and
jobs in SQLite inside it (embedded, no server) or in a PostgreSQL database that replicas share
(store/database.py). `Store` is the entry point; the rest is what it returns.
"""
from spurguard.server.store.codec import ClassSummary
from spurguard.server.store.fits import Fit, FitMeta, FitSettings, FitWriter
from spurguard.server.store.jobs import JobDB, JobRecord
from spurguard.server.store.labels import Label
from spurguard.server.store.store import Store
from spurguard.server.store.transfers import StoredTransfer, TransferSettings, TransferWriter

__all__ = [
    "ClassSummary",
    "Fit",
    "FitMeta",
    "FitSettings",
    "FitWriter",
    "JobDB",
    "JobRecord",
    "Label",
    "Store",
    "StoredTransfer",
    "TransferSettings",
    "TransferWriter",
]
