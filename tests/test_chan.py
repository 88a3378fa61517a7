"""CHAN family: parity with the authors' code (ppanzx/CHAN, run from tests/torchref/chan.py
in a torch-only process) through their checkpoint layout and the converter, the
training loss (warm-up and hardest negatives, their padded self-attention), every
coding x pooling of their SimsEncoder, recipes and hooks."""
import jax
import numpy as np
import pytest
from _vse_lineage import (IMG_DIM, TINY_BERT, WORDS, bad_image_keys_named, bert_cli_scores,
                          images, train_batch, train_step_case, validate_names_the_key,
                          vocab_captions, word_vocab, workdir_scores)

from dsran_jax import losses, models
from dsran_jax.convert.engine import ConversionError, load_checkpoint, opt_of
from dsran_jax.default_config import get_base_config, recipe_config
from dsran_jax.models.chan import config as chan_config
from dsran_jax.models.chan import model as chan_model
from dsran_jax.models.chan import params as chan_params
from dsran_jax.models.variables import init_variables
from dsran_jax.models.vse_infty import params as vse_params

TOL = 1e-4
# Their scripts/train.sh rows, at test widths.
GRU_OPT = dict(embed_size=16, word_dim=8, img_dim=IMG_DIM, data_name="f30k",
               text_enc_type="bigru", precomp_enc_type="selfattention",
               coding_type="VHACoding", pooling_type="LSEPooling", alpha=0.1, belta=0.1,
               margin=0.05, drop=True)
BERT_OPT = dict(GRU_OPT, text_enc_type="bert", precomp_enc_type="basic",
                pooling_type="MeanPooling")


# ------------------------------------------------------------ parity with the authors


def test_bigru_workdir_gives_their_similarity_matrix(torch_ref, tmp_path):
  """Their BiGRU build (2 GRU layers, fc + self-attention regions, VHACoding +
  LSEPooling) saved as train.py saves it -> convert_torch (detected, --vocab) ->
  inference.load: encode_images / encode_texts(texts) / score equals their evalrank
  sims (compute_sims over 2 x 2 shards); captions tokenised our way equal their ids."""
  from dsran_jax import inference  # pylint: disable=g-import-not-at-top
  from dsran_jax.tools import convert_torch  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  vocab_path, words, ids_of = word_vocab(tmp_path, rng)
  ckpt = str(tmp_path / "model_best.pth")
  torch_ref("chan.save_checkpoint", path=ckpt, opt=dict(GRU_OPT, num_layers=2),
            vocab_size=WORDS + 1, seed=1)
  raw = load_checkpoint(ckpt)
  assert chan_params.detect(raw) and not vse_params.detect(raw)
  assert convert_torch.detect_family(raw, ckpt) == "chan"
  summary = convert_torch.convert_checkpoint(ckpt, str(tmp_path / "wd"), vocab=vocab_path)
  assert summary["model"] == "chan" and summary["text_encoder"] == "bigru"
  assert summary["precomp_enc_type"] == "selfattention"
  assert (summary["coding_type"], summary["pooling_type"]) == ("VHACoding", "LSEPooling")
  texts, ids, lens = vocab_captions(rng, words, ids_of)
  # Their test images all have 36 regions: evaluation batches are never padded.
  regions, img_lens = images(rng, 5, 6)
  want = torch_ref("chan.sims", path=ckpt, images=regions, image_lengths=img_lens,
                   captions=ids, lengths=lens)
  matcher = inference.load(str(tmp_path / "wd"))
  assert matcher.config.model.chan.num_layers == 2
  assert matcher.config.train.margin == 0.05
  got = workdir_scores(matcher, texts, ids, lens, regions, img_lens)
  assert np.ptp(want) > 1.0
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_bert_cli_workdir_gives_their_similarity_matrix(torch_ref, minilm_dir, tmp_path):
  """Their BERT build (fc regions, VHACoding + MeanPooling) with a tiny random BERT ->
  the converter CLI with --bert_path -> inference.load: images of 2..5 regions (masks)
  and encode_texts(texts) with the MiniLM WordPiece tokenizer equal their evalrank
  sims."""
  ckpt = str(tmp_path / "model_best.pth")
  torch_ref("chan.save_checkpoint", path=ckpt, opt=BERT_OPT, bert=TINY_BERT, seed=2)
  summary, _, want, got = bert_cli_scores(torch_ref, "chan", ckpt, tmp_path, minilm_dir,
                                          [5, 2, 4])
  assert summary["model"] == "chan" and summary["text_encoder"] == "bert"
  assert summary["bert"]["num_heads"] == 2 and summary["pooling_type"] == "MeanPooling"
  assert np.ptp(want) > 0.05
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def _train_loss(scores_fn, variables, regions, img_lens, ids, lens, train_config, step):
  scores = scores_fn(variables, train_batch(regions, img_lens, ids, lens))
  return float(losses.training_loss(scores, train_config, step))


