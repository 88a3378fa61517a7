"""A family's options, declared once (jax-free, as every `config.py`).

A family lists its options as a table of `Option(name, default, rule, doc)`:

    OPTIONS = Options("scan", [
        Option("cross_attn", "t2i", one_of("t2i", "i2t"), "words attend to regions | ..."),
        Option("lambda_softmax", 9.0, greater_than(0), "attention softmax temperature"),
        ...
    ])

and everything else is derived from it:
- `OPTIONS.defaults()`: the `config.model.<section>` ConfigDict (key names, defaults and
  their types, in table order);
- `OPTIONS.validate(config.model)`: raises ValueError naming the first key out of range,
  e.g. `config.model.scan.cross_attn='x': expected one of 't2i', 'i2t'`;
- `OPTIONS.values(config.model)`: {name: value cast to its default's type} of the
  Module's options;
- `OPTIONS.dataclass(name, head, tail)`: the frozen (hashable) dataclass of the Flax
  Module's config, whose fields are `head` (shared widths such as `WIDTHS`), the options
  and `tail`, and which checks its option values with the same rules when built;
  `OPTIONS.module_config(cls, model_config, vocab_size)` builds one from `config.model`.

An option with `field=False` is a config key only: it is in the section, its defaults
and its checks, but not a field of the Module's config (the family's hooks read it, e.g.
DSRAN's `bert_path`). A dotted name ("bert.hidden_size") is a key of a sub-section
(`config.model.dsran.bert.hidden_size`) and is always config-only.

A rule is a function `value -> None | str`: None when the value is allowed, else what is
allowed ("must be > 0"); the helpers below cover the usual ones.
"""
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import ml_collections

Rule = Callable[[Any], Optional[str]]


# ----------------------------------------------------------------------------- rules


def one_of(*values) -> Rule:
  """The value is one of `values`."""
  shown = ", ".join(repr(v) for v in values)

  def rule(value):
    return None if value in values else f"expected one of {shown}"
  rule.values = values
  return rule


def greater_than(bound) -> Rule:
  """value > bound."""
  return lambda value: None if value > bound else f"must be > {bound}"


def at_least(bound, note: str = "") -> Rule:
  """value >= bound (`note` is appended to the message, e.g. " (0: off)")."""
  return lambda value: None if value >= bound else f"must be >= {bound}{note}"


def integer_at_least(bound) -> Rule:
  """An integer >= bound."""
  return lambda value: (None if int(value) == value and value >= bound
                        else f"must be an integer >= {bound}")


def within(low, high, high_open: bool = False) -> Rule:
  """low <= value <= high (value < high with `high_open`)."""
  closing = ")" if high_open else "]"

  def rule(value):
    ok = low <= value < high if high_open else low <= value <= high
    return None if ok else f"must be in [{low}, {high}{closing}"
  return rule


def exactly(expected, why: str) -> Rule:
  """value == expected (`why` says why no other value is supported)."""
  return lambda value: None if value == expected else why


# --------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class Option:
  """One option: its key under `config.model.<section>` (dotted: a sub-section's key), its
  default (whose type is the option's type), its rule (None: any value of the type), a
  line of documentation, and whether it is a field of the Module's config (`field`)."""
  name: str
  default: Any
  rule: Optional[Rule] = None
  doc: str = ""
  field: bool = True

  @property
  def kind(self) -> type:
    return type(self.default)

  def problem(self, value) -> Optional[str]:
    return self.rule(value) if self.rule is not None else None


# The widths every word-id family shares (top-level `config.model.*` keys): the Module
# config's head fields, `(name, type, default)`; vocab_size has no default.
WIDTHS: Tuple[Tuple[Any, ...], ...] = (
    ("vocab_size", int), ("embed_size", int, 1024), ("word_dim", int, 300),
    ("img_dim", int, 2048))


def widths_from(model_config, vocab_size: Optional[int] = None) -> Dict[str, int]:
  """The `WIDTHS` of `config.model` (`vocab_size`: the word vocabulary's, if given)."""
  m = model_config
  return {"vocab_size": int(vocab_size or m.vocab_size), "embed_size": int(m.embed_size),
          "word_dim": int(m.word_dim), "img_dim": int(m.img_dim)}


