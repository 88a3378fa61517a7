"""VSE∞ family: parity with the authors' code (woodfrog/vse_infty, run from
tests/torchref/vse_infty.py in a torch-only process) through their checkpoint layout and
the converter CLI, the training loss (warm-up and hardest negatives) and BatchNorm step,
their augmentation rates, AdamW, recipes and hooks."""
import json

import jax
import numpy as np
import optax
import pytest
from _vse_lineage import (IMG_DIM, TINY_BERT, WORDS, bad_image_keys_named, bert_cli_scores,
                          images, train_batch, train_step_case, validate_names_the_key,
                          vocab_captions, word_vocab, workdir_scores)

from dsran_jax import losses, models, optim
from dsran_jax.convert.engine import ConversionError, load_checkpoint
from dsran_jax.default_config import get_base_config, recipe_config
from dsran_jax.models.common import gpo
from dsran_jax.models.common import vse_augment as aug
from dsran_jax.models.variables import init_variables
from dsran_jax.models.vse_infty import params as vse_params
from dsran_jax.models.vse_infty.model import MaskedWordEmbedding
from dsran_jax.workdir import embedding_rows

TOL = 1e-4
OPT = dict(embed_size=16, word_dim=8, img_dim=IMG_DIM, data_name="f30k")


# ------------------------------------------------------------ parity with the authors


@pytest.fixture(scope="module")
def bigru_run(torch_ref, tmp_path_factory):
  """A BiGRU checkpoint (2 GRU layers) of theirs, its vocabulary, converted in-process."""
  from dsran_jax.tools import convert_torch  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp("bigru")
  rng = np.random.default_rng(5)
  vocab_path, words, ids_of = word_vocab(tmp, rng)
  ckpt = str(tmp / "model_best.pth")
  torch_ref("vse_infty.save_checkpoint", path=ckpt, opt=dict(OPT, num_layers=2),
            vocab_size=WORDS + 1, seed=1)
  summary = convert_torch.convert_checkpoint(ckpt, str(tmp / "wd"), vocab=vocab_path)
  return ckpt, str(tmp / "wd"), words, ids_of, summary


def test_bigru_workdir_gives_their_similarity_matrix(torch_ref, bigru_run):
  """Their BiGRU build -> convert -> inference.load: encode_images (regions and their
  masks, images of 2..6 regions) / encode_texts(texts) / score equals their evalrank
  sims; captions tokenised our way equal their ids."""
  from dsran_jax import inference  # pylint: disable=g-import-not-at-top
  ckpt, workdir, words, ids_of, summary = bigru_run
  assert summary["model"] == "vse_infty" and summary["text_encoder"] == "bigru"
  assert summary["vocab_size"] == WORDS and summary["vocab_json"]
  rng = np.random.default_rng(3)
  texts, ids, lens = vocab_captions(rng, words, ids_of)
  regions, img_lens = images(rng, 5, 6, [6, 2, 4, 6, 3])
  want = torch_ref("vse_infty.sims", path=ckpt, images=regions, image_lengths=img_lens,
                   captions=ids, lengths=lens)
  matcher = inference.load(workdir)
  assert matcher.config.model.vse_infty.num_layers == 2
  got = workdir_scores(matcher, texts, ids, lens, regions, img_lens)
  assert np.abs(want).max() > 0.05
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_bert_cli_workdir_gives_their_similarity_matrix(torch_ref, minilm_dir, tmp_path):
  """Their BERT build (keys under DataParallel's `module.`) with a tiny random BERT ->
  the converter CLI with --bert_path -> inference.load: encode_texts(texts) (the MiniLM
  WordPiece tokenizer) and encode_images equal their evalrank sims; their tokenisation
  (BasicTokenizer + WordPiece, [CLS] ... [SEP]) equals ours."""
  ckpt = str(tmp_path / "model_best.pth")
  torch_ref("vse_infty.save_checkpoint", path=ckpt, opt=OPT, bert=TINY_BERT, seed=2)
  raw = load_checkpoint(ckpt)
  assert all(k.startswith("module.") for k in raw["model"][1])
  assert vse_params.detect(raw)
  summary, _, want, got = bert_cli_scores(torch_ref, "vse_infty", ckpt, tmp_path, minilm_dir,
                                          [5, 3, 4])
  assert summary["model"] == "vse_infty" and summary["text_encoder"] == "bert"
  assert summary["bert"]["num_heads"] == 2
  assert np.abs(want).max() > 0.05
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def _train_loss(model, variables, regions, img_lens, ids, lens, train_config, step):
  batch = train_batch(regions, img_lens, ids, lens)
  scores, updates = model.apply(variables, batch, train=True, mutable=["batch_stats"],
                                rngs={"dropout": jax.random.PRNGKey(0)})
  loss = losses.training_loss(scores, train_config, step)
  return float(loss), updates["batch_stats"]["img_enc"]["mlp"]["bn_0"]


