"""VSE∞'s training-time augmentation (their lib/datasets/image_caption.py), on a host
batch of numpy arrays (`models.train_augmentation` hands it to the training pipeline).
CHAN's loaders (ppanzx/CHAN lib/datasets/image_caption_{bert,bigru}.py) are the same
code at the same rates, so both families use it (`augmentation_of`).

- Regions (`PrecompRegionDataset.__getitem__`): each region is kept when a uniform draw
  exceeds `rate` (0.2); the kept ones stay in order at the front, the batch is padded
  after them (their collate).
- Captions, BERT build (`process_caption`): each *word* (a WordPiece token and its `##`
  continuations) is picked with probability `rate`; a picked word is, with probability
  1/2, replaced by [MASK] (one per piece), with 1/10 each piece replaced by a uniformly
  drawn vocabulary token, else (2/5) deleted. [CLS] and [SEP] are never picked.
- Captions, BiGRU build (branch `bigru`): the same per token of `<start> words <end>`
  (the ends can be picked), with their `<mask>` id (the row after the vocabulary) and
  random ids drawn from the vocabulary plus `<mask>`.

Captions arrive whole, as theirs (`data.max_len=-1`); a cut a user sets is applied
before the augmentation.
"""
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from dsran_jax.hub import resolve_pretrained_dir

MASK_SHARE, RANDOM_SHARE = 0.5, 0.6  # their thresholds on prob / rate


def drop_regions(regions: np.ndarray, mask: np.ndarray, rate: float,
                 rng: np.random.Generator):
  """(regions, mask) with each real region kept when U(0, 1) > `rate`, kept ones packed
  to the front in order, zeros after."""
  b, r = mask.shape
  keep = mask.astype(bool) & (rng.random((b, r)) > rate)
  order = np.argsort(~keep, axis=1, kind="stable")  # kept first, in their order
  packed = np.take_along_axis(regions, order[..., None], axis=1)
  new_mask = np.take_along_axis(keep, order, axis=1)
  packed = np.where(new_mask[..., None], packed, 0).astype(regions.dtype)
  return packed, new_mask.astype(mask.dtype)


def _pick(rng: np.random.Generator, rate: float) -> str:
  """"keep", or for a picked unit "mask" / "random" / "delete" (their branches)."""
  prob = rng.random()
  if prob >= rate:
    return "keep"
  prob /= rate
  return "mask" if prob < MASK_SHARE else "random" if prob < RANDOM_SHARE else "delete"


def _rebuild(rows: Sequence[List[int]], width: int, ids_dtype, mask_dtype):
  ids = np.zeros((len(rows), width), ids_dtype)
  mask = np.zeros((len(rows), width), mask_dtype)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return ids, mask


def mask_wordpieces(ids: np.ndarray, mask: np.ndarray, rate: float, *, continuation: np.ndarray,
                    mask_id: int, cls_id: int, sep_id: int, rng: np.random.Generator):
  """The BERT build's word masking of (B, L) ids (see the module docstring).

  `continuation[id]` is True for `##` pieces, which belong to the word before them.
  """
  vocab = len(continuation)
  rows = []
  for row_ids, row_mask in zip(ids, mask):
    tokens = [int(t) for t, m in zip(row_ids, row_mask) if m]
    head = tokens[:1] if tokens and tokens[0] == cls_id else []
    tail = tokens[-1:] if len(tokens) > len(head) and tokens[-1] == sep_id else []
    body = tokens[len(head):len(tokens) - len(tail)]
    words: List[List[int]] = []
    for t in body:
      if words and continuation[t]:
        words[-1].append(t)
      else:
        words.append([t])
    out = []
    for word in words:
      action = _pick(rng, rate)
      if action == "keep":
        out += word
      elif action == "mask":
        out += [mask_id] * len(word)
      elif action == "random":
        out += [int(rng.integers(vocab)) for _ in word]
    rows.append(head + out + tail)
  return _rebuild(rows, ids.shape[1], ids.dtype, mask.dtype)


