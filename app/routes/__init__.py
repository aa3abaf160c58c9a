"""One router per feature: generate, stream, health, metrics."""
