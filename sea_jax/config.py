"""The configuration schema: every field a run reads, with its default and meaning.

Config files under ``configs/`` (big_vision style: a ``get_config()`` returning an
``ml_collections.ConfigDict``) start from :func:`base_config` and change what differs, so a field
exists in exactly one place and ``--config.a.b=value`` overrides work for every field. The same
config drives ``sea_jax.train``, ``sea_jax.labels`` (offline labelling: ``siglip``, ``labels``,
``data``), ``sea_jax.aot`` and ``sea_jax.export``.
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """Defaults: the LLaVA-1.5 / SEA stage-1 recipe (DESIGN.md section 2); sizes left to configs."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.stage = 1  # 1: adapter pretraining (+ SEA); 2: instruction tuning

    # Mesh of the train step: axis sizes, -1 = the rest of the devices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    # LLM: a local / gs:// HF folder (config.json + safetensors + tokenizer files), or, with no
    # checkpoint, a preset of sea_jax.models.llm.PRESETS with random init (AOT sizing, tests).
    c.llm = ml_collections.ConfigDict()
    c.llm.checkpoint = ""
    c.llm.preset = ""
    c.llm.tokenizer = ""  # "" = the checkpoint folder
    c.llm.dtype = "bfloat16"
    c.llm.remat = "none"  # "none" | "full" | "dots" | "dots_no_batch"
    c.llm.scan_layers = True
    c.llm.overrides = ml_collections.ConfigDict()  # more LLMConfig fields (a shrunk preset in tests)

    # SigLIP: an HF SiglipModel folder or a big_vision .npz (variant names the architecture then).
    c.siglip = ml_collections.ConfigDict()
    c.siglip.checkpoint = ""
    c.siglip.variant = "So400m/14"
    c.siglip.image_size = 384
    c.siglip.tokenizer = ""  # SigLIP text tokenizer (HF folder or SentencePiece .model)
    c.siglip.dtype = "bfloat16"
    c.siglip.overrides = ml_collections.ConfigDict()  # more SigLIPConfig fields (scan, remat, ...)

    # The multimodal wiring.
    c.model = ml_collections.ConfigDict()
    c.model.adapter = "mlp2x_gelu"  # or "linear"
    c.model.vision_feature_layer = -2  # HF numbering of the image tower's hidden states
    c.model.image_token = "<image>"

    # Semantic labels (paper Eq. 4-6), shared by on-the-fly labelling and `sea_jax.labels`.
    c.labels = ml_collections.ConfigDict()
    c.labels.word_list = "default"  # a one-word-per-line file (e.g. 2of12.txt) or "default"
    c.labels.default_size = 40_000
    c.labels.prompt = "{}"
    c.labels.top_n = 10
    c.labels.negate_similarity = False
    c.labels.feature = "map_head"  # each patch alone through the MAP head; or "raw"
    c.labels.output_dir = ""  # offline labels; "" = <workdir>/labels
    c.labels.cache_dir = ""  # word-table cache; "" = <workdir>/word_table_cache

    # SEA objective (Eq. 7-11).
    c.sea = ml_collections.ConfigDict()
    c.sea.lam = 1.0  # lambda of Eq. 11; 0 = plain LLaVA training
    c.sea.window = 2  # k of the k x k sampling windows
    c.sea.label_source = "on_the_fly"  # or "batch": labels precomputed by `python -m sea_jax.labels`
    c.sea.log_tau_init = 0.0  # tau = exp(log_tau): the paper's "tau = 0" read as log tau = 0
    c.sea.tau_min = 0.01

    c.data = ml_collections.ConfigDict()
    c.data.kind = "llava_json"  # or "tfds"
    c.data.json = ""  # LLaVA-format JSON (blip_laion_cc_sbu_558k.json / llava_v1_5_mix665k.json)
    c.data.image_root = ""
    c.data.image_size = 0  # 0 = the SigLIP config's
    c.data.tfds_name = ""  # kind="tfds": a dataset with an image and a caption feature
    c.data.tfds_split = "train"
    c.data.tfds_data_dir = ""
    c.data.tfds_image_key = "image"
    c.data.tfds_caption_key = "caption"
    c.data.template = "plain"  # "plain" (stage 1) or "chat" (the LLM tokenizer's chat template)
    c.data.pad_to_square = False  # LLaVA-1.5 stage 2 pads with the image mean first
    c.data.max_length = 2048
    c.data.chat_template = ""  # "" = the LLM tokenizer's own; "vicuna_v1" = LLaVA's Vicuna format
    c.data.num_shards = 0  # data shards dealt over processes (0 = one per process); see data/pipeline.py
    c.data.num_workers = 2  # Grain worker processes per shard (0 = in the main process)
    c.data.num_threads = 4  # decoding threads per worker
    c.data.prefetch = 2

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.warmup_ratio = 0.03
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0
    c.optim.group_lr = ml_collections.ConfigDict()  # e.g. {"vision": 2e-6} (SEA-PRIME)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 256  # global
    c.train.num_epochs = 1.0
    c.train.num_steps = -1  # > 0 overrides num_epochs
    c.train.trainable = ("adapter", "log_tau")
    c.train.microbatches = 1  # L_lm accumulated over this many slices of the global batch (exact)
    c.train.logits_chunk = 0  # > 0: LM head on this many positions at a time (large vocabularies)
    c.train.init_from = ""  # stage 2: a stage-1 workdir whose adapter (and tau) to start from
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.async_checkpoint = True
    c.train.progress = True  # tqdm bar on process 0
    return c
