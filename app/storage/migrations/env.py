"""Alembic environment: runs on the connection ``app.storage.migrate`` hands over.

Run by the ``alembic`` command line instead (developers: ``alembic revision``), it opens
``-x url=…``, else ``SKQK_DATABASE_URL``, else the default SQLite store.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine

from app.storage.schema import metadata  # only for autogenerate's comparison, never in revisions

config = context.config
if config.config_file_name is not None:  # the alembic command line (alembic.ini): its logging
    fileConfig(config.config_file_name, disable_existing_loggers=False)
# batch mode: SQLite cannot ALTER a column in place, so autogenerate writes batch operations
OPTIONS = {"target_metadata": metadata, "render_as_batch": True}


def cli_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("SKQK_DATABASE_URL")
    if url:
        return url
    from app.settings import Settings

    return Settings().resolved_database_url


def run_offline() -> None:
    context.configure(url=cli_url(), literal_binds=True, **OPTIONS)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # app.storage.migrate: its transaction, its lock
        context.configure(connection=connection, **OPTIONS)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(cli_url())
    try:
        with engine.connect() as conn:
            context.configure(connection=conn, **OPTIONS)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