@pytest.mark.parametrize("build", ["bigru", "bert"])
def test_training_step_loss_and_batchnorm_equal_theirs(torch_ref, tmp_path, build):
  """Train mode on a padded batch (images of 2..6 regions padded to the longest, their
  collate): our loss equals their ContrastiveLoss with summed violations during the
  warm-up (`train.sum_violation_steps`) and with hardest negatives after it, and the MLP's
  BatchNorm running stats after the step equal theirs (their statistics count the padded
  rows). BERT with dropout 0 on both sides (dropout draws cannot match)."""
  ckpt, converted, model, case = train_step_case(torch_ref, tmp_path, "vse_infty", build, OPT)
  regions, img_lens, ids, lens = case["regions"], case["img_lens"], case["ids"], case["lens"]
  t = get_base_config().train
  t.margin, t.max_violation, t.sum_violation_steps = 0.2, True, 5
  for step, max_violation in ((4, False), (5, True)):
    want = torch_ref("vse_infty.train_loss", path=ckpt, images=regions, image_lengths=img_lens,
                     captions=ids, lengths=lens, max_violation=max_violation, bert=case["bert"])
    got, stats = _train_loss(model, converted.variables, regions, img_lens, ids, lens, t, step)
    assert want["loss"] > 0.1
    np.testing.assert_allclose(got, want["loss"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["mean"], want["running_mean"], atol=1e-5)
    np.testing.assert_allclose(stats["var"], want["running_var"], rtol=1e-5, atol=1e-5)
  # Padding our batch wider than theirs changes nothing (the rows are counted their way).
  wide = np.concatenate([regions, np.zeros((6, 3, IMG_DIM), np.float32)], 1)
  got_wide, _ = _train_loss(model, converted.variables, wide, img_lens, ids, lens, t, 5)
  np.testing.assert_allclose(got_wide, got, rtol=1e-5)


def test_converter_names_bad_layouts(torch_ref, tmp_path):
  """A BERT checkpoint with --vocab, and a renamed / reshaped key, are refused naming the
  key."""
  raw = bad_image_keys_named(
      torch_ref, tmp_path, "vse_infty", "mlp.layers.1.weight",
      ("gpool.linear.weight", "gpool.lin.weight"),
      ("gpool.lin.weight", "img_enc/gpool/linear/kernel", "img_enc.mlp.layers.1.weight"),
      opt=OPT, vocab_size=WORDS + 1)
  words = ["<pad>", "<start>", "<end>", "<unk>", "a", "b"]
  vocab_path = tmp_path / "v.json"
  vocab_path.write_text(json.dumps({"word2idx": {w: i for i, w in enumerate(words)}, "idx": 6,
                                    "idx2word": {str(i): w for i, w in enumerate(words)}}))
  with pytest.raises(ConversionError, match="has 6 words"):
    vse_params.convert(raw, {"vocab": str(vocab_path)}, config=get_base_config())


# ------------------------------------------------------------------------- GPO, masks


def test_gpo_weights_depend_on_the_count_and_features_are_sorted():
  """Scattered real items equal the same items packed to the front (the weights depend on
  the count, the features are sorted), and one item gives that item."""
  m = gpo.GPO()
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 6, 4)).astype(np.float32)
  mask = np.array([[1, 0, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]], bool)
  v = m.init(jax.random.PRNGKey(0), x, mask)
  packed = np.zeros_like(x)
  packed[0, :3], packed[1, :1] = x[0, [0, 2, 3]], x[1, [0]]
  got, w = m.apply(v, x, mask)
  want, _ = m.apply(v, packed, np.arange(6)[None] < np.array([[3], [1]]))
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got[1], x[1, 0], atol=1e-6)
  np.testing.assert_allclose(np.asarray(w)[0, 3:], 0.0, atol=1e-12)


# ------------------------------------------------------------------ augmentation rates


def _binomial_ok(count, n, p, z=5.0):
  return abs(count - n * p) <= z * np.sqrt(n * p * (1 - p))


def test_region_dropout_follows_their_rate_and_order():
  """Each real region survives with probability 0.8 (their `rand > 0.20`), survivors keep
  their order at the front, padding stays out."""
  rng = np.random.default_rng(0)
  b, r = 400, 36
  regions = np.tile(np.arange(r, dtype=np.float32)[None, :, None] + 1, (b, 1, 3))
  lens = rng.integers(10, r + 1, b)
  mask = np.arange(r)[None] < lens[:, None]
  regions *= mask[..., None]
  out, new_mask = aug.drop_regions(regions, mask.astype(np.int32), 0.2, rng)
  kept = new_mask.sum()
  assert _binomial_ok(kept, mask.sum(), 0.8)
  for i in range(b):
    k = int(new_mask[i].sum())
    assert new_mask[i, :k].all() and not new_mask[i, k:].any()
    seq = out[i, :k, 0]
    assert np.all(np.diff(seq) > 0) and seq.max() <= lens[i] and not out[i, k:].any()


