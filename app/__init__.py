"""The HTTP service: settings, schemas, the batching engine, routes, metrics.

``uvicorn app.main:app`` or ``python -m app --host 0.0.0.0 --port 8000``; see app/main.py.
"""
