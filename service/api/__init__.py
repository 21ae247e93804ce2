"""The REST API (FastAPI): ``create_app`` builds it; ``merc serve`` runs it with uvicorn."""

from service.api.app import create_app

__all__ = ["create_app"]
