"""CLIP scoring: ``POST /clip/score``, and CLIP as a rerank method of generation (``ClipScorer``).

schemas.py   the score request and answer
routes.py    POST /clip/score (JSON or multipart)
service.py   CLIP loaded in the background, its thread limiter and waiting room, and ClipScorer
uploads.py   decoding uploaded images within their limits
multipart.py reading a multipart/form-data body into memory
"""
