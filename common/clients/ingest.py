"""IngestClient: submit ingest jobs, follow them, and manage datasets (see docs/contracts.md "Clients")."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from tokenmill.common.clients.base import BaseClient, JobsClientMixin
from tokenmill.common.errors import InvalidArgument
from tokenmill.common.runtime.proto_struct import dict_to_struct
from tokenmill.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc


class IngestClient(JobsClientMixin, BaseClient):
    """`IngestClient.from_config(config).submit("web-v1", ["/data/web.jsonl"], preset="web")`."""

    stub_class = ingest_pb2_grpc.IngestServiceStub
    service_name = "ingest"

    def submit(
        self,
        name: str,
        sources: Sequence[str],
        *,
        preset: str = "web",
        filter_overrides: dict[str, Any] | None = None,
        idempotency_key: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> common_pb2.Job:
        """Submit an ingest job. `options` are the other SubmitIngestRequest fields (text_field,
        include_globs, exclude_globs, vocab_size, tokenizer, val_fraction, seed, skip_near_dedup,
        near_dup_threshold, num_workers, language_threshold, max_documents, minhash_bands,
        minhash_rows, minhash_ngram, minhash_hash_family, minhash_word_split, dedup_backend,
        skip_pii, batch_size, max_doc_bytes, max_tokens_per_shard); filter thresholds go in
        `filter_overrides` ({"repetition": {"max_dup_line_fraction": 0.5}})."""
        if isinstance(sources, str):
            sources = [sources]
        try:
            request = ingest_pb2.SubmitIngestRequest(
                idempotency_key=idempotency_key, name=name, sources=list(sources), preset=preset, **options
            )
            if filter_overrides:
                request.filter_overrides.CopyFrom(dict_to_struct(filter_overrides, what="filter_overrides"))
        except (ValueError, TypeError) as exc:  # an unknown field name or a wrong type
            raise InvalidArgument(f"SubmitIngestRequest: {exc}") from None
        return self._unary(self.stub.SubmitIngest, request, timeout=timeout)

    def list_datasets(
        self, *, page_size: int = 50, page_token: str = "", timeout: float | None = None
    ) -> ingest_pb2.ListDatasetsResponse:
        request = ingest_pb2.ListDatasetsRequest(page_size=page_size, page_token=page_token)
        return self._unary(self.stub.ListDatasets, request, timeout=timeout)

    def iter_datasets(self, *, page_size: int = 100) -> Iterator[ingest_pb2.Dataset]:
        token = ""
        while True:
            page = self.list_datasets(page_size=page_size, page_token=token)
            yield from page.datasets
            token = page.next_page_token
            if not token:
                return

    def get_dataset(self, name: str, *, timeout: float | None = None) -> ingest_pb2.Dataset:
        return self._unary(self.stub.GetDataset, ingest_pb2.GetDatasetRequest(name=name), timeout=timeout)

    def delete_dataset(self, name: str, *, timeout: float | None = None) -> bool:
        resp = self._unary(
            self.stub.DeleteDataset, ingest_pb2.DeleteDatasetRequest(name=name), timeout=timeout
        )
        return resp.deleted
