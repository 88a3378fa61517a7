"""The full set of config keys with their defaults.

Every file in `configs/` starts from `get_base_config()` and overrides what its recipe
needs, so a key documented here exists in every config and `--config.a.b=v` overrides are
checked against it (configs are locked: a mistyped key is an error).
"""
import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  """Returns the default config: the authors' Flickr30K BERT recipe on VLP features."""
  c = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  c.data.format = "vlp"            # "synthetic" | "precomp" | "vlp"
  c.data.name = "f30k"             # "f30k" | "coco": selects file layout and protocol
  c.data.root = ""                 # dataset directory (see README, "Data layouts")
  c.data.tfds_dir = ""             # if set, read splits packed by dsran_jax.data.tfds_builder
  c.data.train_split = "train"
  c.data.dev_split = "dev"
  c.data.test_split = "test"       # "testall" for COCO 5K with precomp
  c.data.max_len = 32              # tokens per caption, [CLS]/[SEP] or <start>/<end> included
  c.data.shuffle_buffer = 0        # 0: full shuffle of caption indices (cheap: indices only)
  c.data.prefetch = 2
  c.data.num_regions = 100         # regions per image (padded/cut with a region mask)
  c.data.img_dim = 2048
  c.data.grid_file = ""            # grid features; default {root}/{split}_grid.npy
  c.data.global_file = ""          # pooled ResNet features; default {root}/{split}_global.npy
  c.data.vocab_file = ""           # GRU vocabulary JSON; default {workdir}/vocab.json
  # synthetic world (data.format == "synthetic")
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.seed = 0
  c.data.synthetic.num_train_images = 2000
  c.data.synthetic.num_dev_images = 200
  c.data.synthetic.num_test_images = 200
  c.data.synthetic.num_regions = 12

  c.model = ml_collections.ConfigDict()
  c.model.name = "dsran"           # model family (dsran_jax/models/<name>/); see below
  c.model.text_encoder = "bert"    # DSRAN: "bert" | "gru"
  c.model.embed_size = 1024
  c.model.K = 2                    # JSR branches: 1, 2 or 4
  c.model.image_inputs = "grid+regions"  # or "regions"
  c.model.img_dim = 2048
  c.model.pos_dim = 1607           # region_pos width (6 box + 1601 class probs)
  c.model.use_region_pos = True    # BERT build: region_pos MLP; GRU build: none
  c.model.gat_heads = 8
  c.model.gat_dropout = 0.2
  c.model.gat_layers = 1
  c.model.text_padding = "masked"  # "masked" | "reference" (authors' behaviour)
  c.model.dtype = "float32"        # compute dtype: "float32" | "bfloat16" (params and
                                   # BatchNorm/softmax/loss stay fp32)
  # BERT build
  c.model.bert_path = ""           # local HF BERT directory or hub name
  c.model.bert_random_init = False # True: BERT of shape model.bert.* with random weights
  c.model.bert = ml_collections.ConfigDict()
  c.model.bert.vocab_size = 30522
  c.model.bert.hidden_size = 768
  c.model.bert.num_layers = 12
  c.model.bert.num_heads = 12
  c.model.bert.intermediate_size = 3072
  c.model.bert.max_position = 512
  c.model.bert.type_vocab_size = 2
  # GRU build
  c.model.word_dim = 300
  c.model.vocab_size = 0           # 0: size of the built vocabulary
  c.model.glove_path = ""          # optional GloVe text file for word-embedding init
  # Every family's own options, defaults included, under config.model.<family>.
  from dsran_jax import models  # pylint: disable=g-import-not-at-top
  for name in models.names():
    section = models.family_config(name).defaults()
    if section is not None:
      c.model[name] = section

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.num_epochs = 12
  c.train.num_steps = 0            # >0 overrides num_epochs
  c.train.log_every = 100
  c.train.eval_every = 0           # steps between dev evaluations; 0: once per epoch
  c.train.checkpoint_every = 1000  # steps between "latest" checkpoints
  c.train.checkpoint_every_s = 600.0  # ... and at most this many seconds between them
  c.train.seed = 0
  c.train.optimizer = "bertadam"   # "bertadam" (authors' BERT build) | "adam" (GRU build)
  c.train.learning_rate = 2e-5
  c.train.lr_update = 6            # epochs between x0.1 decays
  c.train.warmup = 0.1             # fraction of total steps, linear warmup (BertAdam); 0: none
  c.train.grad_clip = 0.0          # global-norm clip; 0: none (BertAdam clips per tensor at 1.0)
  c.train.bert_lr_scale = 1.0      # lr multiplier for BERT weights
  c.train.freeze_bert = False
  c.train.freeze = ""              # comma-separated regexes of parameter paths never
                                   # trained (added to the family's own frozen layers)
  c.train.margin = 0.2
  c.train.max_violation = True
  c.train.sum_violation_steps = 0  # VSE++ warm-up: sum of violations for this many steps

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256
  c.eval.protocol = "1k"           # "1k" (Flickr30K) | "coco" (5K and 5-fold 1K)
  c.eval.max_dev_images = 1000     # COCO dev: first 1000 images
  c.eval.save_sims = False
  c.eval.chunk_size = 1000         # images per block of the sims matrix when ranking
  c.eval.tile_images = 0           # scoring tile (images x captions); 0: family default
  c.eval.tile_captions = 0
  # Two-stage evaluation (dsran_jax/two_stage.py): the embedding model of this workdir ranks
  # everything, this model re-scores each query's top shortlist_k (both directions).
  c.eval.shortlist_workdir = ""    # "": every pair scored (full evaluation)
  c.eval.shortlist_k = 50          # candidates per query (captions for i2t, images for t2i)
  c.eval.shortlist_fusion = 0.0    # w: short list ordered by (1 - w) * this + w * first stage
  return c


