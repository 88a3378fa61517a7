"""Harness pieces the reference modules share (not the authors' code): their argparse
`opt` with a script's defaults, their train.py checkpoint file, and random inputs for
the timing functions. Module-level imports: torch, numpy and the standard library only."""
import argparse
import os

import numpy as np
import torch


def make_opt(defaults: dict, opt: dict, vocab_size: int = 0,
             script: str = "") -> argparse.Namespace:
  """Their `opt`: the script's argparse `defaults` updated with `opt`, plus `vocab_size`
  as train.py sets it after loading the vocabulary. Raises KeyError naming the options
  `script` ("SCAN train.py", ...) does not have."""
  unknown = sorted(set(opt) - set(defaults) - {"vocab_size"})
  if unknown:
    raise KeyError(f"not {script} options: {unknown}")
  ns = argparse.Namespace(**{**defaults, **opt})
  if vocab_size:
    ns.vocab_size = int(vocab_size)
  return ns


def save_checkpoint(path: str, model_state, opt, epoch: int, best_rsum: float,
                    eiters: int) -> None:
  """Writes `path` as their train.py's save_checkpoint does: `{"epoch", "model",
  "best_rsum", "opt", "Eiters"}` (its directory is created)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  torch.save({"epoch": epoch, "model": model_state, "best_rsum": best_rsum, "opt": opt,
              "Eiters": eiters}, path)


def load_checkpoint(path: str) -> dict:
  """A checkpoint `save_checkpoint` wrote (tensors and an argparse.Namespace `opt`)."""
  with torch.serialization.safe_globals([argparse.Namespace]):
    return torch.load(path, map_location="cpu", weights_only=True)


def unit_embeddings(rng: np.random.Generator, n_images: int, n_captions: int,
                    n_regions: int, embed_size: int, lengths: np.ndarray):
  """Random l2-normalised region (n_images, n_regions, d) and word (n_captions,
  max(lengths), d) embeddings, the words zero past each caption's length."""
  images = rng.standard_normal((n_images, n_regions, embed_size)).astype(np.float32)
  images /= np.linalg.norm(images, axis=-1, keepdims=True)
  captions = rng.standard_normal((n_captions, int(lengths.max()), embed_size)).astype(
      np.float32)
  captions /= np.linalg.norm(captions, axis=-1, keepdims=True)
  captions *= (np.arange(captions.shape[1])[None, :] < lengths[:, None])[..., None]
  return images, captions
