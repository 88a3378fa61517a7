"""Test pieces shared by the VSE∞-lineage families' tests (test_vse_infty.py,
test_chan.py, test_hrem.py): their tiny checkpoints' widths, random inputs in their
layout, a BERT directory, the converter CLI, and the checks of a converted workdir
against their similarity matrix."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dsran_jax import models
from dsran_jax.convert.engine import ConversionError, load_checkpoint
from dsran_jax.default_config import get_base_config

IMG_DIM = 12
WORDS = 26  # BiGRU vocabulary words; the embedding has one more row (<mask>)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A tiny random BERT over the MiniLM WordPiece vocabulary.
TINY_BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=48, max_position_embeddings=64)
NO_DROPOUT = dict(TINY_BERT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
BERT_TEXTS = ["A dog runs on the grass.", "two men, playing frisbee", "unbelievably",
              "a cat sits on the mat next to a child's bicycle"]


def images(rng, n, r, lengths=None):
  """(n, r, IMG_DIM) regions, zero past each image's length, and the lengths."""
  lengths = np.full(n, r) if lengths is None else np.asarray(lengths)
  x = rng.standard_normal((n, r, IMG_DIM)).astype(np.float32)
  x *= (np.arange(r)[None] < lengths[:, None])[..., None]
  return x, lengths


def word_vocab(tmp_path, rng):
  """Their SCAN-style vocabulary JSON (ids in dict order, not sorted) and its words."""
  words = [f"w{i}" for i in range(WORDS - 4)]
  ids_of = dict(zip(["<pad>", "<start>", "<end>", "<unk>"], range(4)))
  ids_of.update({w: int(i) for w, i in zip(words, 4 + rng.permutation(len(words)))})
  path = tmp_path / "f30k_precomp_vocab.json"
  path.write_text(json.dumps({"word2idx": ids_of, "idx": len(ids_of),
                              "idx2word": {str(i): w for w, i in ids_of.items()}}))
  return str(path), words, ids_of


def vocab_captions(rng, words, ids_of):
  """Seven captions of the vocabulary's words (one with an unknown word) and their ids
  as their loader writes them (<start> ... <end>, unknown as <unk>, 0-padded):
  `(texts, ids, lengths)`."""
  texts = [" ".join(rng.choice(words, n)) for n in (5, 1, 3, 9, 4, 2, 7)]
  texts[2] += " zebra"  # unknown: <unk>
  rows = [[1] + [ids_of.get(w, 3) for w in t.split()] + [2] for t in texts]
  lens = np.array([len(r) for r in rows])
  ids = np.zeros((len(rows), lens.max()), np.int64)
  for j, row in enumerate(rows):
    ids[j, :len(row)] = row
  return texts, ids, lens


def random_ids(rng, lengths, high, low=1, width=None):
  """(B, width) int64 ids drawn in [low, high), 0 past each caption's length."""
  ids = np.zeros((len(lengths), width or int(max(lengths))), np.int64)
  for j, n in enumerate(lengths):
    ids[j, :n] = rng.integers(low, high, n)
  return ids


def bert_dir(tmp_path, minilm_dir, bert=TINY_BERT):
  """A BERT directory: MiniLM's WordPiece files and the tiny model's config.json."""
  d = tmp_path / "bert"
  d.mkdir(exist_ok=True)
  for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(os.path.join(minilm_dir, name), d / name)
  (d / "config.json").write_text(json.dumps({**bert, "model_type": "bert",
                                             "hidden_act": "gelu"}))
  return str(d)


