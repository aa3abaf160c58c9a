"""Generation: requests for images of a class, the engine that samples them, and the served models.

schemas.py   request and response bodies (bounds from the settings)
routes.py    POST /generate, GET|POST /generate/stream, GET /models, GET /schedule
serving.py   request -> job -> answer: defaults and seeds, waiting, the one error mapping
streaming.py the same as server-sent events: start, queued, step..., then done or error
engine.py    one device thread: lanes, ticks, one network evaluation per model per tick
lane.py      one model's queue and running jobs: the admission rule and its forecast
jobs.py      a job's spec, events and result, and the hand-off to the event loop
output.py    the output thread: PNG previews, metrics (the Observer), delivery
device.py    weights on the device as the engine runs them (FixedRows, precision)
models.py    the served models: cards checked, then weights loaded and prepared
rerank.py    plan a rerank before sampling, rank the candidates after
scorers.py   the rerank methods' interface, and the classifier's (CLIP's is app.clip.service.ClipScorer)
"""