def mask_words(ids: np.ndarray, mask: np.ndarray, rate: float, *, mask_id: int,
               num_ids: int, rng: np.random.Generator):
  """The BiGRU build's token masking of (B, L) ids: every token (the ends included) is
  picked with probability `rate`; random ids are drawn from [0, num_ids)."""
  rows = []
  for row_ids, row_mask in zip(ids, mask):
    out = []
    for t in (int(t) for t, m in zip(row_ids, row_mask) if m):
      action = _pick(rng, rate)
      if action == "keep":
        out.append(t)
      elif action == "mask":
        out.append(mask_id)
      elif action == "random":
        out.append(int(rng.integers(num_ids)))
    rows.append(out)
  return _rebuild(rows, ids.shape[1], ids.dtype, mask.dtype)


def wordpiece_vocabulary(bert_dir: str) -> Dict[str, int]:
  """token -> id of a BERT directory's `vocab.txt` (else its `tokenizer.json`)."""
  vocab_txt = os.path.join(bert_dir, "vocab.txt")
  if os.path.isfile(vocab_txt):
    with open(vocab_txt, encoding="utf-8") as f:
      return {line.rstrip("\n"): i for i, line in enumerate(f)}
  tok_json = os.path.join(bert_dir, "tokenizer.json")
  if os.path.isfile(tok_json):
    with open(tok_json, encoding="utf-8") as f:
      return dict(json.load(f)["model"]["vocab"])
  raise FileNotFoundError(f"{bert_dir}: no vocab.txt or tokenizer.json (the training "
                          f"token masking needs the WordPiece vocabulary)")


class Augmentation:
  """`augment(batch, rng) -> batch` of VSE∞'s training loader (module docstring).

  Args:
    region_rate: region dropout probability (0: off).
    token_rate: word-masking probability (0: off).
    text: {"kind": "bert", "vocab": token -> id} or {"kind": "bigru", "vocab_size": n}.
  """

  def __init__(self, region_rate: float, token_rate: float, text: dict):
    self.region_rate, self.token_rate = float(region_rate), float(token_rate)
    self.kind = text["kind"]
    if self.kind == "bert":
      vocab = text["vocab"]
      for special in ("[MASK]", "[CLS]", "[SEP]"):
        if special not in vocab:
          raise ValueError(f"the BERT vocabulary has no {special} token")
      size = max(vocab.values()) + 1
      self.continuation = np.zeros(size, bool)
      for token, i in vocab.items():
        self.continuation[i] = token.startswith("##")
      self.ids = {k: vocab[k] for k in ("[MASK]", "[CLS]", "[SEP]")}
    else:
      self.vocab_size = int(text["vocab_size"])

  def __call__(self, batch: dict, rng: np.random.Generator) -> dict:
    out = dict(batch)
    if self.region_rate > 0 and "regions" in batch:
      out["regions"], out["region_mask"] = drop_regions(
          batch["regions"], batch["region_mask"], self.region_rate, rng)
    if self.token_rate > 0:
      if self.kind == "bert":
        out["input_ids"], out["attention_mask"] = mask_wordpieces(
            batch["input_ids"], batch["attention_mask"], self.token_rate,
            continuation=self.continuation, mask_id=self.ids["[MASK]"],
            cls_id=self.ids["[CLS]"], sep_id=self.ids["[SEP]"], rng=rng)
      else:
        # Their `<mask>` is appended after the vocabulary; len(vocab) then counts it.
        out["input_ids"], out["attention_mask"] = mask_words(
            batch["input_ids"], batch["attention_mask"], self.token_rate,
            mask_id=self.vocab_size, num_ids=self.vocab_size + 1, rng=rng)
    return out


def augmentation_of(section, text_encoder: str, bert_path: str, vocab_size: int,
                    family: str) -> Optional[Augmentation]:
  """The `Augmentation` of a family's options `section` (its `region_drop` and
  `token_mask` rates): BERT build (`text_encoder == "bert"`) over `bert_path`'s
  WordPiece vocabulary, else the word-vocabulary build of `vocab_size` words (their
  `<mask>` comes after them); None when both rates are 0."""
  if section.region_drop == 0 and section.token_mask == 0:
    return None
  if text_encoder == "bert":
    text = {"kind": "bert", "vocab": wordpiece_vocabulary(str(resolve_pretrained_dir(bert_path)))}
  else:
    if not vocab_size:
      raise ValueError(f"{family}'s word-vocabulary token masking needs the vocabulary size")
    text = {"kind": "bigru", "vocab_size": int(vocab_size)}
  return Augmentation(section.region_drop, section.token_mask, text)
