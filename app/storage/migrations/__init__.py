"""Alembic migrations of the store (env.py, script.py.mako, versions/).

Run through ``app.storage.migrate`` (programmatic config, no alembic.ini needed); the
repo-root ``alembic.ini`` only serves developers running ``alembic revision``.
"""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
