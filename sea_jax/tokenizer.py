"""The LLM's tokenizer: loading it with ``transformers`` from a local folder (no hub access), and
the token ids that end a chat model's reply."""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

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


def stop_token_ids(tokenizer: Any, eos_token_id: int | Sequence[int] | None = None) -> list[int]:
    """Ids that end generation: the LLM config's EOS id(s), the tokenizer's EOS, and the special
    token the chat template writes right after an assistant message (Gemma's ``<end_of_turn>``,
    Llama 3's ``<|eot_id|>``, Phi-3's ``<|end|>``), which a chat model emits instead of EOS (the
    ``generation_config.eos_token_id`` list of those HF checkpoints)."""
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or ())
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if getattr(tokenizer, "chat_template", None):
        marker = "XQZJ"
        msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": marker}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        tail = text[text.index(marker) + len(marker):] if marker in text else ""
        after = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
        special = set(tokenizer.all_special_ids) | {
            i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        if after and after[0] in special:
            ids.append(int(after[0]))
    return list(dict.fromkeys(ids))


__all__ = ["load_tokenizer", "stop_token_ids"]
