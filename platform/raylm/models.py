"""Build the causal LM: from a config preset (sized to the tokenizer and `seq_len`) or `from_pretrained`.

Weights load from safetensors only (`use_safetensors=True`: a directory holding only pickle weights is refused)
and `trust_remote_code` stays off unless the config asks for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raylm.config import ModelSection
from raylm.errors import UsageError

GPT2_PRESETS: dict[str, dict[str, Any]] = {
    # Tests and the demo: trains in seconds on a laptop CPU.
    "tiny": {"n_layer": 2, "n_head": 4, "n_embd": 128},
    # GPT-2 small (124M parameters).
    "gpt2-small": {"n_layer": 12, "n_head": 12, "n_embd": 768},
}
LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    # A small Llama-style model: RMSNorm, rotary positions, SwiGLU, grouped-query attention.
    "llama-tiny": {
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
PRESETS = {**GPT2_PRESETS, **LLAMA_PRESETS}


class ModelLoadError(UsageError):
    """The model directory or hub id cannot be loaded as asked (missing, pickle-only weights, ...)."""


def build_model(section: ModelSection, vocab_size: int, seq_len: int, eos_id: int, pad_id: int):
    """A fresh model from the preset, or the pretrained one (whose context must hold `seq_len`)."""
    if section.pretrained:
        model = load_pretrained(section.pretrained, section.trust_remote_code)
        context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 0)
        if context and context < seq_len:
            raise ModelLoadError(
                f"model.pretrained has a context of {context} tokens, less than data.seq_len={seq_len}"
            )
        if model.get_input_embeddings().num_embeddings < vocab_size:
            model.resize_token_embeddings(vocab_size)
        return model
    vocab_size = -(-vocab_size // section.vocab_multiple) * section.vocab_multiple
    if section.preset in LLAMA_PRESETS:
        return _llama(section, vocab_size, seq_len, eos_id, pad_id)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq_len,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        resid_pdrop=section.dropout,
        embd_pdrop=section.dropout,
        attn_pdrop=section.dropout,
        **GPT2_PRESETS[section.preset],
    )
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


def _llama(section: ModelSection, vocab_size: int, seq_len: int, eos_id: int, pad_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=seq_len,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        attention_dropout=section.dropout,
        tie_word_embeddings=True,
        **LLAMA_PRESETS[section.preset],
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def load_pretrained(name_or_path: str, trust_remote_code: bool = False, **kwargs: Any):
    """`AutoModelForCausalLM.from_pretrained` of a local directory or hub id, safetensors only."""
    from transformers import AutoModelForCausalLM

    local = Path(name_or_path).expanduser()
    if local.is_dir() and not any(local.glob("*.safetensors")):
        raise ModelLoadError(f"{local} has no .safetensors weights (pickle weights are not loaded)")
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(local) if local.is_dir() else name_or_path,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load model {name_or_path!r}: {err}") from None


def context_length(model) -> int:
    config = model.config
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", 0))
