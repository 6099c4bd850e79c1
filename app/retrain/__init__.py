"""One retrain from request to promotion: plan, splits, the job, feature cache and sharding,
refit, progress, and the embedded and Celery runners behind one protocol."""
