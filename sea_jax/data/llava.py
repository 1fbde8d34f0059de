"""LLaVA-format records -> token ids + loss mask, for the two training templates.

A record (``blip_laion_cc_sbu_558k.json`` / ``llava_v1_5_mix665k.json`` format)::

    {"id": "000123", "image": "00012/000123.jpg",            # "image" absent = text-only
     "conversations": [{"from": "human", "value": "<image>\\nWhat is this?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Templates (``config.data.template``):

``plain`` (stage 1, LLaVA's ``preprocess_plain``)
    ``[BOS] <image>*N caption EOS``: the human turn's text is dropped, the caption is the first gpt
    turn's value; only ``caption EOS`` is supervised. (LLaVA ends the caption with its plain
    separator ``"\\n"``; we end it with the tokenizer's EOS so that a stage-1 model learns to stop.)
``chat`` (stage 2)
    the LLM tokenizer's own ``chat_template`` (``apply_chat_template``); the loss is on the assistant
    turns only: each assistant turn's content and its end-of-turn token(s), not the whitespace a
    template puts after them (Gemma's / Phi-3's ``"\\n"``), never the prompts or the role headers.
    Vicuna has no jinja template: :data:`VICUNA_V1_TEMPLATE` is LLaVA's ``conv_vicuna_v1`` format
    written as one, set it as ``tokenizer.chat_template``.

How the chat mask is built, turn by turn, so that no sample is ever silently mis-masked: the whole
conversation is rendered once (the text ``apply_chat_template(tokenize=False)`` gives), and for each
assistant turn ``i`` the conversation up to it is rendered twice more, ``messages[:i]`` with the
generation prompt and ``messages[:i+1]`` without (cut where it stops agreeing with a rendering that
has one more user turn, so text a template adds only at the very end, like Phi-3's final EOS, is not
part of the turn); both must be literal prefixes of the whole text (else the template is not
prefix-stable and the sample is skipped), and the characters between their ends are that turn's
supervised span (trailing whitespace removed). The whole text is tokenized once,
exactly as ``apply_chat_template(tokenize=True)`` does (``add_special_tokens=False``), with character
offsets; a token is supervised when it overlaps a span. A token that straddles a span boundary
(other than by whitespace, which belongs to the side it is tokenized with) is a tokenization mismatch:
the sample is skipped with reason ``template_mismatch`` instead of being masked wrongly.

The ``<image>`` placeholder must be a special token of the tokenizer (:func:`add_image_token`); it
tokenizes to one id, which is then expanded to ``num_image_tokens`` copies (never supervised).

Every rejection raises :class:`SkipSample` with a reason from :data:`SKIP_REASONS`; the pipeline
counts and logs them (``sea_jax.data.pipeline``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

IMAGE_TOKEN = "<image>"

# Why a sample can be skipped; the pipeline's counters use exactly these keys.
SKIP_REASONS: tuple[str, ...] = (
    "bad_record",         # wrong fields / types / roles, misplaced or repeated <image>
    "empty_response",     # a gpt turn (the caption for `plain`) is empty or whitespace
    "missing_image",      # the image file does not exist
    "corrupt_image",      # the image exists but cannot be decoded
    "image_truncated",    # the image tokens do not fit in max_length
    "target_truncated",   # every supervised token lies beyond max_length
    "template_mismatch",  # turn-by-turn rendering / tokenization disagree with the whole conversation
)

# LLaVA-1.5's `conv_vicuna_v1` (llava/conversation.py, SeparatorStyle.TWO, seps " " and "</s>"):
#   "{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
# written as a jinja chat template (Vicuna's tokenizer ships none). A leading "system" message
# replaces the default system prompt.
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
VICUNA_V1_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '" + VICUNA_V1_SYSTEM.replace("'", "\\'") + "' %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{{ system }} "
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


class SkipSample(Exception):
    """A sample that must not be trained on; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class ImageToken(NamedTuple):
    """Result of :func:`add_image_token`."""

    id: int             # the token id of "<image>"
    added: bool         # the tokenizer did not have it; it was appended to the vocabulary now
    needs_resize: bool  # id >= the embedding rows given (the LLM's embeddings must grow to id + 1)