def _train_scores(model):
  """The jitted training call: (variables, batch) -> (B, B) scores."""
  return jax.jit(lambda v, b: model.apply(v, b, train=True, mutable=["batch_stats"],
                                          rngs={"dropout": jax.random.PRNGKey(0)})[0])


@pytest.mark.parametrize("build", ["bigru", "bert"])
def test_training_step_loss_equals_theirs(torch_ref, tmp_path, build):
  """Train mode on a batch of images with 2..6 regions padded to the longest (their
  collate): our loss equals their ContrastiveLoss(margin 0.05) on SimsEncoder's sims,
  with summed violations during the warm-up (`train.sum_violation_steps`) and hardest
  negatives after it. The BiGRU build's self-attention attends to their zero-padded
  regions; padding our batch wider changes nothing. BERT with dropout 0 on both sides."""
  ckpt, converted, model, case = train_step_case(torch_ref, tmp_path, "chan", build, GRU_OPT,
                                                 BERT_OPT)
  regions, img_lens, ids, lens = case["regions"], case["img_lens"], case["ids"], case["lens"]
  scores_fn = _train_scores(model)
  t = converted.config.train
  assert t.margin == 0.05
  t.max_violation, t.sum_violation_steps = True, 5
  for step, max_violation in ((4, False), (5, True)):
    want = torch_ref("chan.train_loss", path=ckpt, images=regions, image_lengths=img_lens,
                     captions=ids, lengths=lens, max_violation=max_violation, bert=case["bert"])
    got = _train_loss(scores_fn, converted.variables, regions, img_lens, ids, lens, t, step)
    assert want > 0.05
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  wide = np.concatenate([regions, np.full((6, 3, IMG_DIM), 7.0, np.float32)], 1)
  got_wide = _train_loss(scores_fn, converted.variables, wide, img_lens, ids, lens, t, 5)
  np.testing.assert_allclose(got_wide, got, rtol=1e-5)


def test_every_coding_and_pooling_equals_theirs(torch_ref):
  """`chan_scores` of every coding x pooling (their get_coding / get_pooling) on region
  and word embeddings with 2..5 regions and 1..6 words equals their SimsEncoder (unit
  vectors as their l2norms give, and unnormalised ones, where their MASK = -1 sentinel
  drops a word whose best similarity is below -1); a block of captions scores as the
  whole (map_caption_blocks). Their SoftmaxPooling is NaN for every pair with padding
  (0 * -inf): compared where it is finite."""
  rng = np.random.default_rng(0)
  img_lens, cap_lens = np.array([5, 2, 4, 3]), np.array([6, 1, 3, 5, 2])
  rmask = np.arange(5)[None] < img_lens[:, None]
  wmask = np.arange(6)[None] < cap_lens[:, None]
  for unit in (True, False):
    imgs = rng.standard_normal((4, 5, 8)).astype(np.float32)
    caps = rng.standard_normal((5, 6, 8)).astype(np.float32)
    if unit:
      imgs /= np.linalg.norm(imgs, axis=-1, keepdims=True)
      caps /= np.linalg.norm(caps, axis=-1, keepdims=True)
    imgs *= rmask[..., None]
    caps *= wmask[..., None]
    for coding in chan_config.CODING_TYPES:
      for pooling in chan_config.POOLING_TYPES:
        want = torch_ref("chan.coded", imgs=imgs, caps=caps, img_lens=img_lens,
                         cap_lens=cap_lens, coding_type=coding, pooling_type=pooling,
                         alpha=0.2, belta=0.5)
        kw = dict(coding_type=coding, pooling_type=pooling, alpha=0.2, belta=0.5)
        got = np.asarray(chan_model.chan_scores(imgs, rmask, caps, wmask, **kw))
        finite = np.isfinite(want)
        assert finite.all() or pooling == "SoftmaxPooling", (coding, pooling)
        assert finite.any()
        np.testing.assert_allclose(got[finite], want[finite], atol=1e-4, rtol=1e-5,
                                   err_msg=f"{coding} {pooling} unit={unit}")
        if not unit or pooling != "LSEPooling":
          continue
        blocked = chan_model.xattn.map_caption_blocks(
            lambda *a, kw=kw: chan_model.chan_scores(*a, **kw), imgs, rmask, caps, wmask,
            max_elements=4 * 5 * 6 * 2)
        np.testing.assert_allclose(blocked, got, atol=1e-6, err_msg=f"{coding} {pooling}")


