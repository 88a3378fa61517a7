"""GloVe initialisation of the GRU build's word embedding from a local text file."""
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from absl import logging


def _lookup_forms(word: str):
  # The authors' trick to raise the hit rate: drop - . ' and keep the part before a /.
  yield word
  alt = word.replace("-", "").replace(".", "").replace("'", "")
  yield alt.split("/")[0] if "/" in alt else alt


def read_glove(path: str, word2idx: Mapping[str, int], dim: int) -> tuple[dict, int]:
  """{row index: vector} for the vocabulary words found in a GloVe .txt file."""
  wanted = {}
  for word, idx in word2idx.items():
    for form in _lookup_forms(word):
      wanted.setdefault(form, []).append(idx)
  rows = {}
  with open(path, encoding="utf-8", errors="replace") as f:
    for line_no, line in enumerate(f, 1):
      word, _, rest = line.rstrip("\n").partition(" ")
      if word not in wanted:
        continue
      vec = np.array(rest.split(" "), np.float32)
      if vec.shape != (dim,):
        raise ValueError(f"{path}:{line_no}: vector for {word!r} has {vec.shape[0]} values, "
                         f"model.word_dim is {dim}")
      for idx in wanted.pop(word):
        rows.setdefault(idx, vec)
  return rows, len(word2idx) - len(rows)


def load_glove(variables: dict, path: str, word2idx: Mapping[str, int]) -> dict:
  """Copies GloVe vectors into text_enc/embed; words it lacks keep their random init."""
  params = dict(variables["params"])
  text = dict(params["text_enc"])
  table = np.array(text["embed"]["embedding"])
  rows, missing = read_glove(path, word2idx, table.shape[1])
  for idx, vec in rows.items():
    table[idx] = vec
  logging.info("GloVe %s: %d/%d words found, %d missing", path, len(rows), len(word2idx), missing)
  text["embed"] = {"embedding": jnp.asarray(table)}
  params["text_enc"] = text
  return {**variables, "params": params}
