"""Contracts every layer above relies on: batch keys and shapes (`batch`), the word
vocabulary (`vocab`) and how a family batches captions at inference (`text_policy`).
Nothing here imports another part of dsran_jax."""
