"""The web layer: FastAPI app, settings, the model worker, metrics and the CLI's ``tfb serve``."""
