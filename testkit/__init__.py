"""The test toolkit: what the tests, the benches and the scripts need to build and run the service.

    testkit.weights   tiny U-Net weights and cards (a teacher's, a distilled student's)
    testkit.servers   free loopback ports, the app as a process or in a thread, waiting until ready
    testkit.metrics   reading a Prometheus exposition: one sample, or how much it moved

Importable from the repository root: pytest puts it on the path (``pythonpath`` in pyproject.toml), and
``python -m bench.serve`` runs from there. Like vLLM's ``tests/utils.py`` with ``RemoteOpenAIServer``.
"""
