"""Data and models in: file readers (``files``), network converters (``networks``), file
ingest, training tables, bootstrap of version 1 and ``skqk import``."""
