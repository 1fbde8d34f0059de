"""The LLM's tokenizer, loaded with ``transformers`` from a local folder (no hub access)."""
from __future__ import annotations

import os

# Files any of which makes a folder loadable by AutoTokenizer (fast json, sentencepiece, BPE).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


def load_tokenizer(folder: str, **kwargs):
    """``transformers.AutoTokenizer`` from ``folder`` (a HF model or tokenizer folder), offline.

    Raises FileNotFoundError naming the folder when it is missing or holds no tokenizer files, and
    ValueError (with transformers' reason) when the files are there but do not load.
    """
    import transformers

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"tokenizer folder {folder!r} does not exist")
    present = [f for f in _TOKENIZER_FILES if os.path.exists(os.path.join(folder, f))]
    if not present:
        raise FileNotFoundError(
            f"{folder!r} has no tokenizer files (looked for {', '.join(_TOKENIZER_FILES)}); "
            "save one with tokenizer.save_pretrained(folder)"
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises many types; keep the folder in the message
        raise ValueError(f"cannot load the tokenizer in {folder!r} (files: {present}): {e}") from e
