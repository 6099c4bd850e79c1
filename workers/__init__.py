"""Celery workers: thin wrappers that run the retrain job from app/ on a GPU (or CPU) host."""
