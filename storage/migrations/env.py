"""Alembic environment for storage.models.

Normally run through `storage.db.migrate()`, which hands over an open
connection in `config.attributes["connection"]`. The alembic CLI also works:
`alembic -c storage/alembic.ini upgrade head` (URL from INFINI_DATABASE_URL),
and `... revision --autogenerate --rev-id 0002 -m "..."` to draft the next migration
(review it: keep it runnable on both PostgreSQL and SQLite).
"""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection
from sqlalchemy.pool import NullPool

from storage.models import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    # migrations must not import model code that changes later: plain SQLAlchemy types
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure_and_run(conn: Connection) -> None:
    context.configure(
        connection=conn,
        target_metadata=target_metadata,
        # SQLite can't ALTER most things: batch mode copies the table instead
        render_as_batch=conn.dialect.name == "sqlite",
        compare_type=True,
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from storage.settings import get_settings

    return get_settings().database_url


def run_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=_url().startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    conn = config.attributes.get("connection")
    if conn is not None:
        _configure_and_run(conn)
        return
    from storage.db import make_engine

    engine = make_engine(_url(), sqlite_foreign_keys=False, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            _configure_and_run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
