"""Libraries for converting the authors' PyTorch checkpoints, below the model zoo: a safe
reader of torch pickles without torch (`torch_pickle`), the rule engine that maps state
dicts onto Flax trees (`engine`), and readers of the authors' vocabularies
(`authors_vocab`). The families' `params.py` rules use them; `tools.convert_torch` is
the command line on top."""