def convert_cli(ckpt, workdir, **flags):
  """`python -m dsran_jax.tools.convert_torch` as a user runs it; its JSON summary."""
  args = [sys.executable, "-m", "dsran_jax.tools.convert_torch", f"--checkpoint={ckpt}",
          f"--workdir={workdir}"] + [f"--{k}={v}" for k, v in flags.items()]
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(args, check=False, capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def workdir_scores(matcher, texts, ids, lens, regions, img_lens):
  """The (images, texts) scores a loaded workdir (`inference.load`) gives images of
  `img_lens` regions and `texts`, after checking that it tokenises `texts` as their
  `ids` (0-padded to `lens.max()`)."""
  np.testing.assert_array_equal(matcher.tokenize(texts)[0][:, :lens.max()], ids)
  mask = np.arange(regions.shape[1])[None] < np.asarray(img_lens)[:, None]
  return matcher.score(matcher.encode_images(regions=regions, region_mask=mask),
                       matcher.encode_texts(texts))


def bert_cli_scores(torch_ref, family, ckpt, tmp_path, minilm_dir, img_lens):
  """Their BERT-build checkpoint `ckpt` (the tiny BERT) -> the converter CLI with
  --bert_path (a BERT directory of it) -> `inference.load`: `(summary, matcher, their
  evalrank sims, ours)` on `BERT_TEXTS` (tokenised their way, which must equal ours) and
  three images of `img_lens` (<= 5) regions."""
  from dsran_jax import inference  # pylint: disable=g-import-not-at-top
  bert_path = bert_dir(tmp_path, minilm_dir)
  summary = convert_cli(ckpt, str(tmp_path / "wd"), bert_path=bert_path)
  ids, lens = torch_ref("vse_infty.bert_tokenize", bert_dir=bert_path, texts=BERT_TEXTS)
  regions, img_lens = images(np.random.default_rng(4), 3, 5, img_lens)
  want = torch_ref(f"{family}.sims", path=ckpt, images=regions, image_lengths=img_lens,
                   captions=ids, lengths=lens, bert=TINY_BERT)
  matcher = inference.load(str(tmp_path / "wd"))
  return summary, matcher, want, workdir_scores(matcher, BERT_TEXTS, ids, lens, regions,
                                                img_lens)


def bad_image_keys_named(torch_ref, tmp_path, family, reshaped, renamed, named,
                         options=None, **save):
  """Their `family` checkpoint (`save`: `save_checkpoint`'s options) with image-encoder
  key `reshaped` cut to 5 columns and `renamed` = (key, new key): its converter's
  ConversionError names each of `named`. Returns the intact checkpoint."""
  ckpt = str(tmp_path / "model_best.pth")
  torch_ref(f"{family}.save_checkpoint", path=ckpt, seed=1, **save)
  raw = load_checkpoint(ckpt)
  img = dict(raw["model"][0])
  img[reshaped] = img[reshaped][:, :5]
  img[renamed[1]] = img.pop(renamed[0])
  with pytest.raises(ConversionError) as e:
    models.family_params(family).convert({**raw, "model": [img] + raw["model"][1:]},
                                         options or {}, config=get_base_config())
  for part in named:
    assert part in str(e.value)
  return raw


def validate_names_the_key(family, key, value):
  """The family's `validate` refuses `config.model.<family>.<key> = value` naming the
  key."""
  c = get_base_config()
  c.model.name = family
  c.model[family][key] = value
  with pytest.raises(ValueError, match=f"{family}.{key}"):
    models.family_config(family).validate(c)


def train_batch(regions, img_lens, ids, lens):
  """Our training batch of their padded inputs (masks from the lengths)."""
  return {"regions": regions,
          "region_mask": np.arange(regions.shape[1])[None] < img_lens[:, None],
          "input_ids": ids.astype(np.int32),
          "attention_mask": (np.arange(ids.shape[1])[None] < lens[:, None]).astype(np.int32)}


def train_step_case(torch_ref, tmp_path, family, build, opt, bert_opt=None):
  """The training-step comparison's inputs: their `family` checkpoint of `build`
  ("bert": the tiny BERT without dropout, `bert_opt`; "bigru": `opt`), converted, our
  model of it (BERT dropout 0 too), and a batch of 6 images of 2..6 regions and
  captions of 2..7 tokens: `(ckpt, converted, model, batch)`, `batch` holding their
  `regions, img_lens, ids, lens` and `bert` (what their `train_loss` takes)."""
  rng = np.random.default_rng(8)
  ckpt = str(tmp_path / "model_best.pth")
  if build == "bert":
    torch_ref(f"{family}.save_checkpoint", path=ckpt, opt=bert_opt or opt, bert=NO_DROPOUT,
              seed=6)
  else:
    torch_ref(f"{family}.save_checkpoint", path=ckpt, opt=opt, vocab_size=WORDS + 1, seed=6)
  converted = models.family_params(family).convert(load_checkpoint(ckpt), {"bert_heads": 2},
                                                   config=get_base_config())
  model = models.build_model(converted.config.model, converted.config.model.vocab_size or None)
  if build == "bert":
    model = without_bert_dropout(model)
  regions, img_lens = images(rng, 6, 6, [6, 2, 4, 5, 3, 6])
  lens = np.array([7, 3, 5, 6, 4, 2])
  ids = random_ids(rng, lens, 30522 if build == "bert" else WORDS)
  batch = dict(regions=regions, img_lens=img_lens, ids=ids, lens=lens,
               bert=NO_DROPOUT if build == "bert" else None)
  return ckpt, converted, model, batch


def without_bert_dropout(model):
  """`model` (a BERT build) with its BERT's dropout 0, to compare a train step with
  theirs (dropout draws cannot match)."""
  cfg = model.config
  return type(model)(dataclasses.replace(cfg, bert=dataclasses.replace(cfg.bert, dropout=0.0)))
