"""The DSRAN network: SSR on grid and region nodes, JSR over both, a text encoder with its
own GAT; returns L2-normalised image and text embeddings."""
from typing import Optional

import jax
import jax.numpy as jnp

from dsran_jax.core.batch import GRID_CELLS
from dsran_jax.models.common.base import MatchingModel, select
from dsran_jax.models.common.bert import BertConfig
from dsran_jax.models.common.layers import l2norm, masked_mean
from dsran_jax.models.common.options import WIDTHS
from dsran_jax.models.common.resnet import ResNet, ResNetConfig, grid_cells
from dsran_jax.models.dsran import config as spec
from dsran_jax.models.dsran.gat import GAT
from dsran_jax.models.dsran.image import JSR, GridEncoder, RegionEncoder
from dsran_jax.models.dsran.text import BertTextEncoder, GruTextEncoder

GRID_NODES = GRID_CELLS
# torchvision's ImageNet normalisation (their `transforms.Normalize` after `ToTensor`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# The Module config's head: the shared widths (top-level `config.model.*`); vocab_size is
# the GRU build's (0 for the BERT build).
HEAD = (("vocab_size", int, 0),) + WIDTHS[1:]
DTYPES = ("float32", "bfloat16")


class DSRANConfig(spec.OPTIONS.dataclass(
    "DSRANConfigFields", head=HEAD,
    tail=(("dtype", str, "float32"), ("bert", Optional[BertConfig], None)))):
  """Hashable model description: the shared widths, every DSRAN option of
  `config.model.dsran` that shapes the Module (fields, defaults and rules from
  `dsran.config.OPTIONS`), the compute dtype and the BERT build's `BertConfig`; built
  from `config.model` by `dsran.build`."""

  def __post_init__(self):
    super().__post_init__()
    if self.dtype not in DTYPES:
      raise ValueError(f"config.model.dtype={self.dtype!r}: expected one of "
                       f"{', '.join(repr(d) for d in DTYPES)}")
    if self.text_encoder == "bert" and self.bert is None:
      raise ValueError("the BERT build needs a BertConfig (config.model.dsran.bert_path)")
    if self.text_encoder == "gru" and self.vocab_size <= 0:
      raise ValueError("the GRU build needs a vocabulary size > 0")
    if self.embed_size % self.gat_heads:
      raise ValueError(f"model.embed_size={self.embed_size} must divide by {self.gat_heads} heads")

  @property
  def bert_build(self) -> bool:
    return self.text_encoder == "bert"

  @property
  def compute_dtype(self):
    return jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32

  @property
  def online_grid(self) -> bool:
    """Whether the grid comes from the frozen ResNet run on raw images in the step."""
    return self.image_inputs == spec.ONLINE

  @property
  def resnet(self) -> ResNetConfig:
    """The online grid's ResNet (torchvision's bottleneck shape; stem = first width)."""
    return ResNetConfig(depths=tuple(self.cnn_depths), widths=tuple(self.cnn_widths),
                        stem_width=int(self.cnn_widths[0]))


