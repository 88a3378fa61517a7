"""Recipe pieces shared by the families' config hooks. Jax-free, as every `config.py`:
it imports only `options` and works on the ml_collections ConfigDicts it is handed.

The GRU families (SCAN, SGRAF, BSSAN, MLASM, KIDRR) train with the VSE++ / SCAN recipe:
36 BUTD regions of 2048 floats, a 1024-wide joint space over 300-d word embeddings, Adam
with a global-norm clip of 2.0 and batch 128, and the hinge loss (margin 0.2) on the
hardest negatives. Each family's `recipe` / `demo` calls the pieces below and sets only
its own numbers (schedule, widths, options).
"""
from dsran_jax.models.common.options import at_least


def region_features(c, data_format: str = "precomp", num_regions: int = 36,
                    img_dim: int = 2048):
  """Detector regions: `num_regions` per image of `img_dim` floats, for data and model
  ("precomp": the BUTD release; "vlp": DSRAN's features cut to their first 36)."""
  c.data.format = data_format
  c.data.num_regions = num_regions
  c.data.img_dim = c.model.img_dim = img_dim
  return c


def joint_space(c, embed_size: int = 1024, word_dim: int = 300):
  """The joint embedding width and the word-embedding width."""
  c.model.embed_size = embed_size
  c.model.word_dim = word_dim
  return c


def adam_clipped(c, learning_rate: float, num_epochs: int, lr_update: int,
                 batch_size: int = 128):
  """Adam at `learning_rate`, no warmup, x0.1 every `lr_update` epochs, global-norm clip
  2.0, `batch_size` pairs a step."""
  c.train.optimizer = "adam"
  c.train.learning_rate = learning_rate
  c.train.num_epochs = num_epochs
  c.train.lr_update = lr_update
  c.train.warmup = 0.0
  c.train.grad_clip = 2.0
  c.train.batch_size = batch_size
  return c


def hinge_loss(c, max_violation: bool = True, sum_violation_steps: int = 0):
  """The hinge loss at margin 0.2: hardest negatives (`max_violation`) after
  `sum_violation_steps` steps of summed violations, or summed violations throughout."""
  c.train.margin = 0.2
  c.train.max_violation = max_violation
  c.train.sum_violation_steps = sum_violation_steps
  return c


def authors_gru_recipe(c, learning_rate: float, num_epochs: int, lr_update: int,
                       data_format: str = "precomp", dev_images: int = 1000,
                       vocab_splits: str = "train+dev"):
  """The shared recipe of the GRU families: 36 regions x 2048, embed 1024, word_dim 300,
  `adam_clipped` at batch 128, hardest negatives from the first step, eval batch 128;
  SCAN's data pipeline by default: model selection on the first 1000 dev images
  (`if data_split == 'dev': self.length = 5000` captions) and a vocabulary of the train
  and dev captions (their vocab.py reads `{train,dev}_caps.txt`)."""
  region_features(c, data_format)
  joint_space(c)
  adam_clipped(c, learning_rate, num_epochs, lr_update)
  hinge_loss(c)
  c.eval.batch_size = 128
  c.eval.max_dev_images = dev_images
  c.data.vocab_splits = vocab_splits
  return c


def vsepp_dev_images(dataset: str) -> int:
  """`eval.max_dev_images` of VSE++'s loaders, which DSRAN and MLASM keep: every
  Flickr30K val image (1014; 0 = all), and COCO's first 5000 dev ids (`coco_dev_ids.npy
  [:5000]`, 1000 images)."""
  return 1000 if dataset == "coco" else 0


def glove_departure(c, initial: str) -> list:
  """The departure a run of a GloVe-initialised recipe reports when `model.glove_path`
  is empty (`departures` hooks): the word embeddings start from `initial` instead."""
  if c.model.glove_path:
    return []
  return [(f"model.glove_path is empty: the word embeddings start from {initial}, where "
           f"the authors initialise them from GloVe (torchtext's GloVe(): "
           f"glove.840B.300d.txt); set --config.model.glove_path=/path/to/glove.840B.300d.txt")]


def synthetic_epoch_steps(c) -> int:
  """Steps in one epoch of the synthetic world's training captions (5 an image)."""
  captions = c.data.synthetic.num_train_images * 5
  return captions // c.train.batch_size


def demo_training(c, num_epochs: int = 3, lr_update: int = 2):
  """The demos' schedule on the synthetic world: Adam lr 1e-3 (for a few-epoch budget),
  clip 2.0, batch 64."""
  return adam_clipped(c, 1e-3, num_epochs, lr_update, batch_size=64)


def warmed_up_hardest_negatives(c):
  """Hardest negatives after one epoch of summed violations (VSE++'s warm-up): from
  scratch, the hardest-negative loss otherwise sits at its collapsed value for epochs.
  Call after the batch size is set."""
  return hinge_loss(c, max_violation=True, sum_violation_steps=synthetic_epoch_steps(c))


def validate_widths(c):
  """Raises ValueError if a shared width of the GRU families (`model.embed_size`,
  `model.word_dim`, `model.img_dim`, `model.vocab_size`) is out of range."""
  for key in ("embed_size", "word_dim", "img_dim"):
    if c.model[key] < 1:
      raise ValueError(f"config.model.{key}={c.model[key]}: must be >= 1")
  if c.model.vocab_size < 0:
    raise ValueError(f"config.model.vocab_size={c.model.vocab_size}: must be >= 0 "
                     f"(0: the size of the built vocabulary)")


# The rule of the families' `max_block_elements` option (a scoring memory bound).
block_elements_rule = at_least(0, " (0: no blocking)")


# Hooks shared by the families that read detector regions and word ids (a family's
# config.py binds them by name: `image_keys = recipes.region_keys`).


def region_keys(model_config):
  """Image-side batch keys: the region features and their mask."""
  del model_config
  return ("regions", "region_mask")


def word_keys(model_config):
  """Caption-side batch keys: word ids and their mask."""
  del model_config
  return ("input_ids", "attention_mask")


def word_vocab(model_config):
  """The tokenizer kind: a word vocabulary built from the training captions."""
  del model_config
  return "vocab"


def nothing_frozen(model_config):
  """No parameter is frozen."""
  del model_config
  return ()

