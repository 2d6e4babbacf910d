"""CompressClient: submit compression jobs and follow them (see docs/contracts.md "Clients")."""

from __future__ import annotations

from typing import Any

from tokenmill.common.clients.base import BaseClient, JobsClientMixin
from tokenmill.common.errors import InvalidArgument
from tokenmill.v1 import common_pb2, compress_pb2, compress_pb2_grpc


class CompressClient(JobsClientMixin, BaseClient):
    """`CompressClient.from_config(config).submit("demo-model:3", "demo-int8", "int8")`."""

    stub_class = compress_pb2_grpc.CompressServiceStub
    service_name = "compress"

    def submit(
        self,
        source: str,
        output_name: str,
        method: str,
        *,
        idempotency_key: str = "",
        timeout: float | None = None,
        **options: Any,
    ) -> common_pb2.Job:
        """Submit a compression job. `options` are the other SubmitCompressRequest fields
        (group_size, sparsity, rank_fraction, calibration_dataset, calibration_samples,
        eval_dataset, eval_batches, eval_seq_len, act_order, keep_dense, student_preset,
        distill_steps). The finished job's `result["report"]` holds the CompressionReport fields."""
        try:
            request = compress_pb2.SubmitCompressRequest(
                idempotency_key=idempotency_key,
                source=source,
                output_name=output_name,
                method=method,
                **options,
            )
        except (ValueError, TypeError) as exc:  # an unknown field name or a wrong type
            raise InvalidArgument(f"SubmitCompressRequest: {exc}") from None
        return self._unary(self.stub.SubmitCompress, request, timeout=timeout)
