"""GloVe initialisation of a word-embedding table from a local text file."""
from typing import Mapping, Optional

import jax.numpy as jnp
import numpy as np
from absl import logging

from dsran_jax.core.vocab import Vocabulary


def stripped_form(word: str) -> str:
  """The authors' fallback form of a word GloVe lacks (their "quick-and-dirty trick to
  improve word-hit rate"): `-`, `.` and `'` dropped, and only the part before a `/`."""
  alt = word.replace("-", "").replace(".", "").replace("'", "")
  return alt.split("/")[0] if "/" in alt else alt


def read_glove(path: str, word2idx: Mapping[str, int], dim: int) -> tuple[dict, int]:
  """`({row index: vector}, missing count)` for the vocabulary's words in a GloVe .txt.

  As the authors' `EncoderText.init_weights` over torchtext's GloVe: a word takes the
  vector of its exact form when the file has one, else that of `stripped_form(word)`
  (`t-shirt` gets `t-shirt`'s vector if present, else `tshirt`'s), else none; a token
  the file lists twice keeps its last vector (torchtext's `stoi`); a line of one value
  (a header) is skipped. Lines split on single spaces, as torchtext's loader does
  (glove.840B's tokens hold non-breaking spaces).

  Raises:
    ValueError: a wanted token's vector that is not `dim` numbers, naming file and line.
  """
  wanted = set(word2idx) | {stripped_form(w) for w in word2idx}
  vectors = {}
  with open(path, encoding="utf-8", errors="replace") as f:
    for line_no, line in enumerate(f, 1):
      word, _, rest = line.rstrip("\r\n ").partition(" ")
      if word not in wanted:
        continue
      values = rest.split(" ")
      if len(values) == 1:
        continue  # a header line ("<count> <dim>"), which torchtext skips too
      try:
        vec = np.array(values, np.float32)
      except ValueError:
        vec = None
      if vec is None or vec.shape != (dim,):
        raise ValueError(f"{path}:{line_no}: the vector of {word!r} is not {dim} numbers "
                         f"(model.word_dim): {' '.join(values[:3])[:60]} ... "
                         f"({len(values)} fields)")
      vectors[word] = vec
  rows = {}
  for word, idx in word2idx.items():
    vec = vectors.get(word)
    if vec is None:
      vec = vectors.get(stripped_form(word))
    if vec is not None:
      rows[idx] = vec
  return rows, len(word2idx) - len(rows)


def load_glove(variables: dict, path: str, word2idx: Mapping[str, int],
               module: str = "text_enc") -> dict:
  """Copies GloVe vectors into `<module>/embed`; words it lacks keep their random init."""
  params = dict(variables["params"])
  text = dict(params[module])
  table = np.array(text["embed"]["embedding"])
  rows, missing = read_glove(path, word2idx, table.shape[1])
  for idx, vec in rows.items():
    table[idx] = vec
  logging.info("GloVe %s: %d/%d words found, %d missing", path, len(rows), len(word2idx), missing)
  # Other tables of the embedding (a separate `<mask>` row) are kept as they are.
  text["embed"] = {**text["embed"], "embedding": jnp.asarray(table)}
  params[module] = text
  return {**variables, "params": params}


def load_configured_glove(variables: dict, config, vocab: Optional[Vocabulary] = None,
                          module: str = "text_enc") -> dict:
  """`load_glove` from `config.model.glove_path` with the model's word vocabulary `vocab`
  (the caller's: training passes `data.gru_vocabulary`) into `<module>/embed`;
  `variables` unchanged when no glove_path is set."""
  if not config.model.glove_path:
    return variables
  if vocab is None:
    raise ValueError(f"config.model.glove_path={config.model.glove_path!r} needs the "
                     f"model's word vocabulary, and none was given")
  return load_glove(variables, config.model.glove_path, vocab.word2idx, module=module)
