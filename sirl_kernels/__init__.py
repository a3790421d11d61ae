"""sirl-kernels: fused per-token log-probabilities and softmax entropy over large vocabularies.

Forward and backward in one pass over the logits (or, in the fused-linear variant, over tiles of
``hidden @ weight.T``) without ever materialising a ``[tokens x vocab]`` probability tensor.
"""

from sirl_kernels._checks import TEMPERATURE_RANGE, check_temperature
from sirl_kernels.api import (
    linear_token_logprobs_entropy,
    linear_token_stats,
    token_logprobs_entropy,
    token_stats,
    validate_labels,
)
from sirl_kernels.backends import BackendStatus, available_backends
from sirl_kernels.statistics import STATISTICS, TokenStats
from sirl_kernels.sampler import linear_sampler_logprobs_entropy, sampler_logprobs_entropy
from sirl_kernels.topk import linear_top_k_logprobs, top_k_logprobs

__all__ = [
    "TEMPERATURE_RANGE",
    "STATISTICS",
    "BackendStatus",
    "TokenStats",
    "available_backends",
    "check_temperature",
    "linear_sampler_logprobs_entropy",
    "linear_token_logprobs_entropy",
    "linear_token_stats",
    "linear_top_k_logprobs",
    "sampler_logprobs_entropy",
    "token_logprobs_entropy",
    "token_stats",
    "top_k_logprobs",
    "validate_labels",
]
__version__ = "0.1.0"
