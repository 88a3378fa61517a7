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
  c.data.vocab_file = ""           # GRU vocabulary JSON; default {workdir}/vocab.json
  # synthetic world (data.format == "synthetic")
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.seed = 0
  c.data.synthetic.num_train_images = 2000
  c.data.synthetic.num_dev_images = 200
  c.data.synthetic.num_test_images = 200
  c.data.synthetic.num_regions = 12

  c.model = ml_collections.ConfigDict()
  c.model.text_encoder = "bert"    # "bert" | "gru"
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

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 128
  c.train.num_epochs = 12
  c.train.num_steps = 0            # >0 overrides num_epochs
  c.train.log_every = 100
  c.train.eval_every = 0           # steps between dev evaluations; 0: once per epoch
  c.train.checkpoint_every = 1000  # steps between "latest" checkpoints
  c.train.seed = 0
  c.train.optimizer = "bertadam"   # "bertadam" (authors' BERT build) | "adam" (GRU build)
  c.train.learning_rate = 2e-5
  c.train.lr_update = 6            # epochs between x0.1 decays
  c.train.warmup = 0.1             # fraction of total steps, linear warmup (BertAdam); 0: none
  c.train.grad_clip = 0.0          # global-norm clip; 0: none (BertAdam clips per tensor at 1.0)
  c.train.bert_lr_scale = 1.0      # lr multiplier for BERT weights
  c.train.freeze_bert = False
  c.train.margin = 0.2
  c.train.max_violation = True
  c.train.sum_violation_steps = 0  # VSE++ warm-up: sum of violations for this many steps

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256
  c.eval.protocol = "1k"           # "1k" (Flickr30K) | "coco" (5K and 5-fold 1K)
  c.eval.max_dev_images = 1000     # COCO dev: first 1000 images
  c.eval.save_sims = False
  c.eval.chunk_size = 1000         # images per block of the sims matrix when ranking
  return c


# The authors' README recipes: (epochs, batch, lr_update epoch, K) per dataset and build.
_RECIPES = {
    ("f30k", "bert"): (12, 128, 6, 2),
    ("coco", "bert"): (18, 320, 9, 4),
    ("f30k", "gru"): (16, 128, 8, 2),
    ("coco", "gru"): (18, 300, 9, 2),
}


def authors_recipe(dataset: str, text_encoder: str) -> ml_collections.ConfigDict:
  """The authors' training recipe on their VLP features (BERT: BertAdam 2e-5 with warmup
  0.1; GRU: Adam 2e-4, global-norm clip 2.0, no region_pos); COCO tests on 5K + 5x1K."""
  epochs, batch, lr_update, k = _RECIPES[(dataset, text_encoder)]
  c = get_base_config()
  c.data.format = "vlp"
  c.data.name = dataset
  c.data.num_regions = 100
  c.model.text_encoder = text_encoder
  c.model.K = k
  c.train.batch_size = batch
  c.train.num_epochs = epochs
  c.train.lr_update = lr_update
  if text_encoder == "bert":
    c.model.bert_path = "bert-base-uncased"
    c.train.optimizer, c.train.learning_rate, c.train.warmup = "bertadam", 2e-5, 0.1
  else:
    c.model.use_region_pos = False
    c.train.optimizer, c.train.learning_rate, c.train.warmup = "adam", 2e-4, 0.0
    c.train.grad_clip = 2.0
  if dataset == "coco":
    c.data.test_split = "testall"
    c.eval.protocol = "coco"
  return c

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
