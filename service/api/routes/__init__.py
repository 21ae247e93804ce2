"""Route modules: conversations, models, health (liveness, readiness, metrics)."""
