"""How a family wants captions batched at inference: the value its `text_policy` hook
returns and the matcher follows."""
import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class TextPolicy:
  """How a family wants captions batched at inference (its `text_policy` hook).

  Attributes:
    group: captions encoded together (each group padded to one width), or None for
      `batch_size` chunks; DSRAN's GRU reference mode uses the authors' eval batch.
    untruncated: tokenise texts without cutting them to `data.max_len`.
    max_width: the largest id width accepted (reference BERT: exactly `data.max_len`).
    max_positions: the text encoder's position limit (BERT), or None.
  """
  group: Optional[int] = None
  untruncated: bool = False
  max_width: Optional[int] = None
  max_positions: Optional[int] = None
