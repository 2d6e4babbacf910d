"""The inference engine: a library (torch only) that the replica service and the GPU bench wrap."""

from services.inference.engine.config import EngineConfig, ModelSpec
from services.inference.engine.llm_engine import LLMEngine, RequestOutput, Usage, build_engine
from services.inference.engine.lora import LoraAdapter
from services.inference.engine.request import Request, SamplingParams
from services.inference.engine.tokenizer import Tokenizer

__all__ = [
    "EngineConfig",
    "LLMEngine",
    "LoraAdapter",
    "ModelSpec",
    "Request",
    "RequestOutput",
    "SamplingParams",
    "Tokenizer",
    "Usage",
    "build_engine",
]
