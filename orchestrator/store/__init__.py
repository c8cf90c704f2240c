"""Persistence: SQLAlchemy 2.x over SQLite (default, WAL) or PostgreSQL, Alembic migrations."""

from orchestrator.store.engine import Store

__all__ = ["Store"]