def test_vha_lse_equation_in_numpy():
  """VHACoding + LSEPooling written out in numpy: s_ij = log sum_w exp(b_w / belta) over
  the real words w with b_w = max_r <v_r, u_w> over the real regions r, a word whose b_w
  is below -1 left out (their MASK = -1 fill and sentinel)."""
  rng = np.random.default_rng(1)
  regions = 2 * rng.standard_normal((3, 4, 6)).astype(np.float32)
  words = rng.standard_normal((2, 5, 6)).astype(np.float32)
  rm = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], bool)
  wm = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], bool)
  got = chan_model.chan_scores(regions, rm, words, wm, coding_type="VHACoding",
                               pooling_type="LSEPooling", alpha=0.1, belta=0.5)
  want = np.zeros((3, 2))
  dropped = 0
  for i in range(3):
    for j in range(2):
      best = (regions[i][rm[i]].astype(np.float64) @ words[j][wm[j]].T).max(0)
      dropped += int((best < -1).sum())
      best = best[best > -1]
      want[i, j] = np.log(np.exp(best / 0.5).sum())
  assert dropped > 0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_self_attention_counts_padding_as_repeated_keys():
  """RegionSelfAttention with `n_pad` copies of `pad_row` equals the same attention over
  a batch that holds those rows explicitly (numbers of copies 0, 1, 3)."""
  rng = np.random.default_rng(2)
  e, r = 16, 3
  x = rng.standard_normal((3, r, e)).astype(np.float32)
  pad_row = rng.standard_normal(e).astype(np.float32)
  n_pad = np.array([0.0, 1.0, 3.0], np.float32)
  m = chan_model.RegionSelfAttention(8)
  v = m.init(jax.random.PRNGKey(0), x, np.ones((3, r), bool), pad_row, n_pad)
  apply = jax.jit(m.apply)
  got = apply(v, x, np.ones((3, r), bool), pad_row, n_pad)
  # The copies written out: row i holds x_i, then n_i copies of pad_row, then masked rows.
  width = r + int(n_pad.max())
  full = np.zeros((3, width, e), np.float32)
  full[:, :r] = x
  full[:, r:] = pad_row
  mask = np.arange(width)[None] < (r + n_pad.astype(int))[:, None]
  want = apply(v, full, mask, pad_row, np.zeros(3, np.float32))
  np.testing.assert_allclose(got, want[:, :r], rtol=1e-5, atol=1e-5)
  alone = apply(v, x, np.ones((3, r), bool), pad_row, np.zeros(3, np.float32))
  assert np.abs(got[2] - alone[2]).max() > 1e-3  # the copies matter


# -------------------------------------------------------------------- converter, hooks


def test_converter_names_bad_layouts(torch_ref, tmp_path):
  """A renamed / reshaped key, a checkpoint whose opt has no coding, and a BERT-less
  checkpoint with the wrong text_enc_type are refused naming the key."""
  raw = bad_image_keys_named(
      torch_ref, tmp_path, "chan", "feedforward.attn.out_proj.weight",
      ("feedforward.ln.weight", "feedforward.lnorm.weight"),
      ("feedforward.lnorm.weight", "img_enc/feedforward/ln/scale",
       "img_enc.feedforward.attn.out_proj.weight"), opt=GRU_OPT, vocab_size=WORDS + 1)
  opt = opt_of(raw)
  for key, value, message in (("coding_type", None, "opt.coding_type is not set"),
                              ("text_enc_type", "bert", "opt.text_enc_type='bert'")):
    with pytest.raises(ConversionError, match=message):
      chan_params.convert({**raw, "opt": {**opt, key: value}}, {}, config=get_base_config())


