"""CHAN (Pan et al., CVPR 2023; ppanzx/CHAN lib/encoders.py, lib/coding.py,
lib/modules.py) as a `MatchingModel`: region and word features, scored by hard
alignment.

- Image (`EncoderImagePrecomp`): fc (Xavier-uniform, bias 0) of the regions; with
  `precomp_enc_type="selfattention"` a pre-LN residual `x + MHA(LN(x))` (8 heads) over
  the regions; l2norm per region.
- Text, BERT build: BERT (attention mask `ids != 0`) -> Linear(hidden, E) per token ->
  l2norm per token (no pooling: every token, [CLS] and [SEP] included, is a word).
- Text, BiGRU build: Embedding (Xavier-uniform, or GloVe; plus their `<mask>` row) ->
  bidirectional GRU, halves averaged -> l2norm per word. Their `txt_enc.fc` is built
  but never called, so it is not a parameter here.
- Score (`SimsEncoder`): a coding of the (regions x words) cosine matrix of each pair,
  then a pooling of it (`coded_similarities`, `pool`).

Reps are token-level, as SCAN's: images `{"regions", "region_mask"}`, captions
`{"words", "word_mask"}`; all the cross-modal work is in `score`.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsran_jax.models.chan import config as spec
from dsran_jax.models.common import cross_attention as xattn
from dsran_jax.models.common.base import RegionWordModel, region_inputs, text_inputs
from dsran_jax.models.common.layers import Linear, l2norm
from dsran_jax.models.common.vse import (MaskedWordEmbedding, bert_words, bidirectional_gru,
                                         check_text_encoder, config_fields)

EPS = 1e-8    # their l2norm and VSACoding: x / (||x|| + 1e-8)
MASK = -1.0   # their padding value of the coded similarities
HIGHEST = jax.lax.Precision.HIGHEST
_NEG = -1e30  # a finite "minus infinity" for masked logits


class ChanConfig(config_fields(spec.OPTIONS, "ChanConfigFields")):
  """Hashable CHAN description: the shared widths, every `config.model.chan` option that
  shapes the Module, and the BERT build's `BertConfig`; built by `chan.build`."""

  def __post_init__(self):
    super().__post_init__()
    check_text_encoder(self, "CHAN", "chan")


# ------------------------------------------------------------------------ encoders


class RegionSelfAttention(nn.Module):
  """Their `SelfAttention`: `x + MHA(LN(x), LN(x), LN(x))`, torch's
  nn.MultiheadAttention (one packed in-projection, `heads` heads, out-projection).

  `n_pad` (B,) copies of the row `pad_row` (E,) join every item's keys and values: their
  forward passes no key padding mask, so in a batch padded to its longest image the
  zero-feature regions (fc's bias) are attended to. Real positions outside `mask` are
  never keys.
  """
  heads: int

  @nn.compact
  def __call__(self, x, mask, pad_row, n_pad):
    b, r, e = x.shape
    d = e // self.heads
    ln = nn.LayerNorm(epsilon=1e-5, name="ln")
    in_proj = Linear(3 * e, name="in_proj")
    split = lambda t: t.reshape(t.shape[:-1] + (self.heads, d))
    q, k, v = jnp.split(in_proj(ln(x)), 3, axis=-1)
    _, pad_k, pad_v = jnp.split(in_proj(ln(pad_row[None]))[0], 3, axis=-1)
    q, k, v = split(q) / d ** 0.5, split(k), split(v)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=HIGHEST)
    logits = jnp.where(mask[:, None, None, :], logits, _NEG)
    # n copies of one key: one logit with log(n) added (exp(l + log n) = n exp(l)).
    pad_logit = jnp.einsum("bqhd,hd->bhq", q, split(pad_k), precision=HIGHEST)
    pad_logit = jnp.where(n_pad[:, None, None] > 0,
                          pad_logit + jnp.log(jnp.maximum(n_pad, 1.0))[:, None, None], _NEG)
    logits = jnp.concatenate([logits, pad_logit[..., None]], -1)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights[..., :r], v, precision=HIGHEST)
    out = out + weights[..., r].transpose(0, 2, 1)[..., None] * split(pad_v)
    return x + Linear(e, name="out_proj")(out.reshape(b, r, e))


