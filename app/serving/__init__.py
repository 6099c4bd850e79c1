"""Serving: model holder (hot-swap), dynamic batcher, retrain job and runners, bootstrap."""
