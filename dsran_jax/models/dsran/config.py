"""DSRAN's config hooks (jax-free). Its options are top-level `config.model.*` keys
(`text_encoder`, `K`, `image_inputs`, ...; their defaults are written by
`dsran_jax/default_config.py`), so it has no `model.dsran` section; they are declared
once in `OPTIONS` below, from which `validate` and the Module's `DSRANConfig` come. The
model's specification: docs/models/dsran.md."""
from dsran_jax.hub import minilm_dir
from dsran_jax.models.common.options import (Option, Options, at_least, one_of,
                                              within)

# The authors' README recipes: (epochs, batch, lr_update epoch, K) per dataset and build.
RECIPES = {
    ("f30k", "bert"): (12, 128, 6, 2),
    ("coco", "bert"): (18, 320, 9, 4),
    ("f30k", "gru"): (16, 128, 8, 2),
    ("coco", "gru"): (18, 300, 9, 2),
}


OPTIONS = Options(None, [
    Option("embed_size", 1024, at_least(1), "joint embedding width"),
    Option("K", 2, one_of(1, 2, 4), "JSR branches"),
    Option("text_encoder", "bert", one_of("bert", "gru"), "the build: BERT or GRU"),
    Option("image_inputs", "grid+regions", one_of("grid+regions", "regions"),
           "the 7x7 grid and the regions, or the regions alone"),
    Option("img_dim", 2048, at_least(1), "width of the region (and grid) features"),
    Option("pos_dim", 1607, at_least(1), "width of the region positions + class scores"),
    Option("use_region_pos", True, None, "the BERT build's position branch"),
    Option("gat_heads", 8, at_least(1), "GAT attention heads"),
    Option("gat_dropout", 0.2, within(0.0, 1.0, high_open=True), "GAT dropout rate"),
    Option("gat_layers", 1, at_least(0), "GAT layers"),
    Option("text_padding", "masked", one_of("masked", "reference"),
           '"masked" | "reference" (the authors\' padding, for converted checkpoints)'),
    Option("dtype", "float32", one_of("float32", "bfloat16"), "compute dtype"),
    Option("vocab_size", 0, at_least(0), "GRU build: 0: size of the built vocabulary"),
    Option("word_dim", 300, at_least(1), "GRU build: word-embedding width"),
])


def defaults():
  return None  # the keys are top-level, written by default_config.py


def image_keys(model_config):
  """`model_config`: `config.model`, or the Module's DSRANConfig (the same options)."""
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
  OPTIONS.validate(c.model)
  m = c.model
  if m.embed_size % m.gat_heads:
    raise ValueError(f"config.model.embed_size={m.embed_size} must be divisible by "
                     f"config.model.gat_heads={m.gat_heads}")
