"""transformers' PyTorch BertModel, the reference for dsran_jax's BertEncoder."""
import numpy as np
import torch
import transformers

_PRETRAINED = {}  # model directory -> BertModel


def _last_hidden(model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=None if mask is None else torch.from_numpy(mask).long())
  return out.last_hidden_state.numpy()


def pretrained_last_hidden(model_dir, ids, mask=None):
  """`BertModel.from_pretrained(model_dir)` (eager attention, eval) last hidden states."""
  if model_dir not in _PRETRAINED:
    _PRETRAINED[model_dir] = transformers.BertModel.from_pretrained(
        model_dir, attn_implementation="eager").eval()
  return _last_hidden(_PRETRAINED[model_dir], ids, mask)


def tiny_random(config, variant, ids, masks):
  """A tiny BERT with every parameter ~ N(0, 0.3) (the default init has LayerNorm = (1, 0)
  and zero biases, which would hide a mis-mapping).

  Args:
    config: `transformers.BertConfig` kwargs.
    variant: "bert_prefix_heads" builds a BertForPreTraining (state dict with the `bert.`
      prefix plus pooler and cls.* heads; outputs from its `.bert`); else a BertModel.
    ids: int (batch, length) token ids.
    masks: attention masks (or None) to run `ids` with.

  Returns:
    {"state": the state dict as numpy, "outputs": last hidden states, one per mask}.
  """
  torch.manual_seed(0)
  prefix_heads = variant == "bert_prefix_heads"
  cls = transformers.BertForPreTraining if prefix_heads else transformers.BertModel
  full = cls(transformers.BertConfig(**config, attn_implementation="eager")).eval()
  with torch.no_grad():
    for p in full.parameters():
      p.normal_(0.0, 0.3)
  model = full.bert if prefix_heads else full
  state = {k: v.detach().numpy().copy() for k, v in full.state_dict().items()}
  return {"state": state, "outputs": [_last_hidden(model, ids, m) for m in masks]}


def tiny_random_state(config):
  """The state dict (numpy) of `tiny_random(config, "plain", ...)`'s BertModel."""
  return tiny_random(config, "plain", np.zeros((1, 1), np.int64), [])["state"]
