"""DSRAN's config hooks. Its options are the top-level `config.model.*` keys of DESIGN
section 4 (`text_encoder`, `K`, `image_inputs`, ...), so it has no `model.dsran` section."""

# The authors' README recipes: (epochs, batch, lr_update epoch, K) per dataset and build.
RECIPES = {
    ("f30k", "bert"): (12, 128, 6, 2),
    ("coco", "bert"): (18, 320, 9, 4),
    ("f30k", "gru"): (16, 128, 8, 2),
    ("coco", "gru"): (18, 300, 9, 2),
}


def defaults():
  return None


def image_keys(model_config):
  keys = ("regions", "region_pos", "region_mask")
  return (("grid",) + keys) if model_config.image_inputs == "grid+regions" else keys


def text_keys(model_config):
  del model_config
  return ("input_ids", "attention_mask")


def tokenizer(model_config):
  return "bert" if model_config.text_encoder == "bert" else "vocab"


def frozen_paths(model_config):
  del model_config
  return ()


def eval_tile(model_config):
  del model_config
  return (1000, 5000)  # a dot product: whole Flickr30K test in one tile


def recipe(c, dataset: str, text_encoder: str = "bert"):
  """The authors' recipe on their VLP features (BERT: BertAdam 2e-5 with warmup 0.1;
  GRU: Adam 2e-4, global-norm clip 2.0, no region_pos)."""
  epochs, batch, lr_update, k = RECIPES[(dataset, text_encoder)]
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
  return c


def demo(c):
  """Frozen MiniLM BERT build, K=2, 256-wide: 3 epochs of 1000 synthetic images."""
  from dsran_jax.hub import minilm_dir  # pylint: disable=g-import-not-at-top
  c.model.text_encoder = "bert"
  c.model.bert_path = minilm_dir()
  c.model.embed_size = 256
  c.model.K = 2
  c.train.batch_size = 64
  c.train.num_epochs = 3
  c.train.lr_update = 10  # BertAdam's warmup-linear decay does the annealing
  c.train.learning_rate = 2e-4
  c.train.optimizer = "bertadam"
  c.train.warmup = 0.05
  # Frozen MiniLM: forward only, so a step fits a 2-core CPU; the text GAT and projection
  # learn on top of it.
  c.train.freeze_bert = True
  return c


def validate(c):
  """Raises ValueError naming the first DSRAN key out of range."""
  m = c.model
  allowed = {"text_encoder": ("bert", "gru"), "image_inputs": ("grid+regions", "regions"),
             "text_padding": ("masked", "reference"), "K": (1, 2, 4)}
  for key, values in allowed.items():
    if m[key] not in values:
      raise ValueError(f"config.model.{key}={m[key]!r}: expected one of {values}")
  for key in ("embed_size", "gat_heads", "gat_layers", "img_dim", "pos_dim", "word_dim"):
    if m[key] < (0 if key == "gat_layers" else 1):
      raise ValueError(f"config.model.{key}={m[key]}: must be >= "
                       f"{0 if key == 'gat_layers' else 1}")
  if m.embed_size % m.gat_heads:
    raise ValueError(f"config.model.embed_size={m.embed_size} must be divisible by "
                     f"config.model.gat_heads={m.gat_heads}")
  if not 0.0 <= m.gat_dropout < 1.0:
    raise ValueError(f"config.model.gat_dropout={m.gat_dropout}: must be in [0, 1)")