DATASETS = ("f30k", "coco")


def get_config() -> ml_collections.ConfigDict:
  """This file as a config file: main's default `--config`, which types the overrides
  of `--mode=eval`."""
  return get_base_config()


def parse_config_arg(arg: str):
  """`configs/<file>.py:ARG` -> (family, recipe kwargs): ARG is `family[,key=value...]`,
  e.g. `sgraf,module=SAF`, `scan,cross_attn=i2t,agg_func=LogSumExp`,
  `dsran,text_encoder=gru`; empty means DSRAN with the recipe's defaults."""
  family, *items = [part.strip() for part in (arg or "").split(",")]
  kwargs = {}
  for item in items:
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise ValueError(f"config argument {arg!r}: {item!r} is not key=value "
                       "(expected family[,key=value...], e.g. sgraf,module=SAF)")
    kwargs[key] = value
  return family, kwargs


def call_recipe(fn, c, what: str, kwargs):
  """`fn(c, **kwargs)`, with an unknown keyword named against the recipe's own."""
  import inspect  # pylint: disable=g-import-not-at-top
  params = list(inspect.signature(fn).parameters)[1:]
  unknown = sorted(set(kwargs) - set(params))
  if unknown:
    accepted = [p for p in params if p != "dataset"]
    raise ValueError(f"{what} takes no {unknown}: its options are {accepted or 'none'}")
  return fn(c, **kwargs)


def recipe_config(dataset: str, family: str = "", **kwargs) -> ml_collections.ConfigDict:
  """The base config with family `family`'s authors' recipe for `dataset` ("f30k" or
  "coco"); an empty family means DSRAN. COCO tests on 5K + 5x1K.

  `family` may carry recipe options (`parse_config_arg`: "sgraf,module=SAF"); they and
  `kwargs` go to the family's `recipe` (DSRAN: `text_encoder="gru"`).
  """
  from dsran_jax import models  # pylint: disable=g-import-not-at-top
  if dataset not in DATASETS:
    raise ValueError(f"dataset {dataset!r}: expected one of {DATASETS}")
  family, options = parse_config_arg(family)
  kwargs = {**options, **kwargs}
  c = get_base_config()
  c.model.name = family or models.DEFAULT
  c.data.format = "vlp"
  c.data.name = dataset
  if dataset == "coco":
    c.data.test_split = "testall"
    c.eval.protocol = "coco"
  return call_recipe(models.family_config(c.model.name).recipe, c,
                      f"the {c.model.name} recipe", {"dataset": dataset, **kwargs})


def authors_recipe(dataset: str, text_encoder: str) -> ml_collections.ConfigDict:
  """DSRAN's recipe for `dataset` and build ("bert" | "gru")."""
  return recipe_config(dataset, "dsran", text_encoder=text_encoder)


CONFIG_FILE = "config.json"


def save_workdir_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the resolved config to `{workdir}/config.json` (eval and inference rebuild
  the model from it)."""
  import json
  import os
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config saved in a workdir, laid over the defaults so keys added since still exist.

  Raises a FileNotFoundError naming the file if the workdir has no config, and a KeyError
  naming any key the defaults do not know.
  """
  import json
  import os
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a dsran_jax workdir?")
  with open(path) as f:
    saved = json.load(f)
  config = get_base_config()

  def merge(dst, src, prefix):
    for key, value in src.items():
      if key not in dst:
        raise KeyError(f"{path}: unknown config key {prefix}{key}")
      if isinstance(value, dict):
        merge(dst[key], value, f"{prefix}{key}.")
      else:
        dst[key] = value

  merge(config, saved, "")
  return config