def add_image_token(tokenizer, token: str = IMAGE_TOKEN, vocab_size: int | None = None) -> ImageToken:
    """Makes ``token`` a special token of ``tokenizer`` (in place) and returns its id.

    Args:
      tokenizer: a ``transformers`` tokenizer.
      token: the placeholder text.
      vocab_size: rows of the LLM's input embedding table; ``None`` = ``tokenizer.vocab_size``
        (the base vocabulary, without added tokens).

    A token already present as an ordinary (non-special) added token is re-registered as special
    so that it is never split; an existing vocabulary entry keeps its id.
    """
    from tokenizers import AddedToken

    vocab_size = tokenizer.vocab_size if vocab_size is None else int(vocab_size)
    before = len(tokenizer)
    if token not in tokenizer.all_special_tokens:
        # special=True: never split or normalised, and kept by `skip_special_tokens` decoding.
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    added = len(tokenizer) > before
    token_id = tokenizer.convert_tokens_to_ids(token)
    if tokenizer(token, add_special_tokens=False)["input_ids"] != [token_id]:
        raise ValueError(f"{token!r} does not tokenize to the single id {token_id}")
    return ImageToken(int(token_id), added, int(token_id) >= vocab_size)


# ----------------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass(frozen=True)
class Record:
    """A validated record: ``messages`` are chat messages ({"role": "user"|"assistant"|"system",
    "content": str}) in order; ``image`` the relative image path or None (text-only)."""

    sample_id: str
    image: str | None
    messages: tuple[dict[str, str], ...]


def record_id(record: Any, index: int) -> str:
    """The id used in logs: the record's ``id``, else its position in the file."""
    if isinstance(record, dict) and isinstance(record.get("id"), (str, int)):
        return str(record["id"])
    return f"#{index}"


def parse_record(record: Any, index: int) -> Record:
    """Validates a raw JSON record (see the module docstring) into a :class:`Record`.

    Raises:
      SkipSample: ``bad_record`` (wrong fields/types/roles, not alternating human/gpt, ``<image>`` in
        a gpt turn, more than one ``<image>``, ``<image>`` in a text-only record) or
        ``empty_response`` (a gpt turn that is empty or whitespace).
    """
    sid = record_id(record, index)
    if not isinstance(record, dict):
        raise SkipSample("bad_record", f"record is a {type(record).__name__}, not an object")
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise SkipSample("bad_record", f"'image' must be a non-empty string, got {image!r}")
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise SkipSample("bad_record", "'conversations' must be a non-empty list")
    messages = []
    for t, turn in enumerate(conv):
        if not isinstance(turn, dict) or turn.get("from") not in _ROLES or not isinstance(turn.get("value"), str):
            raise SkipSample("bad_record", f"turn {t} must be {{'from': human|gpt|system, 'value': str}}")
        messages.append({"role": _ROLES[turn["from"]], "content": turn["value"]})
    if messages[0]["role"] == "system":
        body = messages[1:]
    else:
        body = messages
    if any(m["role"] == "system" for m in body):
        raise SkipSample("bad_record", "a system turn is only allowed first")
    if not body or len(body) % 2 or any(
            m["role"] != ("user" if k % 2 == 0 else "assistant") for k, m in enumerate(body)):
        raise SkipSample("bad_record", "turns must alternate human, gpt, ..., ending with gpt")
    for k, m in enumerate(body):
        if m["role"] == "assistant" and not m["content"].strip():
            raise SkipSample("empty_response", f"gpt turn {k} is empty")
    placeholders = [m["content"].count(IMAGE_TOKEN) for m in messages]
    if any(c and m["role"] != "user" for c, m in zip(placeholders, messages)):
        raise SkipSample("bad_record", f"{IMAGE_TOKEN} outside a human turn")
    if sum(placeholders) > 1:
        raise SkipSample("bad_record", f"{sum(placeholders)} {IMAGE_TOKEN} placeholders (at most 1)")
    if image is None and sum(placeholders):
        raise SkipSample("bad_record", f"{IMAGE_TOKEN} in a record without an image")
    return Record(sid, image, tuple(messages))


# ----------------------------------------------------------------------------------------------
# Encoding


