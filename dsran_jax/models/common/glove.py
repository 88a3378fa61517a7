"""GloVe initialisation of a word-embedding table from a local text file."""
from typing import Mapping, Optional

import jax.numpy as jnp
import numpy as np
from absl import logging

from dsran_jax.core.vocab import Vocabulary


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
  text["embed"] = {"embedding": jnp.asarray(table)}
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
