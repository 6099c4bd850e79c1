"""HTTP layer: FastAPI routers over the serving layer (``create_app`` in app.api.main)."""