def test_bert_token_masking_follows_their_rates(minilm_dir):
  """Per word (a piece and its ## continuations): 20% picked; of those 1/2 -> [MASK]
  (every piece), 1/10 -> random pieces, 2/5 deleted; [CLS] / [SEP] untouched."""
  vocab = aug.wordpiece_vocabulary(minilm_dir)
  a = aug.Augmentation(0.0, 0.2, {"kind": "bert", "vocab": vocab})
  cls, sep, mask_id = vocab["[CLS]"], vocab["[SEP]"], vocab["[MASK]"]
  word = [vocab["play"], vocab["##ing"]]  # one word of two pieces
  n_words, width = 8, 2 + 16
  row = [cls] + word * n_words + [sep]
  ids = np.zeros((3000, width + 2), np.int32)
  ids[:, :len(row)] = row
  att = (ids != 0).astype(np.int32)
  out = a({"input_ids": ids, "attention_mask": att}, np.random.default_rng(1))
  n = ids.shape[0] * n_words
  masked = random = deleted = 0
  for r_ids, r_mask in zip(out["input_ids"], out["attention_mask"]):
    toks = list(r_ids[r_mask.astype(bool)])
    assert toks[0] == cls and toks[-1] == sep and (len(toks) - 2) % 2 == 0
    deleted += n_words - (len(toks) - 2) // 2
    for p in range(1, len(toks) - 1, 2):
      pair = toks[p:p + 2]
      if pair == [mask_id, mask_id]:
        masked += 1
      elif pair != word:
        random += 1
  assert _binomial_ok(masked, n, 0.1) and _binomial_ok(random, n, 0.02, z=6)
  assert _binomial_ok(deleted, n, 0.08)


def test_bigru_token_masking_follows_their_rates():
  """Per token, <start>/<end> included: 10% -> <mask> (id = words), 2% random ids in
  [0, words + 1), 8% deleted."""
  words = 50
  a = aug.Augmentation(0.0, 0.2, {"kind": "bigru", "vocab_size": words})
  ids = np.zeros((3000, 12), np.int32)
  ids[:, :10] = [1] + [7] * 8 + [2]
  out = a({"input_ids": ids, "attention_mask": (ids != 0).astype(np.int32)},
          np.random.default_rng(2))
  kept = out["attention_mask"].astype(bool)
  n = 3000 * 10
  toks = out["input_ids"][kept]
  assert _binomial_ok(n - kept.sum(), n, 0.08)
  assert _binomial_ok((toks == words).sum(), n, 0.1, z=6)
  assert toks.max() <= words and out["input_ids"][~kept].max() == 0


def test_training_pipeline_applies_the_family_augmentation():
  """`models.train_augmentation` of the demo config drops regions at 0.2 and masks
  tokens; with both rates 0 there is none."""
  c = recipe_config("f30k", "vse_infty,text_encoder=bigru")
  augment = models.train_augmentation(c, 100)
  assert isinstance(augment, aug.Augmentation) and augment.region_rate == 0.2
  c.model.vse_infty.region_drop = c.model.vse_infty.token_mask = 0.0
  assert models.train_augmentation(c, 100) is None


# --------------------------------------------------------------------- optimiser, recipes


def test_adamw_with_bert_factor_and_global_clip_equals_torch(torch_ref):
  """optim.make_optimizer('adamw', bert_lr_scale 0.1, clip 2.0) on a BERT and a non-BERT
  leaf equals torch.optim.AdamW with their two groups after clip_grad_norm_ over both."""
  t = get_base_config().train
  t.optimizer, t.weight_decay, t.bert_lr_scale, t.grad_clip = "adamw", 1e-4, 0.1, 2.0
  t.warmup = 0.0
  lr = 5e-4
  tx = optim.make_optimizer(t, lambda step: lr)
  rng = np.random.default_rng(0)
  params = {"txt_enc": {"bert": {"w": rng.standard_normal((3, 2)).astype(np.float32)},
                        "linear": {"w": rng.standard_normal(4).astype(np.float32)}}}
  grads = [jax.tree_util.tree_map(lambda p: 3 * rng.standard_normal(p.shape).astype(np.float32),
                                  params) for _ in range(3)]
  state, p = tx.init(params), params
  for g in grads:
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
  want = torch_ref("vse_infty.adamw_steps", bert=params["txt_enc"]["bert"]["w"],
                   rest=params["txt_enc"]["linear"]["w"],
                   grads=[(g["txt_enc"]["bert"]["w"], g["txt_enc"]["linear"]["w"]) for g in grads],
                   lr=lr, weight_decay=1e-4, bert_factor=0.1, clip=2.0)
  np.testing.assert_allclose(p["txt_enc"]["bert"]["w"], want[0], atol=1e-6)
  np.testing.assert_allclose(p["txt_enc"]["linear"]["w"], want[1], atol=1e-6)


