"""Decoding in JAX against transformers' generate on the exported folder, batching, mesh, sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import llava_testlib as lib
from sea_jax import sharding
from sea_jax.convert import hf_llava
from sea_jax.data.images import preprocess_image
from sea_jax.generate import Generator, chat_prompt, encode_prompt, pad_batch, sample_token
from sea_jax.models.mllm import MLLM

PROMPTS = ["what is in the image?", "describe the picture in detail", "how many birds are there?"]


N = 20  # one decode length everywhere, so the tests share compiled programs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    cfg, params, _, out, _ = lib.trained_export(tmp_path_factory.mktemp("gen"))
    # Generation runs on the imported folder, as a user of the export would (and as the CLI does).
    cfg2, params2, tok = hf_llava.import_llava(out, dtype=jnp.dtype("float32"))
    hf = AutoModelForImageTextToText.from_pretrained(out).eval()
    return cfg2, params2, tok, out, Generator(MLLM(cfg2)), hf, AutoProcessor.from_pretrained(out)


def _inputs(cfg, tok, i):
    image = lib.random_image(width=15 + 4 * i, height=21 - 2 * i, seed=10 + i)
    pixels = preprocess_image(image, cfg.vision.image_size, pad_to_square=True)
    return image, pixels, encode_prompt(tok, chat_prompt(tok, PROMPTS[i]), cfg.num_image_tokens)


def _eos(out):
    from transformers import GenerationConfig

    g = GenerationConfig.from_pretrained(out)
    return g.eos_token_id if isinstance(g.eos_token_id, list) else [g.eos_token_id], g.pad_token_id


def _hf_greedy(hf, processor, image, prompt, eos=True):
    """transformers' greedy continuation of the processor's inputs (N tokens, or up to EOS)."""
    import copy

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    inputs = processor(images=image, text=processor.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt")
    g = copy.deepcopy(hf.generation_config)
    g.max_new_tokens, g.do_sample = N, False
    if not eos:
        g.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(**inputs, generation_config=g)
    return inputs["input_ids"][0].numpy(), out[0, inputs["input_ids"].shape[1]:].numpy()


def test_greedy_20_tokens_match_transformers_generate(setup):
    cfg, params, tok, out, gen, hf, processor = setup
    eos, pad = _eos(out)
    image, pixels, ids = _inputs(cfg, tok, 0)
    hf_ids, want = _hf_greedy(hf, processor, image, PROMPTS[0])
    np.testing.assert_array_equal(hf_ids, ids)
    got = gen(params, pixels[None], ids[None], max_new_tokens=N, eos_token_id=eos, pad_token_id=pad)
    n = int(got.lengths[0])
    assert n == len(want), (n, want)  # both stop at the same EOS, or both run all N
    np.testing.assert_array_equal(np.asarray(got.tokens[0, :n]), want)
    if n < N:
        assert want[-1] in eos and np.all(np.asarray(got.tokens[0, n:]) == pad)
    # Without EOS stopping all 20 tokens match (the random model may emit EOS early above).
    _, want = _hf_greedy(hf, processor, image, PROMPTS[0], eos=False)
    got = gen(params, pixels[None], ids[None], max_new_tokens=N, eos_token_id=[])
    assert len(want) == N and int(got.lengths[0]) == N
    np.testing.assert_array_equal(np.asarray(got.tokens[0]), want)


@pytest.fixture(scope="module")
def batch(setup):
    """Three prompts of different lengths and transformers' greedy continuation of each alone."""
    cfg, _, tok, _, _, hf, processor = setup
    rows = [_inputs(cfg, tok, i) for i in range(3)]
    assert len({len(r[2]) for r in rows}) == 3  # really different lengths, so padding matters
    alone = np.stack([_hf_greedy(hf, processor, r[0], PROMPTS[i], eos=False)[1] for i, r in enumerate(rows)])
    return np.stack([r[1] for r in rows]), [r[2] for r in rows], alone


@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_padded_prompts_decode_as_alone(setup, batch, side):
    _, params, tok, _, gen, _, _ = setup
    pixels, rows, alone = batch
    ids, mask = pad_batch(rows, tok.pad_token_id, side)
    got = np.asarray(gen(params, pixels, ids, mask, max_new_tokens=N, eos_token_id=[]).tokens)
    np.testing.assert_array_equal(got, alone, err_msg=f"{side} padded")