def place_image_token(text: str) -> str:
    """LLaVA-1.5's placement of the image in a human turn (``preprocess_multimodal``): the
    ``<image>`` placeholder is taken out wherever it stood, the text stripped, and ``"<image>\n"``
    put in front (``"What is this?\n<image>"`` -> ``"<image>\nWhat is this?"``)."""
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenized sample.

    Attributes:
      input_ids: int32 ``[T]``, T <= max_length, image placeholder expanded to N image-token ids.
      loss_mask: bool ``[T]``; True where the token at that position is a target (predicted from
        the tokens before it).
      truncated: the sequence was cut at max_length (after the image tokens).
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    truncated: bool


class Encoder:
    """Turns :class:`Record` s into :class:`Encoded` samples for one template. Picklable (it is
    shipped to Grain worker processes with the tokenizer).

    Args:
      tokenizer: the LLM's ``transformers`` tokenizer (fast, for the ``chat`` template's offsets),
        with ``<image>`` as a special token (:func:`add_image_token`).
      template: ``"plain"`` or ``"chat"``.
      image_token_id: id of ``<image>``.
      num_image_tokens: N, the visual tokens one image becomes (the patch count).
      max_length: the context; longer samples are truncated after the image tokens.
    """

    def __init__(self, tokenizer, template: str, image_token_id: int, num_image_tokens: int, max_length: int):
        if template not in ("plain", "chat"):
            raise ValueError(f"template must be 'plain' or 'chat', got {template!r}")
        if template == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("template='chat' needs tokenizer.chat_template (for Vicuna set VICUNA_V1_TEMPLATE)")
        if template == "chat" and not getattr(tokenizer, "is_fast", False):
            raise ValueError("template='chat' needs a fast tokenizer (character offsets)")
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_token_id:
            raise ValueError(f"{IMAGE_TOKEN} is not token {image_token_id} of the tokenizer; use add_image_token")
        if template == "plain" and tokenizer.eos_token_id is None:
            raise ValueError("template='plain' needs tokenizer.eos_token_id")
        self.tokenizer = tokenizer
        self.template = template
        self.image_token_id = int(image_token_id)
        self.num_image_tokens = int(num_image_tokens)
        self.max_length = int(max_length)
        # The ids a plain call adds around text (BOS for Gemma/Llama); `plain` starts with them.
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        bare = tokenizer("a", add_special_tokens=False)["input_ids"]
        start = next((i for i in range(len(probe)) if probe[i:i + len(bare)] == bare), 0)
        self._prefix = list(probe[:start])

    # -- plain ------------------------------------------------------------------------------

    def _plain(self, record: Record) -> tuple[list[int], list[bool]]:
        body = [m for m in record.messages if m["role"] != "system"]
        caption = body[1]["content"].replace(IMAGE_TOKEN, "").strip()
        if not caption:
            raise SkipSample("empty_response", "the caption is empty")
        text_ids = self.tokenizer(caption, add_special_tokens=False)["input_ids"]
        if self.image_token_id in text_ids:
            raise SkipSample("bad_record", f"the caption contains {IMAGE_TOKEN}")
        ids = list(self._prefix)
        if record.image is not None:
            ids.append(self.image_token_id)
        mask = [False] * len(ids)
        ids += list(text_ids) + [self.tokenizer.eos_token_id]
        mask += [True] * (len(text_ids) + 1)
        return ids, mask

    # -- chat -------------------------------------------------------------------------------

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

    def assistant_spans(self, messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The whole rendered conversation and, per assistant turn, a character span ``[start, end)``
        of it; ``end`` may fall inside the first token after the turn (the renderings agree on a
        few characters of different tokens, e.g. ``<|end`` of ``<|endoftext|>`` / ``<|user|>``),
        :meth:`_chat` moves it back to a token boundary. Raises SkipSample(template_mismatch) when a partial rendering is not a
        prefix of the whole one."""
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1])
            # Where the turn ends: where rendering the conversation up to it stops agreeing with
            # rendering one more (user) turn after it. Some templates close a conversation that ends
            # on an assistant turn (Phi-3 appends EOS); that closing text is not part of the turn.
            probe = self.render(list(messages[:i + 1]) + [{"role": "user", "content": "?"}])
            end = _common_prefix(upto, probe)
            if not (full.startswith(before) and full.startswith(upto[:end])):
                raise SkipSample("template_mismatch", f"rendering up to turn {i} is not a prefix of the whole")
            if end <= len(before):
                raise SkipSample("template_mismatch", f"assistant turn {i} renders to nothing")
            spans.append((len(before), end))
        return full, spans

    def _chat(self, record: Record) -> tuple[list[int], list[bool]]:
        messages = [dict(m) for m in record.messages]
        if record.image is not None:
            with_token = [i for i, m in enumerate(messages) if IMAGE_TOKEN in m["content"]]
            # No placeholder: the image goes first in the first human turn.
            where = with_token[0] if with_token else next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[where]["content"] = place_image_token(messages[where]["content"])
        full, spans = self.assistant_spans(messages)
        enc = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        # Back each span's end off to the last token boundary within it, then drop the whitespace
        # a template puts after the end-of-turn token (Gemma's / Phi-3's "\n" belong to the prompt).
        fixed = []
        for a, b in spans:
            b = max((e for s, e in offsets if a < e <= b), default=a)
            b = a + len(full[a:b].rstrip())
            if b <= a:
                raise SkipSample("template_mismatch", f"an assistant turn at char {a} has no whole token")
            fixed.append((a, b))
        spans = fixed
        mask = [False] * len(ids)
        for t, (s, e) in enumerate(offsets):
            for a, b in spans:
                if e <= a or s >= b or s == e:
                    continue
                # A token overlapping a span must lie inside it, up to whitespace that the
                # tokenizer attached to it from outside (a leading space, a trailing newline).
                if (s < a and full[s:a].strip()) or (e > b and full[b:e].strip()):
                    raise SkipSample("template_mismatch",
                                     f"token {t} {full[s:e]!r} straddles an assistant-turn boundary")
                mask[t] = True
        for a, b in spans:
            covered = [t for t, (s, e) in enumerate(offsets) if mask[t] and s < b and e > a]
            if not covered:
                raise SkipSample("template_mismatch", f"no token covers the assistant span {full[a:b]!r}")
        n_img = ids.count(self.image_token_id)
        if n_img != (1 if record.image is not None else 0):
            raise SkipSample("template_mismatch", f"{n_img} image tokens after tokenization")
        if any(m and i == self.image_token_id for i, m in zip(ids, mask)):
            raise SkipSample("template_mismatch", "an image token inside an assistant span")
        return ids, mask

    # -- both -------------------------------------------------------------------------------

    def encode(self, record: Record) -> Encoded:
        """Tokenizes ``record`` with the template, expands ``<image>``, truncates.

        Raises:
          SkipSample: ``image_truncated`` when the image tokens do not fit in max_length,
            ``target_truncated`` when no supervised token is left after truncation, or any reason of
            the template.
        """
        ids, mask = self._plain(record) if self.template == "plain" else self._chat(record)
        if record.image is not None:
            p = ids.index(self.image_token_id)
            n = self.num_image_tokens
            ids = ids[:p] + [self.image_token_id] * n + ids[p + 1:]
            mask = mask[:p] + [False] * n + mask[p + 1:]
            if p + n > self.max_length:
                raise SkipSample("image_truncated",
                                 f"image tokens end at {p + n} > max_length {self.max_length}")
        truncated = len(ids) > self.max_length
        ids, mask = ids[:self.max_length], mask[:self.max_length]
        if not any(mask):
            raise SkipSample("target_truncated", f"no supervised token within max_length {self.max_length}")
        return Encoded(np.asarray(ids, np.int32), np.asarray(mask, bool), truncated)

    def encode_caption(self, sample_id: str, caption: str, has_image: bool = True) -> Encoded:
        """A caption (TFDS) as a ``plain`` sample: ``[BOS] <image>*N caption EOS``."""
        if not caption.strip():
            raise SkipSample("empty_response", "the caption is empty")
        record = Record(sample_id, "tfds" if has_image else None,
                        ({"role": "user", "content": IMAGE_TOKEN if has_image else ""},
                         {"role": "assistant", "content": caption}))
        if self.template != "plain":
            raise ValueError("captions are only encoded with the 'plain' template")
        return self.encode(record)
