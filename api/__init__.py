"""The HTTP face of the service: FastAPI routes, schemas, auth and metrics."""
