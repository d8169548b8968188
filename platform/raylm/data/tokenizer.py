"""Train a byte-level BPE on a sample of the corpus, or load an existing Hugging Face tokenizer.

Either way the result is saved as a `PreTrainedTokenizerFast` directory next to the shards, so training and serving
load exactly the tokenizer the shards were made with (`AutoTokenizer.from_pretrained(dir)`), and the Ray Data
actors load its `tokenizer.json` with the light `tokenizers` library.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from raylm.config import TokenizerSection
from raylm.data.sources import DataError
from raylm.digests import tokenizer_hash

EOS_TOKEN = TokenizerSection.model_fields["eos_token"].default
PAD_TOKEN = TokenizerSection.model_fields["pad_token"].default


def train_bpe(texts: Iterable[str], vocab_size: int, bos: str = EOS_TOKEN, eos: str = EOS_TOKEN, pad: str = PAD_TOKEN):
    """A byte-level BPE (GPT-2 style: no unknown tokens, any text round-trips) with BOS, EOS and PAD specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(dict.fromkeys([eos, bos, pad])),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=None)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A local tokenizer directory or a hub id; it must be a fast tokenizer with an EOS token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise DataError(f"data.tokenizer.path: cannot load tokenizer {name_or_path!r}: {err}") from None
    if not tokenizer.is_fast:
        raise DataError(f"data.tokenizer.path: {name_or_path!r} has no fast (tokenizer.json) version")
    if tokenizer.eos_token_id is None:
        raise DataError(f"data.tokenizer.path: {name_or_path!r} has no EOS token to separate documents")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def sample_texts(batches: Iterable[list[str | None]], max_bytes: int) -> Iterable[str]:
    """Yield documents from an iterator of text batches until about `max_bytes` have gone by."""
    seen = 0
    for texts in batches:
        for text in texts:
            if text and text.strip():
                piece = text[: max_bytes - seen]  # one huge document must not blow the budget
                yield piece
                seen += len(piece)
                if seen >= max_bytes:
                    return


def build_tokenizer(section: TokenizerSection, text_batches: Iterable[list[str]], out_dir: Path):
    """Train or load the tokenizer and save it to `out_dir`. Returns the tokenizer."""
    shutil.rmtree(out_dir, ignore_errors=True)
    if section.path:
        tokenizer = load_tokenizer(section.path)
    else:
        tokenizer = train_bpe(
            sample_texts(text_batches, section.sample_bytes),
            section.vocab_size,
            bos=section.bos_token,
            eos=section.eos_token,
            pad=section.pad_token,
        )
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tokenizer_source_hash(section: TokenizerSection) -> str | None:
    """For a local tokenizer directory: a hash of its tokenizer.json, so that editing it invalidates the shards."""
    if section.path and (Path(section.path).expanduser() / "tokenizer.json").is_file():
        return tokenizer_hash(Path(section.path).expanduser())
    return None
