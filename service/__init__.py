"""The MERC service: CLI, feature extraction, API and workers."""