class DSRAN(MatchingModel):
  """Dual Semantic Relations Attention Network, an embedding model.

  Reps are the L2-normalised (B, E) embeddings and `score` is their dot product (cosine),
  so `__call__(batch, train)` gives the (B, B) cosine matrix the VSE++ loss takes.
  `embed_images` / `embed_texts` take the arrays as keywords (use with
  `apply(..., method=...)`). Batch keys: `config.image_keys` / `text_keys` (`spec`).
  """
  spec = spec
  config: DSRANConfig

  @property
  def input_dims(self):
    return {"img_dim": self.config.img_dim, "pos_dim": self.config.pos_dim,
            "image_size": self.config.crop_size}

  def setup(self):
    c = self.config
    dt = c.compute_dtype
    gat = lambda name: GAT(c.gat_layers, c.gat_heads, c.gat_dropout, dt, name=name)
    if c.image_inputs in ("grid+regions", spec.ONLINE):
      self.grid_enc = GridEncoder(c.embed_size, c.bert_build, dt)
      self.gat_grid = gat("gat_grid")
    if c.online_grid:
      self.cnn = ResNet(c.resnet, dt)
    self.region_enc = RegionEncoder(c.embed_size, c.bert_build,
                                    c.use_region_pos and c.bert_build, dt)
    self.gat_region = gat("gat_region")
    self.jsr = JSR(c.embed_size, c.K, c.gat_layers, c.gat_heads, c.gat_dropout, dt)
    reference = c.text_padding == "reference"
    if c.bert_build:
      self.text_enc = BertTextEncoder(c.bert, c.embed_size, reference, dt)
    else:
      self.text_enc = GruTextEncoder(c.vocab_size, c.word_dim, c.embed_size, reference, dt)
    self.gat_text = gat("gat_text")

  def cnn_grid(self, image, train: bool = False):
    """The online grid: (B, h*w, C) cells of the frozen ResNet's last map on raw pixels
    `image` (B, H, W, 3) uint8, normalised as torchvision's ToTensor + Normalize. In
    train mode its BatchNorm uses the batch's statistics and moves its running ones
    (pass `mutable=["batch_stats"]`), as the authors' `model.train()` does to their
    frozen CNN; at evaluation it uses the running statistics."""
    if image.ndim != 4 or image.shape[-1] != 3:
      raise ValueError(f"image: expected (B, H, W, 3) pixels, got {tuple(image.shape)}")
    x = image.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)
    fmap, _ = self.cnn(x, train)
    return grid_cells(fmap)

  def embed_images(self, grid=None, regions=None, region_pos=None, region_mask=None,
                   image=None, train: bool = False):
    """(B, E) L2-normalised image embeddings (`image`: raw pixels for the online grid,
    which replace `grid`)."""
    c = self.config
    if regions is None:
      raise ValueError("embed_images needs `regions` (B, R, img_dim)")
    if c.online_grid:
      if image is None:
        raise ValueError("model.dsran.image_inputs='image+regions' needs `image` "
                         "(B, crop, crop, 3) uint8 pixels")
      grid = self.cnn_grid(image, train)
    b, r, _ = regions.shape
    if c.text_padding == "reference" or region_mask is None:
      region_mask = None
    else:
      region_mask = region_mask.astype(bool)
    if region_pos is None:
      region_pos = jnp.zeros((b, r, c.pos_dim), regions.dtype)
    nodes = self.gat_region(self.region_enc(regions, region_pos, train), region_mask, train)
    node_mask = region_mask
    if c.image_inputs in ("grid+regions", spec.ONLINE):
      if grid is None:
        raise ValueError("model.dsran.image_inputs='grid+regions' needs `grid` "
                         "(B, 49, img_dim)")
      grid_nodes = self.gat_grid(self.grid_enc(grid, train), None, train)
      nodes = jnp.concatenate([grid_nodes, nodes], axis=1)
      if node_mask is not None:
        node_mask = jnp.concatenate([jnp.ones((b, grid.shape[1]), bool), node_mask], axis=1)
    return l2norm(self.jsr(nodes, node_mask, train))

  def embed_texts(self, input_ids, attention_mask=None, train: bool = False):
    """(B, E) L2-normalised caption embeddings."""
    if attention_mask is None:
      attention_mask = (input_ids != 0).astype(jnp.int32)
    tokens, node_mask = self.text_enc(input_ids, attention_mask, train)
    tokens = self.gat_text(tokens, node_mask, train)
    return l2norm(masked_mean(tokens.astype(jnp.float32), node_mask))

  def encode_images(self, batch, train: bool = False):
    return self.embed_images(**select(batch, self.image_keys), train=train)

  def encode_texts(self, batch, train: bool = False):
    return self.embed_texts(**select(batch, self.text_keys), train=train)

  def score(self, image_reps, text_reps, train: bool = False):
    del train
    # HIGHEST: no bf16 passes on TPU; ranks need full fp32 scores.
    return jnp.matmul(image_reps, text_reps.T, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)

