"""The HTTP service, one folder per feature around a thin HTTP shell.

    app/generation/   POST /generate, the stream, GET /models and /schedule: the engine and its models
    app/clip/         POST /clip/score and rerank: CLIP, the classifier, uploads
    app/ray/          the same app on Ray Serve: the deployment and the proxy's middleware
    app/*.py          the shell: main (create_app), settings, middleware, errors, metrics, health, page

``uvicorn app.main:app`` or ``python -m app --host 0.0.0.0 --port 8000``; see app/main.py and
docs/architecture.md.
"""
