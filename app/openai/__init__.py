"""OpenAI's Images API on the service's own generation path.

schemas.py   the request, response and stream-event bodies, in openai-python's shapes
serving.py   request -> the POST /generate body it means -> app.generation.serving -> files, URLs, events
urls.py      the stateless, signed image URLs of response_format "url"
routes.py    POST /v1/images/generations (JSON or SSE), GET /v1/images/files/..., GET /v1/models

docs/openai.md is the reference.
"""
