"""Image to image: variations (SDEdit), inpainting (RePaint's merge and resampling; consistency models'
zero-shot editing for a student) and interpolation (between seeds, or between images through DDIM
inversion), each a job of the step-level engine beside every other job.

schemas.py   the request and answer bodies
inputs.py    uploaded pictures and masks -> the model's 28x28 (the documented mapping, the mask conventions)
serving.py   request -> engine jobs -> answer, built on app.generation.serving's steps
routes.py    POST /edits, /edits/stream, /interpolations, /interpolations/stream (JSON or multipart)
"""
