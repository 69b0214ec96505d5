"""Store URLs, their resolution, and opening a store."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from makeway.errors import UsageError
from makeway.store.base import (
    ACTIVE_STATES,
    FINAL_STATES,
    Candidate,
    Claim,
    Event,
    JobRecord,
    JobState,
    NewJob,
    Outcome,
    Store,
)

logger = logging.getLogger(__name__)

STORE_ENV = "MAKEWAY_STORE"
DEFAULT_STORE_URL = "sqlite:///makeway.db"

__all__ = [
    "ACTIVE_STATES", "FINAL_STATES", "Candidate", "Claim", "Event", "JobRecord", "JobState",
    "NewJob", "Outcome", "Store", "open_store", "resolve_store_url", "sqlite_path",
]


def resolve_store_url(explicit: str | None, config_store: str | None) -> str:
    """Pick the store URL: an explicit one (--store or App(...)), then $MAKEWAY_STORE, then the config file, then ./makeway.db."""
    for candidate in (explicit, os.environ.get(STORE_ENV), config_store):
        if candidate:
            return candidate
    return DEFAULT_STORE_URL


def sqlite_path(url: str) -> Path:
    """Return the absolute database path of a `sqlite:///` URL.

    `sqlite:///relative.db` is relative to the working directory and
    `sqlite:////absolute.db` is absolute, as in SQLAlchemy's URLs.
    """
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise UsageError(
            f"store URL {url!r} is invalid; use sqlite:///relative.db, sqlite:////absolute/path.db "
            "or postgresql://user@host/dbname"
        )
    return Path(url[len(prefix):]).resolve()


def open_store(url: str, *, for_node: bool = False, create: bool = True,
               busy_timeout_s: float | None = None) -> Store:
    """Open (and migrate) the store at `url`, logging where it is.

    A node's store keeps housekeeping off its dispatch path: for SQLite,
    WAL checkpoints run in a background thread every 0.5 s. With
    `create=False` a missing SQLite file is an error instead of a new store.
    `busy_timeout_s` bounds how long a write waits for another writer.
    """
    if url.startswith("sqlite:"):
        from makeway.store.sqlite import SQLiteStore

        if not create and not sqlite_path(url).exists():
            raise UsageError(
                f"store {url!r} does not exist; check the path (a mistyped one would look like an empty queue), "
                "or start a node or submit a job to create it"
            )
        options = {} if busy_timeout_s is None else {"busy_timeout_s": busy_timeout_s}
        store = SQLiteStore(sqlite_path(url), checkpoint_interval_s=0.5 if for_node else None, **options)
        if for_node:
            # A node refuses a damaged file rather than run jobs from it.
            try:
                store.check(full=False)
            except BaseException:
                store.close()
                raise
        logger.info("Using store %s", store.url)
        return store
    if url.startswith(("postgresql:", "postgres:")):
        raise UsageError(
            f"store URL {url!r}: the PostgreSQL store is not available in this release; use a sqlite:/// URL"
        )
    raise UsageError(
        f"store URL {url!r} has an unknown scheme; use sqlite:///relative.db, sqlite:////absolute/path.db "
        "or postgresql://user@host/dbname"
    )
