"""CLIP scoring and rerank: ``POST /clip/score`` and the ``rerank`` field of a generation.

schemas.py   the score request and answer, and the rerank field and its answer
routes.py    POST /clip/score (JSON or multipart)
service.py   CLIP loaded in the background, its thread limiter and waiting room
scorers.py   the rerank methods: the classifier, and CLIP through the service
rerank.py    plan a rerank before sampling, rank the candidates after
uploads.py   decoding uploaded images within their limits
multipart.py reading a multipart/form-data body into memory
"""
