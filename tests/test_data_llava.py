"""Templates and masks of sea_jax.data.llava against transformers' own chat-template machinery.

The tokenizers are trained here (no hub): a byte-level BPE (Llama-3 / GPT style) and a Metaspace one
(SentencePiece style, Gemma / Llama-2), with the control tokens of each template. The chat templates
are jinja strings modelled on Gemma, Llama-2, Llama-3 and Phi-3, written with ``{% generation %}``
blocks around each assistant turn's content and end-of-turn token so that HF's
``return_assistant_tokens_mask`` gives an independent oracle for the loss mask.
"""
from __future__ import annotations

import numpy as np
import pytest

from sea_jax.data import llava

CONTROL = ["<pad>", "<s>", "</s>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<|begin_of_text|>",
           "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|user|>", "<|assistant|>",
           "<|end|>", "<|endoftext|>", "<|system|>"]
CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "What is in the image? A red cat sits on a wooden table near the window.",
    "Describe the picture briefly. Two dogs are running on the beach at sunset.",
    "user model assistant system USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>>",
    "How many birds are there? There are three small birds on the branch.",
    "Is it raining? No, the sky is clear and blue.",
] * 20


def make_tokenizer(kind: str = "bytelevel", bos="<s>", eos="</s>", image: bool = True):
    """A tiny trained fast tokenizer; ``kind`` 'bytelevel' (BPE on bytes, leading spaces inside
    tokens) or 'metaspace' (SentencePiece-like ``▁`` words)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "metaspace" else None))
    if kind == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=CONTROL,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tok.decoder = decoders.Metaspace(prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=CONTROL)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token="<pad>",
                                   unk_token="<unk>")
    if image:
        llava.add_image_token(fast)
    return fast


TEMPLATES = {
    "gemma": dict(bos="<s>", eos="<end_of_turn>", template=(
        "{{ bos_token }}{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}"
        "<end_of_turn>{% endgeneration %}{{ '\n' }}"
        "{% else %}{{ message['content'] | trim + '<end_of_turn>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")),
    "llama2": dict(bos="<s>", eos="</s>", template=(
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
        "{% else %}{% generation %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endgeneration %}{% endif %}"
        "{% endfor %}")),
    "llama3": dict(bos="<|begin_of_text|>", eos="<|eot_id|>", template=(
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}"
        "<|eot_id|>{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}")),
    "phi3": dict(bos="<s>", eos="<|endoftext|>", template=(
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
        "{% else %}{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + '<|end|>' }}"
        "{% endgeneration %}{{ '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")),
}

MULTI = {"id": "m1", "image": "a.png", "conversations": [
    {"from": "human", "value": "<image>\nWhat is in the image?"},
    {"from": "gpt", "value": "A red cat sits on a wooden table."},
    {"from": "human", "value": "Is it raining?"},
    {"from": "gpt", "value": "No, the sky is clear and blue."},
]}
TEXT_ONLY = {"id": "t1", "conversations": [
    {"from": "human", "value": "How many birds are there?"},
    {"from": "gpt", "value": "There are three small birds."},
]}
WITH_SYSTEM = {"id": "s1", "conversations": [
    {"from": "system", "value": "A chat between a curious human and an assistant."},
    {"from": "human", "value": "Describe the picture briefly."},
    {"from": "gpt", "value": "Two dogs are running on the beach."},
]}


def _tok_for(name, kind):
    spec = TEMPLATES[name]
    tok = make_tokenizer(kind, bos=spec["bos"], eos=spec["eos"])
    tok.chat_template = spec["template"]
    return tok


# Gemma's template has no system role, so that pair is not generated.
_CHAT_CASES = [
    pytest.param(name, raw, id=f"{name}-{rid}")
    for name in sorted(TEMPLATES)
    for raw, rid in ((MULTI, "multi_image"), (TEXT_ONLY, "text_only"), (WITH_SYSTEM, "system"))
    if not (name == "gemma" and raw is WITH_SYSTEM)
]


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
@pytest.mark.parametrize("name,raw", _CHAT_CASES)
def test_chat_matches_apply_chat_template(name, kind, raw):
    tok = _tok_for(name, kind)
    img = tok.convert_tokens_to_ids("<image>")
    rec = llava.parse_record(raw, 0)
    # num_image_tokens=1: the ids are then exactly those of the whole rendered conversation.
    enc = llava.Encoder(tok, "chat", img, 1, 4096).encode(rec)
    ref = tok.apply_chat_template(list(rec.messages), tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    assert enc.input_ids.tolist() == list(ref["input_ids"])
    np.testing.assert_array_equal(enc.loss_mask, np.asarray(ref["assistant_masks"], bool))
    # Supervised text is exactly the assistant contents with their end-of-turn token.
    ids = enc.input_ids
    runs, cur = [], []
    for t in range(len(ids)):
        if enc.loss_mask[t]:
            cur.append(int(ids[t]))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    answers = [m["content"] for m in rec.messages if m["role"] == "assistant"]
    assert len(runs) == len(answers)
    for run, answer in zip(runs, answers):
        text = tok.decode(run)
        assert text.strip().startswith(answer), (text, answer)
        assert run[-1] == tok.convert_tokens_to_ids(TEMPLATES[name]["eos"] if name != "phi3" else "<|end|>")


def test_image_expansion_and_truncation():
    tok = _tok_for("llama3", "bytelevel")
    img = tok.convert_tokens_to_ids("<image>")
    rec = llava.parse_record(MULTI, 0)
    short = llava.Encoder(tok, "chat", img, 1, 4096).encode(rec)
    full = llava.Encoder(tok, "chat", img, 7, 4096).encode(rec)
    p = short.input_ids.tolist().index(img)
    assert full.input_ids.tolist() == short.input_ids[:p].tolist() + [img] * 7 + short.input_ids[p + 1:].tolist()
    assert not full.loss_mask[p:p + 7].any()
    assert full.loss_mask.sum() == short.loss_mask.sum()
    # Truncated after the image: the first answer partly survives.
    first = int(np.argmax(full.loss_mask))
    cut = llava.Encoder(tok, "chat", img, 7, first + 2).encode(rec)
    assert cut.truncated and len(cut.input_ids) == first + 2 and cut.loss_mask.sum() == 2
    with pytest.raises(llava.SkipSample) as e:
        llava.Encoder(tok, "chat", img, 7, p + 6).encode(rec)
    assert e.value.reason == "image_truncated"
    with pytest.raises(llava.SkipSample) as e:
        llava.Encoder(tok, "chat", img, 7, first).encode(rec)
    assert e.value.reason == "target_truncated"


def test_plain_exact():
    tok = make_tokenizer("metaspace")
    img = tok.convert_tokens_to_ids("<image>")
    bos, eos = tok.bos_token_id, tok.eos_token_id
    raw = {"id": "p1", "image": "x.png", "conversations": [
        {"from": "human", "value": "Describe the picture briefly.\n<image>"},
        {"from": "gpt", "value": "A red cat sits on a table."}]}
    enc = llava.Encoder(tok, "plain", img, 3, 64).encode(llava.parse_record(raw, 0))
    cap = tok("A red cat sits on a table.", add_special_tokens=False)["input_ids"]
    # PreTrainedTokenizerFast built from a bare Tokenizer adds no BOS by itself: no prefix then.
    prefix = [bos] if tok("a")["input_ids"][:1] == [bos] else []
    assert enc.input_ids.tolist() == prefix + [img] * 3 + cap + [eos]
    assert enc.loss_mask.tolist() == [False] * (len(prefix) + 3) + [True] * (len(cap) + 1)


def test_plain_with_bos_tokenizer():
    from tokenizers import processors

    tok = make_tokenizer("bytelevel")
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    img = tok.convert_tokens_to_ids("<image>")
    enc = llava.Encoder(tok, "plain", img, 2, 64).encode(llava.parse_record(
        {"id": "p", "image": "x", "conversations": [{"from": "human", "value": "<image>"},
                                                    {"from": "gpt", "value": "Two dogs."}]}, 0))
    cap = tok("Two dogs.", add_special_tokens=False)["input_ids"]
    assert enc.input_ids.tolist() == [bos, img, img] + cap + [tok.eos_token_id]
    assert enc.loss_mask.tolist() == [False] * 3 + [True] * (len(cap) + 1)


def test_vicuna_v1_format():
    tok = make_tokenizer("metaspace")
    tok.chat_template = llava.VICUNA_V1_TEMPLATE
    rec = llava.parse_record(MULTI, 0)
    text = tok.apply_chat_template(list(rec.messages), tokenize=False)
    assert text == ("<s>" + llava.VICUNA_V1_SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT: "
                    "A red cat sits on a wooden table.</s>USER: Is it raining? ASSISTANT: "
                    "No, the sky is clear and blue.</s>")
    img = tok.convert_tokens_to_ids("<image>")
    enc = llava.Encoder(tok, "chat", img, 1, 4096).encode(rec)
    assert enc.input_ids.tolist() == tok.apply_chat_template(list(rec.messages), tokenize=True,
                                                              return_dict=True)["input_ids"]
    supervised = tok.decode(enc.input_ids[enc.loss_mask].tolist())
    assert "ASSISTANT" not in supervised and "USER" not in supervised
    assert supervised.count("</s>") == 2


def test_mismatch_is_skipped_not_masked():
    tok = make_tokenizer("bytelevel")
    # A template whose partial renderings are not prefixes of the whole one.
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ':' + m['content'] }}{% endfor %}"
                         "{{ '#' ~ (messages | length) }}")
    img = tok.convert_tokens_to_ids("<image>")
    with pytest.raises(llava.SkipSample) as e:
        llava.Encoder(tok, "chat", img, 1, 4096).encode(llava.parse_record(TEXT_ONLY, 0))
    assert e.value.reason == "template_mismatch"


@pytest.mark.parametrize("raw,reason", [
    ({"id": 1, "conversations": "hi"}, "bad_record"),
    ({"id": 2, "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}, "bad_record"),
    ({"id": 3, "conversations": [{"from": "human", "value": "x"}]}, "bad_record"),
    ({"id": 4, "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "  "}]}, "empty_response"),
    ({"id": 5, "conversations": [{"from": "human", "value": "<image> x"}, {"from": "gpt", "value": "y"}]}, "bad_record"),
    ({"id": 6, "image": 3, "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]}, "bad_record"),
    ({"id": 7, "image": "a", "conversations": [{"from": "human", "value": "<image><image>"},
                                               {"from": "gpt", "value": "y"}]}, "bad_record"),
    (["not", "a", "dict"], "bad_record"),
])
def test_parse_record_rejects(raw, reason):
    with pytest.raises(llava.SkipSample) as e:
        llava.parse_record(raw, 9)
    assert e.value.reason == reason


def test_add_image_token():
    tok = make_tokenizer("bytelevel", image=False)
    n = len(tok)
    res = llava.add_image_token(tok, vocab_size=n)
    assert res.added and res.needs_resize and res.id == n
    assert tok("a <image> b", add_special_tokens=False)["input_ids"].count(res.id) == 1
    again = llava.add_image_token(tok, vocab_size=n + 1)
    assert again == llava.ImageToken(res.id, False, False)


@pytest.mark.parametrize("text, want", [
    ("What is this?\n<image>", "<image>\nWhat is this?"),
    ("<image>\nWhat is this?", "<image>\nWhat is this?"),
    ("Look: <image> what is it? ", "<image>\nLook:  what is it?"),
    ("<image>", "<image>"),
    ("  <image>\n\n", "<image>"),
])
def test_image_token_placed_as_llava_1_5(text, want):
    """LLaVA-1.5's preprocess_multimodal: the placeholder removed, the text stripped, "<image>\\n"
    in front, stripped again."""
    assert llava.place_image_token(text) == want


def test_chat_encoding_moves_the_image_to_the_front_of_its_turn():
    tok = _tok_for("llama3", "bytelevel")
    img = tok.convert_tokens_to_ids("<image>")
    enc = llava.Encoder(tok, "chat", img, 3, 4096)
    conv = lambda first: {"id": "x", "image": "a.png", "conversations": [  # noqa: E731
        {"from": "human", "value": first}, {"from": "gpt", "value": "A red bus."},
        {"from": "human", "value": "And the sky?"}, {"from": "gpt", "value": "Blue."}]}
    placed = enc.encode(llava.parse_record(conv("<image>\nWhat is in the picture?"), 0))
    for other in ("What is in the picture?\n<image>", "What is in the picture? <image>", "What is in the picture?"):
        got = enc.encode(llava.parse_record(conv(other), 0))
        assert got.input_ids.tolist() == placed.input_ids.tolist(), other
        np.testing.assert_array_equal(got.loss_mask, placed.loss_mask)
