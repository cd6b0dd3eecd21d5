"""a3mod: post-training analytical low-rank compression (A3) of transformer LLMs.

    model = a3mod.apply(model, passes=a3mod.a3_passes(0.2), calib=a3mod.calibration_data(tok))
    a3mod.save(model, "out/");  model = a3mod.load("out/");  print(a3mod.report(model))
"""
from .version import __version__  # noqa: F401

from . import evaluation  # noqa: F401  (a3mod.evaluation.evaluate; lm-eval is imported when used)
from .arch import ARCHS, ArchSpec, supported_types
from .arch.discover import Discovery, LayerDiscovery, discover
from .calib.stats import Stats, collect
from .calib.text import calibration_data
from .errors import (
    A3ModError, CalibrationError, CheckpointError, DiscoveryError, ExportError, RatioError, UnsupportedModelError,
)
from .evaluation.ppl import eval_tokens, perplexity
from .heal import heal
from .io import native
from .export.formats import save
from .io.checkpoint import load
from .io.loading import load_pretrained
from .modules import LatentKVAttention, LowRankLinear, ReducedHeadAttention, ReducedMLP
from .passes import (
    A3KV,
    A3MLP,
    A3OV,
    A3QK,
    ASVD,
    SVDLLM,
    SVDLLM2,
    A3Experts,
    Allocate,
    PlainSVD,
    a3_passes,
    pass_from_dict,
    pass_to_dict,
)
from .pipeline.compress import apply
from .pipeline.stream import compress_streaming
from .quant import HQQ, Bnb4bit, BnbInt8, QuantizationError, cache_bytes, quantized_cache
from .report import Report, report

native.register()      # model type "a3mod" for AutoConfig / AutoModel*.from_pretrained (a3mod.io.native)

__all__ = [
    "apply", "heal", "collect", "calibration_data", "Stats", "save", "load", "load_pretrained", "report", "Report",
    "perplexity", "eval_tokens", "A3QK", "A3OV", "A3MLP", "A3Experts", "a3_passes", "Allocate", "A3KV", "ASVD",
    "SVDLLM", "SVDLLM2", "PlainSVD",
    "pass_to_dict", "pass_from_dict",
    "ReducedHeadAttention", "ReducedMLP", "LowRankLinear", "LatentKVAttention", "ARCHS", "ArchSpec", "supported_types",
    "A3ModError", "CalibrationError", "CheckpointError", "ExportError", "RatioError", "UnsupportedModelError",
    "DiscoveryError",
    "discover", "Discovery", "LayerDiscovery", "compress_streaming",
    "BnbInt8", "Bnb4bit", "HQQ", "QuantizationError", "quantized_cache", "cache_bytes",
]