class ImageEncoder(nn.Module):
  """EncoderImagePrecomp on precomputed regions: (B, R, img_dim) + mask -> (B, R, E),
  zero outside the mask."""
  config: ChanConfig

  @nn.compact
  def __call__(self, regions, mask, train: bool):
    c = self.config
    fc = Linear(c.embed_size, init="xavier", name="fc")
    x = fc(jnp.where(mask[..., None], regions.astype(jnp.float32), 0.0))
    if c.precomp_enc_type == "selfattention":
      lengths = jnp.sum(mask, axis=1).astype(jnp.float32)
      # Training: their collate pads the batch to its longest image with zero rows;
      # evaluation: no padding (their test images all have 36 regions), so an image's
      # embedding does not depend on the batch it is encoded in.
      n_pad = (jnp.max(lengths) - lengths) if train else jnp.zeros_like(lengths)
      pad_row = fc(jnp.zeros((1, regions.shape[-1]), jnp.float32))[0]
      x = RegionSelfAttention(spec.SELF_ATTENTION_HEADS, name="feedforward")(
          x, mask, pad_row, n_pad)
    if not c.no_imgnorm:
      x = l2norm(x, eps=EPS)
    return jnp.where(mask[..., None], x, 0.0)


class BertTextEncoder(nn.Module):
  """EncoderTextBert: BERT -> Linear(hidden, E) -> l2norm per token."""
  config: ChanConfig

  @nn.compact
  def __call__(self, input_ids, mask, train: bool):
    c = self.config
    words = bert_words(input_ids, mask, c.bert, c.embed_size, train)
    if not c.no_txtnorm:
      words = l2norm(words, eps=EPS)
    return jnp.where(mask[..., None], words, 0.0)


class BiGruTextEncoder(nn.Module):
  """EncoderTextBigru: Embedding (Xavier-uniform over the table with `<mask>`) -> BiGRU,
  halves averaged -> l2norm per word."""
  config: ChanConfig

  @nn.compact
  def __call__(self, input_ids, mask, train: bool):
    del train
    c = self.config
    x = MaskedWordEmbedding(c.vocab_size, c.word_dim, bound=None, name="embed")(input_ids)
    words = bidirectional_gru(x, mask, c.embed_size, c.num_layers)
    if not c.no_txtnorm:
      words = l2norm(words, eps=EPS)
    return jnp.where(mask[..., None], words, 0.0)


# ---------------------------------------------------------------------- similarity


def coded_similarities(regions, region_mask, words, word_mask, coding_type: str,
                       alpha: float = 0.1):
  """Their coding of a tile: (I, J, n) similarities and the (I, J, n) mask of the
  entries their pooling counts.

  VHACoding: n = words, each word's best region, `max(-1, max_r <region_r, word_w>)`.
  THACoding: n = regions, each region's best word, `max(-1, max_w <region_r, word_w>)`.
  VSACoding: n = regions; region r attends to the words with softmax over them of
    `<region_r, word_w> / alpha`, scored `<region_r, ctx_r> / (||ctx_r|| + 1e-8)`.

  Their padding fills the (regions x words) matrix with MASK = -1 before the max, and
  their pooling drops every entry equal to MASK: a position with nothing real to align
  with, and also (their sentinel) a real one whose best similarity is at most -1, which
  only unnormalised embeddings (`no_imgnorm` / `no_txtnorm`) can reach. Both are dropped
  here too.
  """
  s = jnp.einsum("ird,jwd->ijrw", regions, words, precision=HIGHEST,
                 preferred_element_type=jnp.float32)
  rm = region_mask.astype(bool)[:, None, :, None]  # (I, 1, R, 1)
  wm = word_mask.astype(bool)[None, :, None, :]    # (1, J, 1, L)
  if coding_type in ("VHACoding", "THACoding"):
    axis = 2 if coding_type == "VHACoding" else 3
    coded = jnp.max(jnp.where(rm & wm, s, MASK), axis=axis)
    return coded, coded != MASK
  if coding_type == "VSACoding":
    a = xattn.masked_softmax(s / alpha, wm, axis=-1)  # zero at padded words
    a = jnp.where(rm, a, 0.0)
    num = jnp.sum(a * s, axis=-1)                     # <region_r, ctx_r>
    # ||ctx_r||^2 = a_r^T G a_r with each caption's word Gram matrix G.
    gram = jnp.einsum("jwd,jvd->jwv", words, words, precision=HIGHEST)
    ga = jnp.einsum("ijrw,jwv->ijrv", a, gram, precision=HIGHEST)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(a * ga, axis=-1), 1e-30))
    real = rm[..., 0] & jnp.any(wm, axis=3)
    coded = jnp.where(real, num / (norm + EPS), MASK)
    return coded, coded != MASK
  raise ValueError(f"coding_type={coding_type!r}: expected one of {spec.CODING_TYPES}")


