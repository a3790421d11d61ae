"""Hugging Face causal LMs -> per-token log-probs and entropies, without ever building ``[B, T, V]`` logits.

The decoder body runs to its final hidden states; only the rows that predict completion tokens are gathered,
and the fused ``linear_token_stats`` op applies the output embedding to them chunk by chunk.

Alignment (the one thing to get right): for a sequence ``x_0 .. x_{T-1}`` the value at position ``t`` is about
token ``x_t``, predicted from the hidden state at position ``t - 1``::

    logprobs[b, t] = log p(x_t | x_<t)          (at the given temperature)
    entropy[b, t]  = H(p(. | x_<t))             (the distribution that produced x_t)

Position 0 has no prediction and is always 0, as is every position where ``completion_mask`` is 0. This is
the usual HF shift (``logits[:, :-1]`` against ``labels[:, 1:]``) written back at the label's position, so the
masks of a rollout (1 on completion tokens) can be used unchanged.

Failing closed. Skipping ``model.forward`` skips whatever it does to the logits after ``lm_head``. The known
rescalings are folded into the temperature (:func:`model_logit_temperature`: Cohere's ``logit_scale``, Granite's
``logits_scaling``) and soft-capping is refused up front; anything else (Falcon-H1's ``lm_head_multiplier``, a
subclass whose ``forward`` edits the logits) is caught by a check that runs the first time a model class and
config are seen in the process (:func:`verify_model_logits`): ``model(...).logits`` at the last position of a few
tokens of the real input against its output embedding recomputed in float64 from the hidden state there, to one or
two roundings of the logits' dtype, and ``NotImplementedError`` if they disagree. Opt out with
``verify_logits=False`` or ``SIRL_KERNELS_HF_VERIFY=0``.

Typical use in a custom trainer (the SIRL reward in three lines)::

    from sirl_kernels.hf import sirl_reward
    with torch.no_grad():
        rewards = sirl_reward(model, input_ids, attention_mask, completion_mask)   # [B], higher = more confident
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import weakref

import torch
from torch import Tensor

from sirl_kernels.api import linear_token_stats, validate_labels
from sirl_kernels.statistics import TokenStats
from sirl_kernels.sampler import linear_sampler_logprobs_entropy
from sirl_kernels.topk import linear_top_k_confidence

VERIFY_ENV = "SIRL_KERNELS_HF_VERIFY"
VERIFY_TOKENS = 16  # tokens of one input row that the logits check runs the model on

# (model class, config fingerprint) -> None where the fused head agreed with model(...).logits, else the error
_logits_verdicts: dict[tuple[type, str], str | None] = {}
# unwrapped model -> (its config object, that config's fingerprint): no hashing of the config on every call
_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unwrap_model(model):
    """PEFT / torch.compile / DDP wrappers -> the underlying transformers model (LoRA layers still injected and
    active)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        model = get_base()
    # torch.compile / DDP wrappers keep the real module here.
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def model_logit_temperature(config, temperature: float) -> float:
    """The temperature to give the fused op so that it reproduces ``model(...).logits / temperature``: the model's
    own logit scaling folded in (logits are linear in it), or ``NotImplementedError`` for soft-capping."""
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap is not None:
        raise NotImplementedError(
            f"final_logit_softcapping={softcap} (e.g. Gemma 2) applies tanh to the logits, which the fused "
            "linear op does not implement; compute logits yourself and use sirl_kernels.token_logprobs_entropy"
        )
    scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    if scale is not None:
        temperature = temperature / float(scale)
    divisor = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if divisor is not None:
        temperature = temperature * float(divisor)
    return temperature


