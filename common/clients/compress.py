"""CompressClient: submit compression and evaluation jobs and follow them (see docs/contracts.md
"Clients")."""

from __future__ import annotations

from collections.abc import Sequence
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
        (group_size, sparsity, rank_fraction, energy, calibration_dataset, calibration_samples,
        eval_dataset, eval_batches, eval_seq_len, act_order, keep_dense, score; distill:
        student_preset, distill_steps, train_dataset, distill_temperature, distill_alpha). The finished job's `result["report"]` holds the CompressionReport fields."""
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

    def submit_eval(
        self,
        source: str,
        *,
        suite: str = "",
        tasks: Sequence[str] = (),
        perplexity_dataset: str = "",
        perplexity_batches: int = 0,
        perplexity_seq_len: int = 0,
        limit: int | None = None,
        pass_k: Sequence[int] = (),
        idempotency_key: str = "",
        timeout: float | None = None,
    ) -> common_pb2.Job:
        """Submit an evaluation job; `limit=None` scores every instance (0 is refused by the server).
        The finished job's `result` holds the EvalReport fields; the numbers are also recorded with
        the checkpoint version (`CheckpointVersion.recorded_metrics`)."""
        request = compress_pb2.SubmitEvalRequest(
            idempotency_key=idempotency_key,
            source=source,
            suite=suite,
            tasks=list(tasks),
            perplexity_dataset=perplexity_dataset,
            perplexity_batches=perplexity_batches,
            perplexity_seq_len=perplexity_seq_len,
            pass_k=list(pass_k),
        )
        if limit is not None:
            request.limit = limit
        return self._unary(self.stub.SubmitEval, request, timeout=timeout)