def test_recipes_follow_train_sh():
  for dataset, captions in (("f30k", 145_000), ("coco", 566_435)):
    for text_encoder, batch in (("bert", 128), ("bigru", 384)):
      c = recipe_config(dataset, f"chan,text_encoder={text_encoder}")
      t, s = c.train, c.model.chan
      assert (t.optimizer, t.learning_rate, t.num_epochs, t.lr_update) == ("adamw", 5e-4, 25, 15)
      assert (t.batch_size, t.grad_clip, t.margin, t.max_violation) == (batch, 2.0, 0.05, True)
      assert t.sum_violation_steps == captions // batch  # --vse_mean_warmup_epochs=1
      assert t.weight_decay == (1e-4 if text_encoder == "bert" else 0.01)
      assert t.bert_lr_scale == (0.1 if text_encoder == "bert" else 1.0)
      assert s.coding_type == "VHACoding" and (s.alpha, s.belta) == (0.1, 0.1)
      assert s.pooling_type == ("MeanPooling" if text_encoder == "bert" else "LSEPooling")
      assert s.precomp_enc_type == ("basic" if text_encoder == "bert" else "selfattention")
      assert (s.region_drop, s.token_mask) == (0.2, 0.2)
      assert c.model.embed_size == 1024 and c.data.format == "precomp"
      assert c.eval.max_dev_images == 1000
      assert models.tokenizer_kind(c) == ("bert" if text_encoder == "bert" else "vocab")
      assert bool(models.departures(c)) == (text_encoder == "bigru")  # GloVe
  assert recipe_config("f30k", "chan").model.chan.text_encoder == "bert"


@pytest.mark.parametrize("key,value", [("text_encoder", "lstm"), ("region_drop", 1.0),
                                       ("precomp_enc_type", "transformer"),
                                       ("coding_type", "SCANCoding"), ("belta", 0.0)])
def test_validate_names_the_key(key, value):
  validate_names_the_key("chan", key, value)


def test_glove_fills_the_words_and_keeps_the_mask_row(tmp_path):
  """`load_pretrained` with model.glove_path (their --wemb_type=glove) replaces the rows
  of the words GloVe has (their stripped-form fallback included) and keeps `<mask>`."""
  from dsran_jax.core.vocab import Vocabulary  # pylint: disable=g-import-not-at-top
  c = get_base_config()
  c.model.name = "chan"
  c.model.embed_size, c.model.word_dim, c.model.img_dim = 8, 3, IMG_DIM
  words = ["<pad>", "<start>", "<end>", "<unk>", "dog", "t-shirt"]
  vocab = Vocabulary(words)
  (tmp_path / "g.txt").write_text("dog 1 2 3\ntshirt 4 5 6\n")
  c.model.glove_path = str(tmp_path / "g.txt")
  model = models.build_model(c.model, len(words))
  v = init_variables(model, jax.random.PRNGKey(0))
  got = models.load_pretrained(v, c, vocab)["params"]["txt_enc"]["embed"]
  np.testing.assert_array_equal(got["embedding"][4:], [[1, 2, 3], [4, 5, 6]])
  before = v["params"]["txt_enc"]["embed"]
  np.testing.assert_array_equal(got["embedding"][:4], before["embedding"][:4])
  np.testing.assert_array_equal(got["mask"], before["mask"])
  bound = (6.0 / (len(words) + 1 + 3)) ** 0.5  # xavier over their (V + 1, word_dim) table
  table = np.abs(np.concatenate([before["embedding"], before["mask"]]))
  assert 0.5 * bound < table.max() <= bound


def test_augmentation_hook_follows_their_loader():
  """The BiGRU build's training augmentation is their loader's (region dropout and
  token masking at 0.2, `<mask>` after the vocabulary)."""
  c = recipe_config("f30k", "chan,text_encoder=bigru")
  augment = models.train_augmentation(c, 20)
  assert (augment.region_rate, augment.token_rate, augment.kind) == (0.2, 0.2, "bigru")
  assert augment.vocab_size == 20
  c.model.chan.region_drop = c.model.chan.token_mask = 0.0
  assert models.train_augmentation(c, 20) is None