def pool(coded, valid, pooling_type: str, belta: float = 0.1):
  """Their pooling of the coded similarities over the last axis, over `valid` entries
  (a row with none, a padded tile item, gives 0).

  MaxPooling max; MeanPooling mean; SumPooling sum; LSEPooling `log sum exp(s / belta)`
  (not divided back by belta); SoftmaxPooling `sum softmax(s / belta) s` (theirs
  multiplies the -inf it writes at MASK entries by their zero weights: NaN for every
  pair with padding; here those entries are left out).
  """
  count = jnp.sum(valid, axis=-1)
  any_valid = count > 0
  if pooling_type == "MaxPooling":
    out = jnp.max(jnp.where(valid, coded, _NEG), axis=-1)
  elif pooling_type == "MeanPooling":
    out = jnp.sum(jnp.where(valid, coded, 0.0), axis=-1) / jnp.maximum(count, 1)
  elif pooling_type == "SumPooling":
    out = jnp.sum(jnp.where(valid, coded, 0.0), axis=-1)
  elif pooling_type == "LSEPooling":
    out = jax.nn.logsumexp(jnp.where(valid, coded / belta, _NEG), axis=-1)
  elif pooling_type == "SoftmaxPooling":
    w = xattn.masked_softmax(coded / belta, valid, axis=-1)
    out = jnp.sum(w * jnp.where(valid, coded, 0.0), axis=-1)
  else:
    raise ValueError(f"pooling_type={pooling_type!r}: expected one of {spec.POOLING_TYPES}")
  return jnp.where(any_valid, out, 0.0)


def chan_scores(regions, region_mask, words, word_mask, *, coding_type: str,
                pooling_type: str, alpha: float, belta: float):
  """(I, J) float32 CHAN scores of every image of a tile with every caption of it (their
  `SimsEncoder`: coding, then pooling)."""
  coded, valid = coded_similarities(regions.astype(jnp.float32), region_mask,
                                    words.astype(jnp.float32), word_mask, coding_type, alpha)
  return pool(coded, valid, pooling_type, belta)


class CHAN(RegionWordModel):
  """Cross-modal Hard Aligning Network: reps `{"regions", "region_mask"}` and
  `{"words", "word_mask"}`; `__call__(batch, train)` is the (B, B) `sims` their
  ContrastiveLoss takes."""
  spec = spec
  config: ChanConfig

  def setup(self):
    self.img_enc = ImageEncoder(self.config)
    self.txt_enc = (BertTextEncoder(self.config) if self.config.text_encoder == "bert"
                    else BiGruTextEncoder(self.config))

  def encode_images(self, batch, train: bool = False):
    regions, mask = region_inputs(batch, self.config.img_dim)
    return {"regions": self.img_enc(regions, mask, train), "region_mask": mask}

  def encode_texts(self, batch, train: bool = False):
    ids, mask = text_inputs(batch)
    return {"words": self.txt_enc(ids, mask, train), "word_mask": mask}

  def score(self, image_reps, text_reps, train: bool = False):
    del train
    c = self.config
    fn = functools.partial(chan_scores, coding_type=c.coding_type,
                           pooling_type=c.pooling_type, alpha=c.alpha, belta=c.belta)
    return xattn.map_caption_blocks(
        fn, image_reps["regions"], image_reps["region_mask"], text_reps["words"],
        text_reps["word_mask"], max_elements=c.max_block_elements or None)
