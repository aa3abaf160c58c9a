"""Labelled synthetic datasets: a spec (model, sampling, per-class counts, base seed), the chunks it is
drawn in, the formats other tools read, and Ray Data for scale. The job API (``app.jobs``) writes the
same chunks from the engine's idle rows, with the same bytes."""
