"""How a family wants captions batched at inference (the value its `text_policy` hook
returns and the matcher follows), and the widths caption batches are padded to on every
path (training, evaluation, inference, search).

The length rule (docs/protocol.md, "Caption lengths"): a caption is cut only where the
family's authors cut it (`models.caption_cap`) or where the user sets `data.max_len`; a
batch of captions is as wide as its longest caption, rounded up to a multiple of
`data.caption_bucket` (`bucket_width`), so the jitted functions see a bounded number of
widths; a model that attends to padding (DSRAN's reference BERT build) gets exactly the
cut (`TextPolicy.fixed_width`).
"""
import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class TextPolicy:
  """How a family wants captions batched at inference (its `text_policy` hook).

  Attributes:
    group: captions encoded together (each group padded to one width), or None for
      `batch_size` chunks; DSRAN's GRU reference mode uses the authors' eval batch.
    fixed_width: every caption batch is exactly this wide and longer ids are an error
      (reference BERT: the cut, `models.caption_cap`); None: as wide as the longest
      caption, rounded up to a bucket.
    max_positions: the text encoder's position limit (BERT), or None.
  """
  group: Optional[int] = None
  fixed_width: Optional[int] = None
  max_positions: Optional[int] = None


def bucket_width(longest: int, bucket: int, limit: Optional[int] = None) -> int:
  """The width a batch whose longest caption has `longest` tokens is padded to: the
  smallest multiple of `bucket` holding it (at least one bucket), capped at `limit`
  (the widest any batch of the data can need) when given.

  Widths beyond the longest caption never change a score (every family masks its
  padding; DSRAN's reference GRU mode spans the batch's longest caption in-graph), so
  the bucket only bounds the number of compiled shapes: ceil(limit / bucket) at most.
  """
  if bucket < 1:
    raise ValueError(f"caption bucket must be >= 1, got {bucket}")
  width = max(1, -(-int(longest) // int(bucket))) * int(bucket)
  if limit is not None:
    width = min(width, max(int(limit), int(longest), 1))
  return width
