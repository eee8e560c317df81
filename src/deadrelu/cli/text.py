"""``deadrelu scan DIR --text corpus.txt``: a dead-neuron census of a local Hugging Face model on text.

``DIR`` is a model directory on disk (``save_pretrained`` output, or a snapshot you copied):
the model and its tokenizer are loaded with ``from_pretrained(DIR, local_files_only=True)``
and ``trust_remote_code=False`` — never the network, never code shipped with the model.
The corpus is a UTF-8 text file, one document per line (blank lines skipped). Documents are
tokenised with the model's own tokenizer in batches, padded to the longest document of the
batch and truncated to ``--max-length``; each batch is a dict with the ``attention_mask``,
which the scan uses so that padding positions are never counted as observations.

The corpus is read line by line as the scan runs and every batch is dropped after its forward
pass, so memory stays at the model plus one batch plus the per-unit counters, whatever the
corpus size.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .._imports import require
from ..errors import DataError, DeadReluError
from .loading import one_line

__all__ = ["load_text_model", "TextBatches", "count_documents"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' and the hub's log lines and warnings while loading (the CLI prints its own)."""
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(name) for name in ("transformers", "huggingface_hub", "tokenizers")]
    levels = [lg.level for lg in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        hf_logging.disable_progress_bar()  # "Loading weights" bars; the scan shows its own
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_text_model(directory: str, *, dtype: str | None = None) -> tuple[nn.Module, Any]:
    """Load a Hugging Face model and its tokenizer from a local directory, offline and without remote code.

    Args:
        directory: a folder holding ``config.json``, the weights and the tokenizer files.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (default: as saved).

    Returns:
        ``(model, tokenizer)``; the model in eval mode.

    Raises:
        ModuleNotFoundError: transformers is not installed (names the pip extra).
        DeadReluError: the folder is missing or is not a model directory, or loading fails.
    """
    path = Path(directory)
    if not path.exists():
        raise DeadReluError(f"model directory not found: {directory}")
    if not path.is_dir():
        raise DeadReluError(f"--text needs MODEL to be a Hugging Face model directory, but {directory} is a file")
    if not (path / "config.json").is_file():
        raise DeadReluError(f"{directory} is not a Hugging Face model directory (no config.json)")
    if dtype is not None and dtype not in _DTYPES:
        raise DeadReluError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    transformers = require("transformers", "transformers")
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = _DTYPES[dtype]
    with _quiet_transformers():
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), **kwargs)
        except Exception as err:
            raise DeadReluError(f"cannot load the tokenizer of {directory}: {type(err).__name__}: {one_line(err, 250)}") from err
        try:
            model = transformers.AutoModel.from_pretrained(str(path), **kwargs)
        except Exception as err:
            raise DeadReluError(f"cannot load the model in {directory}: {type(err).__name__}: {one_line(err, 250)}") from err
    if tokenizer.pad_token is None:  # decoder-only tokenizers (GPT-2, Llama) have no pad token
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise DeadReluError(f"the tokenizer of {directory} has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False  # a census needs no key/value cache; it only costs memory
    return model.eval(), tokenizer


def model_max_length(model: nn.Module, tokenizer: Any) -> int | None:
    """The longest input the model takes: the tokenizer's limit or the position embeddings, if known."""
    limits = []
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:  # unset limits are a huge sentinel
        limits.append(tok_limit)
    pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(pos, int) and pos > 0:
        limits.append(pos)
    return min(limits) if limits else None


def count_documents(corpus: str | Path) -> int:
    """Non-blank lines of a UTF-8 corpus, read once before the scan (for the progress bar and early errors).

    Raises:
        DataError: the file is missing, a folder, not UTF-8, or holds no documents.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "corpus.txt"
        >>> _ = f.write_text("one document\\n\\nanother one\\n")
        >>> count_documents(f)
        2
    """
    path = Path(corpus)
    if not path.exists():
        raise DataError(f"text corpus not found: {corpus}")
    if path.is_dir():
        raise DataError(f"--text {corpus} is a directory; expected a text file with one document per line")
    count = 0
    try:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    count += 1
    except UnicodeDecodeError as err:
        raise DataError(f"{corpus} is not UTF-8 text (byte {err.start}: {err.reason})") from None
    if count == 0:
        raise DataError(f"{corpus} holds no documents (every line is blank)")
    return count


class TextBatches:
    """Tokenised batches of a corpus, read line by line: ``{"input_ids", "attention_mask", ...}`` dicts.

    Args:
        corpus: UTF-8 text file, one document per line.
        tokenizer: a Hugging Face tokenizer (with a pad token).
        batch_size: documents per batch.
        max_length: tokens per document at most (longer ones are truncated).

    Raises:
        DataError: see :func:`count_documents`.
    """

    def __init__(self, corpus: str | Path, tokenizer: Any, *, batch_size: int, max_length: int | None) -> None:
        self.corpus = Path(corpus)
        self.documents = count_documents(corpus)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokens = 0  # real (unpadded) tokens fed so far
        self.positions = 0  # token positions fed so far, padding included

    def __len__(self) -> int:
        return math.ceil(self.documents / self.batch_size)

    def _encode(self, docs: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            docs,
            padding=True,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        if "attention_mask" not in batch:
            raise DataError("the tokenizer returned no attention_mask; cannot tell padding from tokens")
        self.tokens += int(batch["attention_mask"].sum())
        self.positions += batch["attention_mask"].numel()
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        docs: list[str] = []
        with self.corpus.open(encoding="utf-8") as fh:
            for line in fh:
                text = line.strip()
                if not text:
                    continue
                docs.append(text)
                if len(docs) == self.batch_size:
                    yield self._encode(docs)
                    docs = []
        if docs:
            yield self._encode(docs)


def text_scan_inputs(
    directory: str, corpus: str, *, batch_size: int, max_length: int | None, dtype: str | None
) -> tuple[nn.Module, TextBatches]:
    """Model and batches for ``deadrelu scan DIR --text corpus.txt`` (the corpus is checked first: it is cheap).

    Raises:
        DeadReluError: a bad corpus, model directory or ``max_length``.
    """
    count_documents(corpus)
    model, tokenizer = load_text_model(directory, dtype=dtype)
    limit = model_max_length(model, tokenizer)
    if max_length is None:
        max_length = limit
    elif limit is not None and max_length > limit:
        raise DeadReluError(f"--max-length {max_length} is more than this model takes ({limit} tokens)")
    return model, TextBatches(corpus, tokenizer, batch_size=batch_size, max_length=max_length)
