"""Jobs that outlive a request: ``POST /jobs`` draws a labelled dataset (a ``app.datasets`` spec) in the
engine's idle rows, commits it chunk by chunk, exports it, and tells a webhook.

    schemas.py   the request and the status (what a job is, as the API shows it)
    routes.py    the routes; each a few lines
    serving.py   request -> job (validation, idempotency, queue and disk limits), status, cancel, delete,
                 the result file, the event stream
    runner.py    one job at a time: its chunks as background engine jobs, committed in order, then the result
    results.py   the result file: the export of a complete dataset, or of the prefix a cancelled job made
    db.py        the jobs' state in SQLite (WAL), on its one writer thread
    store.py     the job directory this process holds (a file lock), and where each job's files go
    webhooks.py  Standard Webhooks: the URL check, signing, delivery with retries

docs/api.md (Jobs) describes the API; the module docstrings say why it is built this way.
"""
