"""The non-weight files of an exported Llava folder: the tokenizer (``<image>`` special, the
multimodal chat template), the processor (image preprocessing as training did it) and
``generation_config.json``; and reading an exported folder's preprocessing back.
:mod:`sea_jax.convert.hf_llava` writes the weights and config.json around these.
"""
from __future__ import annotations

import json
import os
from typing import Any

from sea_jax.models.mllm import MLLMConfig

IMAGE_TOKEN = "<image>"

# LLaVA stage-1 ("plain") has no chat format: image then text. Used when the tokenizer has no
# chat template and none is given.
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if not loop.last %}\n{% endif %}{% endfor %}"
)

# Prepended to the LLM's chat template: turns HF-processor style contents
# ([{"type": "image"}, {"type": "text", "text": ...}]) into the string LLaVA trains on
# ("<image>\n" + text), then the LLM's own template renders the strings. String contents pass
# through untouched, so the tokenizer and the processor render the same text for the same chat.
_CONTENT_TO_STRING = (
    "{%- set _sea = namespace(msgs=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set _sea.msgs = _sea.msgs + [m] -%}"
    "{%- else -%}{%- set _c = namespace(s='') -%}"
    "{%- for part in m['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set _c.s = _c.s + '<image>\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set _c.s = _c.s + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set _sea.msgs = _sea.msgs + [{'role': m['role'], 'content': _c.s}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = _sea.msgs -%}"
)
_WRAP_MARK = "{%- set _sea = namespace(msgs=[]) -%}"


def multimodal_chat_template(template: str) -> str:
    """The LLM's chat template extended to image/text content lists (idempotent)."""
    if template.startswith(_WRAP_MARK):
        return template
    return _CONTENT_TO_STRING + template


def prepare_tokenizer(tokenizer: Any, cfg: MLLMConfig, chat_template: str | None = None,
                      eos_is_end_of_turn: bool = False):
    """A copy of ``tokenizer`` with ``<image>`` an added special token at ``cfg.image_token_id``
    and the multimodal chat template.

    Adding ``<image>`` grows the tokenizer by one when it lacks the token: its new id must be the
    model's ``image_token_id`` and every token id must have an embedding row (len(tokenizer) <=
    vocab_size); otherwise the export would silently give the placeholder someone else's row, so
    this raises and says what to fix.

    ``eos_is_end_of_turn``: make the chat template's end-of-turn token (Gemma's ``<end_of_turn>``,
    ...) the tokenizer's EOS, for tools that stop generating only at ``tokenizer.eos_token_id``
    (lmms-eval's ``llava_hf`` passes ``eos_token_id=tokenizer.eos_token_id`` to ``generate``,
    overriding ``generation_config.json``). A no-op for templates whose turns end with EOS.
    """
    import tempfile

    from sea_jax.tokenizer import stop_token_ids

    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    added = IMAGE_TOKEN not in tokenizer.get_vocab()
    # A reload is the public way (transformers 5) to name <image> as the tokenizer's
    # ``image_token`` (saved in tokenizer_config.json, read by LlavaProcessor); it also leaves the
    # caller's tokenizer untouched.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True, extra_special_tokens={"image_token": IMAGE_TOKEN})
    tok.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_id != cfg.image_token_id:
        how = "was added to the tokenizer and got" if added else "is in the tokenizer as"
        raise ValueError(
            f"{IMAGE_TOKEN} {how} id {image_id}, but the model's image_token_id is {cfg.image_token_id}; "
            "export with the tokenizer the model was trained with"
        )
    if len(tok) > cfg.llm.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tok)} tokens (with {IMAGE_TOKEN}) but the LLM's embedding has only "
            f"{cfg.llm.vocab_size} rows; resize the embedding (and lm_head) to at least {len(tok)} rows"
        )
    template = chat_template or tok.chat_template or PLAIN_CHAT_TEMPLATE
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()))
    tok.chat_template = multimodal_chat_template(template)
    if eos_is_end_of_turn:
        ends = [i for i in stop_token_ids(tok) if i != tok.eos_token_id]
        if ends:
            tok.eos_token = tok.convert_ids_to_tokens(ends[-1])
    return tok


def image_processor(cfg: MLLMConfig, pad_to_square: bool):
    """``LlavaImageProcessorPil`` doing what :func:`sea_jax.data.images.preprocess_image` does with
    the model's :attr:`~sea_jax.models.mllm.MLLMConfig.pixel_spec` (SigLIP: resize to the square;
    CLIP: shorter side then centre crop, OpenAI's mean / std)."""
    from transformers.models.llava import LlavaImageProcessorPil

    spec = cfg.pixel_spec
    s = spec.size
    return LlavaImageProcessorPil(
        do_resize=True,
        size={"shortest_edge": s} if spec.center_crop else {"height": s, "width": s},
        resample=3,  # PIL bicubic
        do_center_crop=bool(spec.center_crop),
        crop_size={"height": s, "width": s},  # read by the processor to count image tokens
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
        do_pad=bool(pad_to_square),  # LLaVA expand2square with int(mean * 255), before the resize
        do_convert_rgb=True,
    )


def make_processor(cfg: MLLMConfig, tokenizer: Any, pad_to_square: bool):
    """``LlavaProcessor`` over a tokenizer from :func:`prepare_tokenizer`."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=image_processor(cfg, pad_to_square),
        tokenizer=tokenizer,
        patch_size=cfg.vision.patch_size,
        vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )


def write_generation_config(cfg: MLLMConfig, tok: Any, out_dir: str) -> None:
    """``generation_config.json``: BOS, pad and every id the model ends a reply with: the LLM's EOS
    id(s), the tokenizer's EOS, and the chat template's end-of-turn token (Gemma's
    ``<end_of_turn>``, Llama 3's ``<|eot_id|>``, Phi-3's ``<|end|>``), which a chat model emits
    instead of EOS: HF ``generate`` then stops where ``python -m sea_jax.generate`` stops."""
    from transformers import GenerationConfig

    from sea_jax.tokenizer import stop_token_ids

    eos_ids = stop_token_ids(tok, cfg.llm.eos_token_id)
    pad = cfg.llm.pad_token_id if cfg.llm.pad_token_id is not None else tok.pad_token_id
    bos = cfg.llm.bos_token_id if cfg.llm.bos_token_id is not None else tok.bos_token_id
    gen = GenerationConfig(
        bos_token_id=bos,
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        pad_token_id=pad,
    )
    gen.save_pretrained(out_dir)


def read_preprocessing(folder: str) -> dict:
    """``{"image_size": int, "pad_to_square": bool}`` of an exported folder's image processor, so
    generation in JAX preprocesses as the folder says (processor_config.json, else
    preprocessor_config.json)."""
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                d = json.load(f)
            d = d.get(key, {}) if key else d
            if d:
                size = d.get("size", {})
                side = size.get("height") or size.get("shortest_edge")
                return {"image_size": side, "pad_to_square": bool(d.get("do_pad", False))}
    raise FileNotFoundError(f"{folder}: no processor_config.json or preprocessor_config.json")


__all__ = ["IMAGE_TOKEN", "PLAIN_CHAT_TEMPLATE", "multimodal_chat_template", "prepare_tokenizer", "image_processor",
           "make_processor", "write_generation_config", "read_preprocessing"]