def test_recipes_follow_train_region_sh():
  for dataset, steps in (("f30k", 1132), ("coco", 4425)):
    for text_encoder in ("bert", "bigru"):
      c = recipe_config(dataset, f"vse_infty,text_encoder={text_encoder}")
      t = c.train
      assert (t.optimizer, t.learning_rate, t.num_epochs, t.lr_update) == ("adamw", 5e-4, 25, 15)
      assert (t.batch_size, t.grad_clip, t.margin, t.max_violation) == (128, 2.0, 0.2, True)
      assert t.sum_violation_steps == steps  # one epoch of --vse_mean_warmup_epochs
      assert t.weight_decay == (1e-4 if text_encoder == "bert" else 0.01)
      assert t.bert_lr_scale == (0.1 if text_encoder == "bert" else 1.0)
      assert c.model.embed_size == 1024 and c.data.format == "precomp"
      assert models.tokenizer_kind(c) == ("bert" if text_encoder == "bert" else "vocab")


@pytest.mark.parametrize("key,value", [("text_encoder", "lstm"), ("region_drop", 1.0),
                                       ("precomp_enc_type", "weight_norm"), ("num_layers", 0)])
def test_validate_names_the_key(key, value):
  validate_names_the_key("vse_infty", key, value)


def test_word_table_has_the_vocabulary_rows():
  """The BiGRU build's word table has the vocabulary's rows (what `Workdir.restore` reads
  the vocabulary size from) and their `<mask>` (id = words) is a row of its own."""
  c = get_base_config()
  c.model.name, c.model.vse_infty.text_encoder = "vse_infty", "bigru"
  c.model.embed_size, c.model.word_dim, c.model.img_dim = 8, 4, IMG_DIM
  model = models.build_model(c.model, 30)
  v = init_variables(model, jax.random.PRNGKey(0))
  assert embedding_rows(v) == 30
  embed = v["params"]["txt_enc"]["embed"]
  assert embed["embedding"].shape == (30, 4) and embed["mask"].shape == (1, 4)
  got = MaskedWordEmbedding(30, 4).apply({"params": embed}, np.array([[30, 3]]))
  np.testing.assert_array_equal(got[0, 0], embed["mask"][0])
  np.testing.assert_array_equal(got[0, 1], embed["embedding"][3])


def test_training_pipeline_replays_the_augmented_batches():
  """`pipeline.train_batches(augment=...)` applies the family's augmentation to every
  batch with a generator of (seed, step, host): a run resumed at step 3 gets the batch
  the uninterrupted run got, region masks included."""
  from dsran_jax.data import base, pipeline  # pylint: disable=g-import-not-at-top
  n_img, r = 12, 10

  def read_images(idx):
    f = np.asarray(idx, np.float32)[:, None, None] + 1
    return {"regions": np.broadcast_to(f, (len(idx), r, 4)).copy(),
            "region_mask": np.ones((len(idx), r), bool)}

  n_cap = n_img * 5
  ids = np.tile(np.arange(1, 9, dtype=np.int32), (n_cap, 1))
  split = base.Split(name="train", image_ids=[str(i) for i in range(n_img)],
                     texts=["x"] * n_cap, input_ids=ids,
                     attention_mask=np.ones_like(ids), captions_per_image=5,
                     read_images=read_images)
  c = recipe_config("f30k", "vse_infty,text_encoder=bigru")
  c.train.batch_size, c.data.prefetch = 8, 1
  augment = models.train_augmentation(c, 20)
  kw = {"process_index": 0, "process_count": 1, "augment": augment}
  with pipeline.train_batches(split, c, **kw) as it:
    run = [next(it) for _ in range(4)]
  with pipeline.train_batches(split, c, start_step=3, **kw) as it:
    resumed = next(it)
  for key in ("regions", "region_mask", "input_ids", "attention_mask"):
    np.testing.assert_array_equal(resumed[key], run[3][key])
  masks = np.concatenate([b["region_mask"] for b in run])
  assert 0 < masks.mean() < 1 and masks.dtype == bool
  assert any((b["attention_mask"] == 0).any() or (b["input_ids"] == 20).any() for b in run)
