"""TrainerClient: submit and validate training jobs, follow them (see docs/contracts.md "Clients")."""

from __future__ import annotations

from typing import Any

from tokenmill.common.clients.base import BaseClient, JobsClientMixin
from tokenmill.common.errors import InvalidArgument
from tokenmill.common.runtime.proto_struct import dict_to_struct
from tokenmill.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc


def build_request(
    output_name: str,
    *,
    model_overrides: dict[str, Any] | None = None,
    lora: dict[str, Any] | None = None,
    **fields: Any,
) -> trainer_pb2.SubmitTrainRequest:
    """A SubmitTrainRequest from keyword fields (proto names); InvalidArgument names a bad field."""
    try:
        request = trainer_pb2.SubmitTrainRequest(output_name=output_name, **fields)
        if model_overrides:
            request.model_overrides.CopyFrom(dict_to_struct(model_overrides, what="model_overrides"))
        if lora:
            request.lora.CopyFrom(trainer_pb2.LoraConfig(**lora))
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(f"SubmitTrainRequest: {exc}") from None
    return request


class TrainerClient(JobsClientMixin, BaseClient):
    """``TrainerClient.from_config(config).submit("demo-model", dataset="web", workers=2, steps=200)``."""

    stub_class = trainer_pb2_grpc.TrainerServiceStub
    service_name = "trainer"

    def submit(
        self, output_name: str, *, idempotency_key: str = "", timeout: float | None = None, **fields: Any
    ) -> common_pb2.Job:
        """Queue a training job. ``fields`` are the other SubmitTrainRequest fields (mode, model_preset,
        dataset, sft_data, dpo_data, dpo_beta, reference_checkpoint, use_lora, teacher_checkpoint,
        distill_temperature, distill_alpha, init_checkpoint, backend, workers, steps, ...;
        ``model_overrides`` and ``lora`` as dicts)."""
        request = build_request(output_name, idempotency_key=idempotency_key, **fields)
        return self._unary(self.stub.SubmitTrain, request, timeout=timeout)

    def validate(
        self, output_name: str, *, timeout: float | None = None, **fields: Any
    ) -> trainer_pb2.ValidateTrainResponse:
        """Check a request (shapes, memory, dataset/checkpoint existence) without running it."""
        return self._unary(self.stub.ValidateTrain, build_request(output_name, **fields), timeout=timeout)