def output_head(model) -> tuple[Tensor, Tensor | None]:
    """``(weight [V, D], bias [V] or None)`` of an unwrapped model's output embedding, or a clear error."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (is it a *ForCausalLM?)")
    if hasattr(head, "base_layer") or not isinstance(getattr(head, "weight", None), Tensor):
        raise NotImplementedError(
            "the output embedding is wrapped (e.g. LoRA on lm_head); the fused op needs a plain weight matrix"
        )
    return head.weight, getattr(head, "bias", None)


def fused_head_problem(model) -> str | None:
    """Why the fused head cannot stand in for ``model``'s own logits, as far as its config and output embedding
    tell (soft-capping, a missing or wrapped head), or None. For integrations that choose a code path up front;
    the logits check of :func:`verify_model_logits` still runs on first use and catches the rest."""
    base = unwrap_model(model)
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    try:
        model_logit_temperature(config, 1.0)
        output_head(base)
    except (NotImplementedError, ValueError) as exc:
        return str(exc)
    return None


def generation_position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token: what ``generate`` gives a left-padded prompt."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def final_hidden_states(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``[B, T, D]`` output of the decoder body (final norm included), with positions counted from the first
    real token so that left-padded prompts see the same positions as in ``generate``."""
    decoder = unwrap_model(model).get_decoder()
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=generation_position_ids(attention_mask),
        use_cache=False,
        return_dict=True,
    )
    return out.last_hidden_state


def fused_head(model, rows: Tensor, labels: Tensor, temperature: float, backend: str, check_labels: bool = True,
               want=("logprobs", "entropy")) -> TokenStats:
    """The statistics ``want`` names (``sirl_kernels.STATISTICS``), at temperature ``temperature`` (already folded),
    of the output embedding of the unwrapped ``model`` applied to hidden-state ``rows [N, D]``, with ``labels [N]``
    (or ``[N, K]``); float32."""
    weight, bias = output_head(model)
    if rows.dtype != weight.dtype:  # autocast can leave the body in bf16 while the head stays fp32
        rows = rows.to(weight.dtype)
    return linear_token_stats(rows, weight, labels, want=want, bias=bias, temperature=temperature, backend=backend,
                              check_labels=check_labels)


# ---------------------------------------------------------------------------------------------------------------
# the logits check


def verification_enabled(verify_logits: bool | None = None) -> bool:
    """``verify_logits`` when given, else ``$SIRL_KERNELS_HF_VERIFY`` (``1``, the default, or ``0``)."""
    if verify_logits is not None:
        if not isinstance(verify_logits, bool):
            raise TypeError(f"verify_logits must be True, False or None, got {verify_logits!r}")
        return verify_logits
    value = os.environ.get(VERIFY_ENV, "").strip() or "1"
    if value not in ("0", "1"):
        raise ValueError(f"{VERIFY_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def clear_logits_verdicts() -> None:
    """Forgets every cached verdict of :func:`verify_model_logits` and every cached config fingerprint (tests; a
    model class or config edited in a live session)."""
    _logits_verdicts.clear()
    _fingerprints.clear()


def _verdict_key(base) -> tuple[type, str]:
    """``(class, config fingerprint)`` of an unwrapped model, the fingerprint computed once per model and config
    object (a config edited in place afterwards keeps its first fingerprint until :func:`clear_logits_verdicts`)."""
    cached = _fingerprints.get(base)
    if cached is None or cached[0] is not base.config:
        cached = (base.config, config_fingerprint(base.config))
        _fingerprints[base] = cached
    return type(base), cached[1]


def config_fingerprint(config) -> str:
    """A hash of every config value: two models of one class and fingerprint post-process logits alike."""
    values = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=repr).encode()).hexdigest()


