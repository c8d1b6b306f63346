"""CLIP's BPE tokenizer, taken from the openai-clip distribution without importing ``clip``
(its ``__init__`` imports torchvision, which does not work with the CPU torch used here)."""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from pathlib import Path

import torch

SOT, EOT = 49406, 49407  # <|startoftext|>, <|endoftext|>


@functools.lru_cache(maxsize=1)
def _simple_tokenizer_module():
    try:
        dist = importlib.metadata.distribution("openai-clip")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("the openai-clip package is missing: run `make setup` "
                          "(or `pip install --no-deps openai-clip ftfy regex`)") from None
    src = Path(dist.locate_file("clip/simple_tokenizer.py"))
    vocab = Path(dist.locate_file("clip/bpe_simple_vocab_16e6.txt.gz"))
    if not src.is_file() or not vocab.is_file():
        raise ImportError(f"openai-clip is installed but {src.name} or {vocab.name} is missing; reinstall it")
    spec = importlib.util.spec_from_file_location("_openai_clip_simple_tokenizer", src)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, str(vocab)


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """The openai-clip ``SimpleTokenizer`` (ftfy + whitespace clean, lower-case, BPE)."""
    module, vocab = _simple_tokenizer_module()
    return module.SimpleTokenizer(bpe_path=vocab)


def tokenize(texts: str | list[str], context_length: int = 77) -> torch.Tensor:
    """Texts -> int64 (N, context_length): SOT, BPE tokens, EOT, zero padding (as ``clip.tokenize``).
    A text that does not fit raises ``ValueError`` naming it."""
    if isinstance(texts, str):
        texts = [texts]
    tok = get_tokenizer()
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [SOT, *tok.encode(text), EOT]
        if len(ids) > context_length:
            raise ValueError(f"prompt {text!r} is {len(ids)} tokens long; CLIP's context is {context_length}")
        out[i, : len(ids)] = torch.tensor(ids)
    return out