def test_on_a_mesh_matches(setup, batch):
    cfg, _, tok, out, _, _, _ = setup
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, sharded, _ = hf_llava.import_llava(out, mesh=mesh, dtype=jnp.dtype("float32"))
    # Import placed every leaf directly with its logical sharding on the mesh.
    for leaf in (sharded["llm"]["layers"]["mlp"]["up"]["kernel"], sharded["llm"]["layers"]["attn"]["q"]["kernel"]):
        assert isinstance(leaf.sharding, jax.sharding.NamedSharding) and leaf.sharding.mesh.shape == mesh.shape
        assert not leaf.sharding.is_fully_replicated
    pixels, rows, alone = batch
    ids, mask = pad_batch(rows, tok.pad_token_id, "left")
    got = Generator(MLLM(cfg), mesh)(sharded, pixels, ids, mask, max_new_tokens=N, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(got.tokens), alone)


def _free(setup):
    cfg, params, tok, _, gen, _, _ = setup
    _, pixels, ids = _inputs(cfg, tok, 0)
    return pixels, ids, np.asarray(gen(params, pixels[None], ids[None], max_new_tokens=N, eos_token_id=[]).tokens[0])


def test_eos_stops_a_row_and_pads_the_rest(setup):
    _, params, _, _, gen, _, _ = setup
    pixels, ids, free = _free(setup)
    stop = int(free[3])
    k = int(np.argmax(free == stop))  # its first occurrence
    got = gen(params, pixels[None], ids[None], max_new_tokens=N, eos_token_id=[stop], pad_token_id=0)
    assert int(got.lengths[0]) == k + 1
    toks = np.asarray(got.tokens[0])
    np.testing.assert_array_equal(toks[: k + 1], free[: k + 1])
    assert np.all(toks[k + 1 :] == 0)


def test_sampling_is_keyed_and_top_p_limits_the_support(setup):
    _, params, _, _, gen, _, _ = setup
    pixels, ids, free = _free(setup)

    def sample(seed, temperature=1.5, top_p=1.0):
        out = gen(params, pixels[None], ids[None], key=jax.random.key(seed), max_new_tokens=N, eos_token_id=[],
                  temperature=temperature, top_p=top_p)
        return np.asarray(out.tokens[0])

    a, b, c = sample(1), sample(1), sample(2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # A vanishing nucleus keeps only the most likely token: sampling becomes greedy.
    np.testing.assert_array_equal(sample(3, temperature=1.0, top_p=1e-6), free)


def test_sample_token_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.jit(jax.vmap(lambda k, t, p: sample_token(logits, k, t, p, False)[0], in_axes=(0, None, None)))
    # top_p = 0.7: {0.5, 0.3} reach it (0.5 alone does not), renormalised to 0.625 / 0.375.
    s = np.asarray(draw(keys, 1.0, 0.7))
    assert set(np.unique(s)) == {0, 1}
    assert abs((s == 0).mean() - 0.625) < 0.03
    # top_p = 1 and temperature 1: the softmax itself.
    s = np.asarray(draw(keys, 1.0, 1.0))
    np.testing.assert_allclose(np.bincount(s, minlength=4) / len(s), [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # Greedy ignores the key.
    assert int(sample_token(logits, None, 1.0, 1.0, True)[0]) == 0


def test_cli_prints_the_decoded_answer(setup, tmp_path):
    import os
    import subprocess
    import sys

    cfg, params, tok, out, gen, _, _ = setup
    image, pixels, ids = _inputs(cfg, tok, 0)
    path = str(tmp_path / "img.png")
    image.save(path)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    res = subprocess.run([sys.executable, "-m", "sea_jax.generate", f"--hf={out}", f"--image={path}",
                          f"--prompt={PROMPTS[0]}", f"--max_new_tokens={N}", "--dtype=float32"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    printed = res.stdout
    eos, pad = _eos(out)
    want = gen(params, pixels[None], ids[None], max_new_tokens=N, eos_token_id=eos, pad_token_id=pad)
    text = tok.decode(np.asarray(want.tokens[0, : int(want.lengths[0])]), skip_special_tokens=True)
    assert printed.startswith(f"[0] {PROMPTS[0]}\n") and printed.rstrip("\n").endswith(text)


def test_stop_token_ids_include_the_chat_templates_end_of_turn():
    """A chat model ends its answer with the template's end-of-turn token (Gemma's
    ``<end_of_turn>``), not EOS: generation must stop there too, as HF's generation_config does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sea_jax.generate import stop_token_ids

    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {t: i for i, t in enumerate(specials + list("abcdefghijklmnopqrstuvwxyz\n "))}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                  additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    assert stop_token_ids(tok, 1) == [1]  # no chat template: EOS only
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                         "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    assert stop_token_ids(tok, [1]) == [1, 4]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"  # ends with plain text
    assert stop_token_ids(tok, None) == [1]