def verify_model_logits(model, input_ids: Tensor, attention_mask: Tensor) -> None:
    """Raises ``NotImplementedError`` naming the model class if ``model(...).logits`` are not its output embedding
    (weight and bias) applied to the decoder output that the fused head is given, rescaled as
    :func:`model_logit_temperature` folds into the temperature.

    Runs once per (model class, config) and process; later calls reuse the verdict (a failed one raises again).
    The check feeds up to ``VERIFY_TOKENS`` real tokens of the batch row with the most of them through the model
    once (``model(...)``, the LM head on the last position only where the forward takes ``logits_to_keep``) and
    through the decoder once, under ``torch.no_grad()``, autocast off, every module in eval mode (each module's
    training flag is restored afterwards) and, on CUDA, no 16-bit split-K reductions. It then requires (1) the row
    the model's LM head received to equal this module's decoder output up to a few roundings, and (2) every one of
    the ``V`` logits to lie within one or two roundings of the logits' dtype (plus the fp32 accumulation, and TF32 /
    bf16 products of float32 matmuls) of the head recomputed in float64 from that row (:func:`head_logits_excess`).
    No kernel runs and no temperature enters (the comparison is of logits). Skipped while torch.compile traces; a
    batch without any attended token defers the check to a later call.
    """
    if torch.compiler.is_compiling():
        return
    base = unwrap_model(model)
    key = _verdict_key(base)
    if key not in _logits_verdicts:
        tokens = verification_tokens(input_ids, attention_mask)
        if tokens is None:
            return
        _logits_verdicts[key] = fused_head_disagreement(model, tokens)
    if _logits_verdicts[key] is not None:
        raise NotImplementedError(_logits_verdicts[key])


def verification_tokens(input_ids: Tensor, attention_mask: Tensor) -> Tensor | None:
    """``[1, L]``: the first ``VERIFY_TOKENS`` attended tokens of the row with the most, padding left out (so
    positions start at 0 either way); None when no token is attended."""
    attended = attention_mask.ne(0)
    row = int(attended.sum(-1).argmax())
    tokens = input_ids[row][attended[row]][:VERIFY_TOKENS]
    return tokens[None] if tokens.numel() else None