class Options:
  """A family's option table (see the module docstring).

  Args:
    section: the key under `config.model` holding the options (None: they would be
      top-level `config.model.*` keys; every family has its section).
    options: the table, in the order `defaults()` writes the keys.
  """

  def __init__(self, section: Optional[str], options: Sequence[Option]):
    self.section = section
    self.options = tuple(options)
    names = [o.name for o in self.options]
    if len(set(names)) != len(names):
      raise ValueError(f"options of {section!r} declared twice: "
                       f"{sorted({n for n in names if names.count(n) > 1})}")
    nested = [o.name for o in self.options if "." in o.name and o.field]
    if nested:
      raise ValueError(f"options {nested} of {section!r} are keys of a sub-section: "
                       f"declare them with field=False")
    clash = sorted({n.split(".")[0] for n in names if "." in n} & set(names))
    if clash:
      raise ValueError(f"options {clash} of {section!r} are both a key and a sub-section")
    self.by_name = {o.name: o for o in self.options}

  @property
  def names(self) -> Tuple[str, ...]:
    return tuple(self.by_name)

  @property
  def keys(self) -> Tuple[str, ...]:
    """The section's own keys (a sub-section counted once), in table order."""
    return tuple(dict.fromkeys(n.split(".")[0] for n in self.by_name))

  @property
  def fields(self) -> Tuple[Option, ...]:
    """The options that are fields of the Module's config (`Option.field`)."""
    return tuple(o for o in self.options if o.field)

  def __getitem__(self, name: str) -> Option:
    return self.by_name[name]

  def key(self, name: str) -> str:
    """The option's full config key: `config.model.<section>.<name>`."""
    return f"config.model.{self.section}.{name}" if self.section else f"config.model.{name}"

  def section_of(self, model_config):
    """The ConfigDict (or mapping) holding the options in `config.model`."""
    return model_config[self.section] if self.section else model_config

  # ------------------------------------------------------------------- config side

  def defaults(self) -> ml_collections.ConfigDict:
    """The `config.model.<section>` ConfigDict of every option at its default."""
    s = ml_collections.ConfigDict()
    for o in self.options:
      *parents, leaf = o.name.split(".")
      node = s
      for p in parents:
        if p not in node:
          node[p] = ml_collections.ConfigDict()
        node = node[p]
      node[leaf] = o.default
    return s

  @staticmethod
  def get(values, name: str):
    """The value of option `name` (dotted: in a sub-section) in `values`, a mapping or an
    object with the options as attributes."""
    node = values
    for part in name.split("."):
      node = node[part] if hasattr(node, "keys") else getattr(node, part)
    return node

  def problems(self, values, options: Optional[Sequence[Option]] = None) -> List[str]:
    """Every `key=value: what is allowed` message of `values` (a mapping or an object
    with the options as attributes), in table order (`options`: those checked, default
    all)."""
    out = []
    for o in self.options if options is None else options:
      value = self.get(values, o.name)
      problem = o.problem(value)
      if problem:
        out.append(f"{self.key(o.name)}={value!r}: {problem}")
    return out

  def validate(self, model_config) -> None:
    """Raises ValueError naming the first option of `config.model` out of range."""
    problems = self.problems(self.section_of(model_config))
    if problems:
      raise ValueError(problems[0])

  def values(self, model_config) -> Dict[str, Any]:
    """{name: value} of `config.model`'s options that are Module fields (`fields`), each
    cast to its default's type."""
    s = self.section_of(model_config)
    return {o.name: o.kind(s[o.name]) for o in self.fields}

  # ------------------------------------------------------------------- module side

  def dataclass(self, name: str, head: Sequence[Tuple[Any, ...]] = (),
                tail: Sequence[Tuple[Any, ...]] = ()) -> type:
    """A frozen dataclass with fields `head`, the options that are fields (their
    defaults), then `tail` (`(name, type[, default])` each); building one checks those
    options' rules."""
    fields = [f if len(f) == 2 else (f[0], f[1], _field(f[2])) for f in head]
    fields += [(o.name, o.kind, _field(o.default)) for o in self.fields]
    fields += [f if len(f) == 2 else (f[0], f[1], _field(f[2])) for f in tail]
    table = self

    def __post_init__(self):  # pylint: disable=invalid-name
      problems = table.problems(self, table.fields)
      if problems:
        raise ValueError(problems[0])

    cls = dataclasses.make_dataclass(name, fields, frozen=True,
                                     namespace={"__post_init__": __post_init__})
    cls.OPTIONS = self
    return cls

  def module_config(self, cls, model_config, vocab_size: Optional[int] = None, **extra):
    """`cls` (a `dataclass(..., head=WIDTHS)`) of `config.model`: the shared widths, the
    options cast to their types, and `extra` fields."""
    return cls(**widths_from(model_config, vocab_size), **self.values(model_config), **extra)

  def doc(self) -> str:
    """The table as text: one `name (default): doc` line per option."""
    return "\n".join(f"    {o.name} ({o.default!r}): {o.doc}" for o in self.options)


def _field(default):
  """A dataclass field of `default` (a factory for unhashable or dataclass defaults)."""
  if dataclasses.is_dataclass(default) or isinstance(default, (list, dict, set)):
    return dataclasses.field(default_factory=lambda: default)
  return dataclasses.field(default=default)


# A BERT build's shape when `bert_random_init` (else the shape is bert_path's config.json).
BERT_SHAPE = (("vocab_size", 30522, "WordPiece vocabulary"), ("hidden_size", 768, "hidden width"),
              ("num_layers", 12, "layers"), ("num_heads", 12, "attention heads"),
              ("intermediate_size", 3072, "feed-forward width"),
              ("max_position", 512, "position embeddings"), ("type_vocab_size", 2, "token types"))


def bert_options() -> List[Option]:
  """The options of a family with a BERT text encoder: `bert_path`, `bert_random_init`
  and the random-init shape `bert.*` (config keys only: the Module gets the BertConfig
  they imply, `common.bert.bert_config_of`)."""
  return [
      Option("bert_path", "", None, "local HF BERT directory or hub name (its tokenizer, "
             "config.json and, unless bert_random_init, weights)", field=False),
      Option("bert_random_init", False, None,
             "True: BERT of shape bert.* with random weights", field=False),
  ] + [Option(f"bert.{name}", default, integer_at_least(1), f"BERT {doc}", field=False)
       for name, default, doc in BERT_SHAPE]
