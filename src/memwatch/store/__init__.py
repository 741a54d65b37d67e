"""The store: one SQLite file per run folder, the single source of truth (see :mod:`memwatch.store.database`)."""

from memwatch.store.database import KINDS, OUTPUT_SUBDIR, SCHEMA_VERSION, STORE_NAME, Store

__all__ = ["KINDS", "OUTPUT_SUBDIR", "SCHEMA_VERSION", "STORE_NAME", "Store"]