@contextlib.contextmanager
def eval_mode(model):
    """Every module in eval mode (no dropout) inside; each module's own training flag restored on exit."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def model_last_logits(model, input_ids: Tensor) -> tuple[Tensor, Tensor | None]:
    """``[V]`` logits of the unwrapped ``model``'s own forward at the last position of ``input_ids [1, L]``, and the
    ``[D]`` row its output embedding received there (None when the forward does not call that module)."""
    kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # the LM head on one position, as in generation, never over a sequence
    head_inputs = []
    handle = model.get_output_embeddings().register_forward_pre_hook(
        lambda module, args: head_inputs.append(args[0] if args and isinstance(args[0], Tensor) else None))
    try:
        logits = getattr(model(**kwargs), "logits", None)
    finally:
        handle.remove()
    if not isinstance(logits, Tensor):
        raise NotImplementedError(
            f"{type(model).__name__}.forward returns no logits, so sirl_kernels.hf cannot check its fused head "
            f"against them; pass verify_logits=False (or set {VERIFY_ENV}=0) if you know its logits are lm_head's"
        )
    head_input = head_inputs[-1] if head_inputs else None
    return logits[0, -1], None if head_input is None else head_input.reshape(-1, head_input.shape[-1])[-1]


def _matmul_unit(weight: Tensor, logits: Tensor) -> float:
    """Relative error of one product of the LM head's matmul: float32 weights may run in TF32 or bf16 ("high",
    "medium"); 16-bit products are exact in the fp32 accumulator."""
    if weight.dtype == torch.float32 and logits.dtype == torch.float32:
        precision = torch.get_float32_matmul_precision()
        if precision == "medium":
            return 2.0 ** -8
        if precision == "high":
            return 2.0 ** -10
    return 0.0


def head_logits_excess(logits: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, factor: float
                       ) -> tuple[int, float]:
    """``(how many, largest ratio)`` of ``logits [V]`` farther from ``factor * (hidden @ weight.T + bias)``
    (float64, ``hidden`` rounded to the weight's dtype as the fused head does) than the rounding bound allows.

    Bound per logit: one or two roundings to the logits' dtype (the head's output, then a folded rescaling), so
    ``eps * |expected|`` (1-2 ulp), plus the fp32 accumulation of D products and the bias,
    ``(D + 1) * 2^-24 * sum |h w|``, plus each product's own error where float32 matmuls run in TF32/bf16. A bf16
    model scaling its logits by 1.05 is 5% off, six times bf16's 2^-7.
    """
    eps = torch.finfo(logits.dtype).eps
    h = hidden.detach().to(weight.dtype).double()
    unit = (weight.shape[1] + 1) * 2.0 ** -24 + _matmul_unit(weight, logits)
    step = max(1, 2 ** 22 // max(1, weight.shape[1]))  # rows of the weight held in float64 at once (32 MiB)
    count, worst = 0, 0.0
    for v0 in range(0, weight.shape[0], step):
        w = weight[v0:v0 + step].detach().double()
        exact, size = w @ h, w.abs() @ h.abs()
        if bias is not None:
            b = bias[v0:v0 + step].detach().double()
            exact, size = exact + b, size + b.abs()
        expected = exact * factor
        allowed = eps * expected.abs() + abs(factor) * unit * size + torch.finfo(torch.float64).tiny
        ratio = (logits[v0:v0 + step].double() - expected).abs() / allowed
        ratio = torch.where(torch.isnan(ratio), torch.full_like(ratio, float("inf")), ratio)
        count += int((ratio > 1).sum())
        worst = max(worst, float(ratio.max()))
    return count, worst


def hidden_mismatch(ours: Tensor, model_input: Tensor) -> tuple[float, float]:
    """``(relative L2 difference, allowed)`` of the decoder output this module computes and the row the model's
    own LM head received: a few roundings of the hidden dtype (kernels may differ between the two runs on a GPU),
    far below a rescaling of the hidden state between decoder and head."""
    ours, theirs = ours.detach().double(), model_input.detach().double()
    difference = float((ours - theirs).norm() / theirs.norm().clamp_min(torch.finfo(torch.float64).tiny))
    return difference, max(4.0 * torch.finfo(model_input.dtype).eps, 2.0 ** -10)


@contextlib.contextmanager
def _full_precision_reductions(device: torch.device):
    """cuBLAS may reduce bf16/fp16 split-K partial sums in 16 bits (torch's default allows it); inside, it may not,
    so the model's logits carry only the roundings the check's bound counts."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    saved = flags.allow_bf16_reduced_precision_reduction, flags.allow_fp16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = flags.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction, flags.allow_fp16_reduced_precision_reduction = saved


def fused_head_disagreement(model, input_ids: Tensor) -> str | None:
    """None if ``model``'s own logits on ``input_ids [1, L]`` are its output embedding applied to the decoder output
    this module computes, rescaled as :func:`model_logit_temperature` folds it; else the error message."""
    base = unwrap_model(model)
    name = type(base).__name__
    with (torch.no_grad(), torch.autocast(input_ids.device.type, enabled=False), eval_mode(model),
          _full_precision_reductions(input_ids.device)):
        logits, head_input = model_last_logits(base, input_ids)
        weight, bias = output_head(base)
        if logits.shape[-1] != weight.shape[0]:
            return (f"{name}.forward returns {logits.shape[-1]} logits per position but its output embedding has "
                    f"{weight.shape[0]} rows; sirl_kernels.hf cannot reproduce them")
        hidden = final_hidden_states(model, input_ids, torch.ones_like(input_ids))[0, -1]
        if head_input is not None:
            difference, allowed = hidden_mismatch(hidden, head_input)
            if not difference <= allowed:  # NaN too
                return (f"{name}: the hidden state its lm_head receives differs from its decoder's output (relative "
                        f"difference {difference:.3g}, allowed {allowed:.2g}): the model transforms hidden states "
                        f"between the decoder and lm_head, which sirl_kernels.hf does not reproduce; {_ADVICE}")
            hidden = head_input
        factor = 1.0 / model_logit_temperature(base.config, 1.0)  # logits are linear in the folded rescaling
        count, worst = head_logits_excess(logits, hidden, weight, bias, factor)
    if count == 0:
        return None
    return (
        f"{name}: {count} of {logits.shape[-1]} logits of {name}.forward differ from lm_head (weight and bias) applied "
        f"to its hidden state, rescaled as sirl_kernels.hf folds Cohere's logit_scale and Granite's logits_scaling "
        f"(factor {factor:.6g}), by up to {worst:.3g} times the rounding bound of {logits.dtype} logits from "
        f"{weight.dtype} weights: the model transforms its logits after lm_head; {_ADVICE}"
    )


_ADVICE = (f"compute the logits yourself and use sirl_kernels.token_logprobs_entropy (pass verify_logits=False or set "
           f"{VERIFY_ENV}=0 only if you know the difference is harmless)")


def _sampler_head(model, rows: Tensor, labels: Tensor, temperature: float, backend: str, check_labels: bool, want,
                  support: tuple[int, float]) -> TokenStats:
    """:func:`fused_head` with ``logprobs`` and ``entropy`` of the sampler's truncated support."""
    if check_labels:
        validate_labels(labels, output_head(model)[0].shape[0])
    rest = tuple(w for w in want if w not in ("logprobs", "entropy"))
    stats = fused_head(model, rows, labels, temperature, backend, False, rest) if rest else TokenStats()
    weight, bias = output_head(model)
    rows = rows.to(weight.dtype)
    lp, entropy = linear_sampler_logprobs_entropy(rows, weight, labels, top_k=support[0], top_p=support[1],
                                                  bias=bias, temperature=temperature)
    return dataclasses.replace(stats, logprobs=lp if "logprobs" in want else None,
                               entropy=entropy if "entropy" in want else None)


# ---------------------------------------------------------------------------------------------------------------
# the public entry points


def causal_lm_token_stats(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    want=("logprobs", "entropy"),
    temperature: float = 1.0,
    backend: str = "auto",
    verify_logits: bool | None = None,
    check_labels: bool = True,
    support: tuple[int, float] | None = None,
    confidence_k: int = 0,
) -> TokenStats:
    """The per-token statistics ``want`` names (``sirl_kernels.STATISTICS``: the next token's log-prob, the entropy,
    self-certainty, varentropy, lse of the distribution that produced it) as float32 ``[B, T]`` tensors in a
    :class:`sirl_kernels.TokenStats`, zero outside the scored tokens; arguments and alignment as in
    :func:`causal_lm_token_logprobs_entropy`, of which this is the general form (one fused pass either way).
    ``support=(top_k, top_p)``: ``logprobs`` and ``entropy`` are those of the distribution a top-k then top-p
    sampler draws from (:func:`sirl_kernels.linear_sampler_logprobs_entropy`; the other statistics stay those of
    the full vocabulary). ``confidence_k > 0`` also fills ``top_k_confidence``: DeepConf's token confidence over
    the ``confidence_k`` most probable tokens (:func:`sirl_kernels.topk.linear_top_k_confidence`; detached)."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape or completion_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids, attention_mask and completion_mask must all be [B, T]; got {tuple(input_ids.shape)}, "
            f"{tuple(attention_mask.shape)}, {tuple(completion_mask.shape)}"
        )
    base = unwrap_model(model)
    folded_temperature = model_logit_temperature(base.config, float(temperature))
    output_head(base)  # a missing or wrapped head fails here, before any forward
    if verification_enabled(verify_logits):  # skipped while torch.compile traces (verify_model_logits)
        verify_model_logits(model, input_ids, attention_mask)

    hidden = final_hidden_states(model, input_ids, attention_mask)
    # Row t-1 predicts token t: gather only the rows whose next token is scored.
    predict = completion_mask[:, 1:].bool()
    rows_hidden, labels = hidden[:, :-1][predict], input_ids[:, 1:][predict]
    if support is None:
        rows = fused_head(base, rows_hidden, labels, folded_temperature, backend, check_labels, want)
    else:
        rows = _sampler_head(base, rows_hidden, labels, folded_temperature, backend, check_labels, want, support)
    if confidence_k:
        weight, bias = output_head(base)
        rows = dataclasses.replace(rows, top_k_confidence=linear_top_k_confidence(
            rows_hidden.to(weight.dtype), weight, confidence_k, bias=bias, temperature=folded_temperature,
            backend=backend))
    full = predict.new_zeros(input_ids.shape)
    full[:, 1:] = predict
    zeros = hidden.new_zeros(input_ids.shape, dtype=torch.float32)
    # Out-of-place scatters keep the graph: gradients flow back into the rows' statistics.
    values = {f.name: getattr(rows, f.name) for f in dataclasses.fields(rows)}  # not asdict: it deep-copies
    return TokenStats(**{name: None if value is None else zeros.masked_scatter(full, value)
                         for name, value in values.items()})


def causal_lm_token_logprobs_entropy(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    verify_logits: bool | None = None,
    check_labels: bool = True,
) -> tuple[Tensor, Tensor]:
    """Per-token log-prob of the next token and entropy of the distribution that produced it.

    Args:
        model: a transformers ``*ForCausalLM`` (optionally PEFT-wrapped; the active adapters are used).
        input_ids, attention_mask: ``[B, T]``.
        completion_mask: ``[B, T]``, 1 on the tokens to score (e.g. the completion). Position 0 is ignored.
        temperature: the logits are divided by it (on top of the model's own ``logit_scale``).
        verify_logits: check once per model class and config that the fused head reproduces ``model(...).logits``
            (:func:`verify_model_logits`; one extra forward over at most 16 tokens per process) and raise
            ``NotImplementedError`` if not. None (default) reads ``$SIRL_KERNELS_HF_VERIFY`` (``1`` unless set to
            ``0``); False skips the check, for a model you know applies nothing after ``lm_head`` that
            :func:`model_logit_temperature` does not fold (otherwise the results are silently wrong).
        check_labels: as in :func:`sirl_kernels.token_logprobs_entropy`: False skips the host-side check that
            token ids lie in ``[0, V)`` (one synchronisation on CUDA); an id outside it then gives NaN. That makes
            the kernel call sync-free, not this function: gathering the scored rows (``hidden[:, :-1][predict]``)
            and scattering the results back are boolean-mask operations whose size depends on the mask, so on
            CUDA each synchronises with the host (as does the logits check, once per model class and config).

    Returns:
        ``(logprobs, entropy)``, float32 ``[B, T]``; see the module docstring for the alignment. Differentiable
        with respect to the model's parameters when grad is enabled.
    """
    stats = causal_lm_token_stats(model, input_ids, attention_mask, completion_mask, temperature=temperature,
                                  backend=backend, verify_logits=verify_logits, check_labels=check_labels)
    return stats.logprobs, stats.entropy


def last_token_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    candidates,
    *,
    temperature: float = 1.0,
    backend: str = "auto",
    verify_logits: bool | None = None,
) -> Tensor:
    """``[B, K]`` float32: log-probs of each of the ``K`` token ids ``candidates`` as the next token after each
    row of ``input_ids`` (left-padded), through the same fail-closed path as
    :func:`causal_lm_token_logprobs_entropy` (the model's logit scaling folded in, the logits check on first use).
    What a judge or a classifier reading a model's next-token distribution needs, without its ``[B, V]`` logits."""
    base = unwrap_model(model)
    folded_temperature = model_logit_temperature(base.config, float(temperature))
    output_head(base)
    if verification_enabled(verify_logits):
        verify_model_logits(model, input_ids, attention_mask)
    last = final_hidden_states(model, input_ids, attention_mask)[:, -1]
    labels = torch.tensor([int(c) for c in candidates], device=last.device).expand(last.shape[0], -1)
    return fused_head(base, last, labels.contiguous(), folded_temperature, backend, want=("logprobs",)).logprobs


def sirl_reward(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    temperature: float = 1.0,
    *,
    verify_logits: bool | None = None,
    check_labels: bool = True,
) -> Tensor:
    """The SIRL reward: minus the mean per-token entropy over each sequence's completion tokens, ``[B]`` float32.

    The entropy counted for token ``t`` is that of the distribution that produced it. Sequences with no scored
    token get 0. Call under ``torch.no_grad()`` (the reward is a constant for the policy gradient).
    ``verify_logits``, ``check_labels``: as in :func:`causal_lm_token_logprobs_entropy`.
    """
    _, entropy = causal_lm_token_logprobs_entropy(
        model, input_ids, attention_mask, completion_mask, temperature=temperature, verify_logits=verify_logits,
        check_labels=check_labels,
    )
    mask = completion_mask.clone()
    mask[:, 0] = 0
    mask = mask.to(entropy.dtype)
    return -(entropy * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
