"""The inference engine: a library (torch only) that the replica service and the GPU bench wrap."""

from tokenmill.common.inference.config import EngineConfig, ModelSpec
from tokenmill.common.inference.llm_engine import Continued, LLMEngine, RequestOutput, Usage, build_engine
from tokenmill.common.inference.lora import LoraAdapter
from tokenmill.common.inference.request import Request, SamplingParams
from tokenmill.common.inference.stats import EngineStats
from tokenmill.common.inference.tokenizer import Tokenizer

__all__ = [
    "Continued",
    "EngineConfig",
    "EngineStats",
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
