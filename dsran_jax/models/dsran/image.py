"""Image side of DSRAN: grid and region encoders, and the gated JSR fusion tree."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dsran_jax.models.dsran.gat import GAT
from dsran_jax.models.common.layers import Dropout, Linear, masked_mean

Dtype = Any


class GridEncoder(nn.Module):
  """Projects (B, 49, img_dim) ResNet grid features to the embedding width.

  BERT build: Linear + ReLU + Dropout(0.1); GRU build: a single Xavier-initialised Linear.
  """
  embed_size: int
  bert_build: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, grid, train: bool):
    if not self.bert_build:
      return Linear(self.embed_size, init="xavier", dtype=self.dtype, name="fc")(grid)
    x = nn.relu(Linear(self.embed_size, dtype=self.dtype, name="fc")(grid))
    return Dropout(0.1, deterministic=not train)(x)


class RegionEncoder(nn.Module):
  """Projects region features (and, in the BERT build, their box/class encoding).

  BERT build: MLP(img_dim -> img_dim -> E, ReLU after both, Dropout 0.1) plus
  MLP(region_pos -> E, ReLU, Dropout 0.1), summed. GRU build: one Xavier Linear.
  """
  embed_size: int
  bert_build: bool = True
  use_region_pos: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, regions, region_pos, train: bool):
    drop = lambda x: Dropout(0.1, deterministic=not train)(x)
    if not self.bert_build:
      return Linear(self.embed_size, init="xavier", dtype=self.dtype, name="fc_image")(regions)
    x = nn.relu(Linear(regions.shape[-1], dtype=self.dtype, name="fc_image_0")(regions))
    x = drop(nn.relu(Linear(self.embed_size, dtype=self.dtype, name="fc_image_1")(x)))
    if self.use_region_pos:
      x = x + drop(nn.relu(Linear(self.embed_size, dtype=self.dtype, name="fc_pos")(region_pos)))
    return x


class Fusion(nn.Module):
  """Gated fusion: f1 = W0 a, f2 = W1 b, t = sigmoid(Wf0 f1 + Wf1 f2), t f1 + (1-t) f2."""
  embed_size: int

  @nn.compact
  def __call__(self, a, b):
    f1 = Linear(self.embed_size, name="gate0")(a)
    f2 = Linear(self.embed_size, name="gate1")(b)
    t = nn.sigmoid(Linear(self.embed_size, name="fusion0")(f1)
                   + Linear(self.embed_size, name="fusion1")(f2))
    return t * f1 + (1 - t) * f2


class JSR(nn.Module):
  """Joint semantic relations: K independent GAT blocks over all image nodes, each
  mean-pooled, fused by gates (K=2: one Fusion; K=4: fusion(fusion(1,2), fusion(3,4)))."""
  embed_size: int
  K: int = 2
  gat_layers: int = 1
  num_heads: int = 8
  dropout: float = 0.2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, nodes, node_mask, train: bool):
    if self.K not in (1, 2, 4):
      raise ValueError(f"model.dsran.K must be 1, 2 or 4, got {self.K}")
    pooled = [
        masked_mean(GAT(self.gat_layers, self.num_heads, self.dropout, self.dtype,
                        name=f"gat_{k}")(nodes, node_mask, train).astype(jnp.float32),
                    node_mask)
        for k in range(self.K)
    ]
    if self.K == 1:
      return pooled[0]
    if self.K == 2:
      return Fusion(self.embed_size, name="fusion")(pooled[0], pooled[1])
    left = Fusion(self.embed_size, name="fusion_a")(pooled[0], pooled[1])
    right = Fusion(self.embed_size, name="fusion_b")(pooled[2], pooled[3])
    return Fusion(self.embed_size, name="fusion")(left, right)
