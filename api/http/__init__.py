"""The HTTP side: app factory, middleware, routes, schemas, uploads, readiness and metrics."""
