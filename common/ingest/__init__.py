"""The ingest engine: a library that turns raw corpora into packed token datasets.

Importable without Redis, Ray, gRPC or generated stubs; ``services/ingest/server.py`` wraps it.
Entry points: ``spec.IngestSpec``, ``pipeline.run_ingest``, ``registry.DatasetRegistry``.
"""
