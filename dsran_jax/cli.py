"""The command lines' shared entry: every user error as one `error: ...` line.

Every command line of the package reports a bad config value, a mistyped key, a config
file that fails, a missing file, unreadable data, a locked workdir, ... as one line
without a traceback and exits 2: `run_cli(main)` is `absl.app.run(main)` with
`parse_flags` as its flags parser, a `check` that validates the config before any work,
and `user_errors()` around `main`. A bug keeps its traceback.
"""
import ast
import contextlib
import functools
import sys
from typing import Callable, List, Optional, Sequence, Tuple, Type

from absl import app
from absl import flags
from ml_collections import config_flags

from dsran_jax.validation import ConfigError, unknown_key

# Every command line reports a user error as one `error: ...` line (no traceback) and
# exits 2: `run_cli(main)` is `absl.app.run(main)` with `parse_flags` as its flags parser
# and `user_errors()` around `main`. It lives here, below every CLI of the package
# (main, benchmark, extract, tools, search, data.check, data.tfds_builder), so that each
# of them can use it.

EXIT_CODE = 2  # absl's and argparse's status for a usage error
# A path the user gave that is not there or not usable (the message names it).
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
# The kinds of error a user error type of the package derives from (a bare Exception
# subclass, such as evaluation's `Interrupted`, is control flow, not an error).
_ERROR_BASES = (ValueError, OSError, RuntimeError, LookupError, ArithmeticError)


def is_user_error(e: BaseException) -> bool:
  """Whether `e` is the user's mistake rather than a bug: a path that is not there or
  not usable, or an error type this package defines (each is raised with a message
  naming the key or file, the value and what is allowed): ConfigError, a workdir's
  ConfigFileError and WorkdirLockedError, data's DataError, a ShortlistError, the
  converter's ConversionError and CheckpointError, ranking's NonFiniteScoresError, ...
  Python's own errors (a KeyError, a TypeError, ...) raised by the package are bugs."""
  if isinstance(e, PATH_ERRORS):
    return True
  return isinstance(e, _ERROR_BASES) and any(
      c.__module__.split(".")[0] == __name__.split(".")[0] for c in type(e).__mro__
      if issubclass(c, _ERROR_BASES))


def error_message(e: BaseException) -> str:
  """The message of a user error: a ConfigError on one line, a KeyError unquoted."""
  if isinstance(e, ConfigError):
    return e.one_line()
  if isinstance(e, KeyError) and e.args:
    return str(e.args[0])
  return str(e)


def fail(message: str, exit_code: int = EXIT_CODE):
  """Prints `error: <message>` on stderr and exits with `exit_code`."""
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(exit_code)


@contextlib.contextmanager
def user_errors(errors: Sequence[Type[BaseException]] = (), exit_code: int = EXIT_CODE):
  """Reports a user error raised inside (`is_user_error`, or one of `errors`) as
  `fail(message)`: one `error: ...` line on stderr and exit `exit_code`. Anything else
  (a bug) keeps its traceback."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if not (is_user_error(e) or isinstance(e, tuple(errors))):
      raise
    fail(error_message(e), exit_code)


def run_cli(main: Callable[[List[str]], Optional[int]], *,
            check: Optional[Callable[[], None]] = None,
            errors: Sequence[Type[BaseException]] = (), exit_code: int = EXIT_CODE) -> None:
  """`absl.app.run(main)` for a command line of the package: flag and config errors
  (`parse_flags`), then `check()`, then the user errors `main` raises, each reported as
  one `error: ...` line on stderr with exit status `exit_code`; a bug keeps its
  traceback.

    if __name__ == "__main__":
      _FLAGS = _define_flags()
      cli.run_cli(main, check=lambda: validation.validate_config(_FLAGS.config.value))

  Args:
    main: the CLI's main(argv); its return value is the exit status, as with app.run.
    check: called once the flags are parsed, before `main` reads any data or compiles
      anything (validate the config here, so that a bad value fails in seconds).
    errors: further exception types that are user errors of this CLI (e.g. OSError and
      ValueError of a tool whose every such error is about its input files).
    exit_code: the exit status of a user error (2; a CLI that documents another passes
      it). An `app.UsageError` is one line too, with absl's status (1).
  """
  @functools.wraps(main)
  def guarded(argv):
    with user_errors(errors, exit_code):
      try:
        return main(argv)
      except app.UsageError as e:  # one line, not absl's usage text
        fail(str(e), e.exitcode)

  app.run(guarded, flags_parser=functools.partial(parse_flags, check=check, errors=errors,
                                                  exit_code=exit_code))


def _config_overrides(argv: Sequence[str], names: Optional[Sequence[str]] = None
                      ) -> List[Tuple[str, str]]:
  """[(argument, dotted key)] of the `--<flag>.a.b=v` arguments of a defined flag (or
  of a flag in `names`)."""
  out = []
  for arg in argv[1:]:
    if not arg.startswith("-"):
      continue
    name = arg.lstrip("-").split("=", 1)[0]
    flag, dot, path = name.partition(".")
    if dot and (flag in names if names is not None else flag in flags.FLAGS):
      out.append((arg, path))
  return out


def _is_config_file_flag(flag) -> bool:
  return config_flags.config_flags.is_config_flag(flag)


def _config_file_args(argv: Sequence[str]) -> List[str]:
  """The `--<flag>=PATH` arguments of the config file flags."""
  out = []
  for arg in argv[1:]:
    name, eq, _ = arg.lstrip("-").partition("=")
    if arg.startswith("-") and eq and name in flags.FLAGS:
      if _is_config_file_flag(flags.FLAGS[name]):
        out.append(arg)
  return out


def _unknown_key_message(e: BaseException, argv: Sequence[str],
                         names: Optional[Sequence[str]] = None) -> Optional[str]:
  """One line for ml_collections' error on a mistyped `--config.a.b` key, or None."""
  text = str(e.args[0]) if e.args else str(e)
  if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # a repr'd message
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      pass
  bad = text.splitlines()[0].strip().strip("'\"") if text.strip() else ""
  for arg, path in _config_overrides(argv, names):
    if bad and bad in path.split("."):
      # "config.train.log_evry=3: unknown key (did you mean config.train.log_every?)"
      problem = unknown_key(path).split(": ", 1)[1]
      return f"{arg.lstrip('-')}: {problem}"
  return None


def _flag_error_message(e: BaseException) -> str:
  """A flag error's message on one line: a config file's embedded traceback is cut to
  its first and last lines (what failed, and why)."""
  text = str(e)
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if not lines:
    return type(e).__name__
  if "Traceback" in text:
    return f"{lines[0]} {lines[-1]}"
  return " ".join(lines)


def _check_config_files(exit_code: int) -> None:
  """A config file flag whose file did not load holds a placeholder that raises on first
  use; that failure is reported here, naming the flag and the file."""
  for name in list(flags.FLAGS):
    flag = flags.FLAGS[name]
    if not _is_config_file_flag(flag) or not flag.present:
      continue
    try:
      getattr(flag.value, "keys", None)
    except OSError as e:
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      fail(f"flag --{name}={flag.config_filename}: cannot load the config file "
           f"({lines[-1] if lines else e})", exit_code)


_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")


def _parse_or_help(argv: Sequence[str]) -> List[str]:
  """`flags.FLAGS(argv)`, exiting 0 after a help flag's text (absl exits 1: a help
  request is not an error, and every command line answers it alike)."""
  try:
    return flags.FLAGS(argv)
  except SystemExit:
    if any(arg in _HELP_FLAGS for arg in argv[1:]):
      sys.exit(0)
    raise


def parse_flags(argv: Sequence[str], check: Optional[Callable[[], None]] = None,
                errors: Sequence[Type[BaseException]] = (),
                exit_code: int = EXIT_CODE) -> List[str]:
  """absl's flag parsing (returns the remaining arguments), then `check()`; an error in
  either is one `error: ...` line on stderr and exit `exit_code` (no traceback).

  A bad flag value, a config file that fails to load and a mistyped `--config.a.b` key
  are reported here; `check` (e.g. `validate_config` of the parsed config) runs before
  anything expensive, and a user error it raises (`user_errors`) is reported the same
  way. `run_cli` uses it; `app.run(main, flags_parser=cli.parse_flags)` too.
  """
  try:
    rest = _parse_or_help(argv)
  except (KeyError, AttributeError) as e:  # ml_collections: a mistyped --config.a.b key
    fail(_unknown_key_message(e, argv) or _flag_error_message(e), exit_code)
  except (ImportError, SyntaxError) as e:  # raised by a config file as it is imported
    files = _config_file_args(argv)
    where = f"flag {files[0]}: cannot load the config file" if len(files) == 1 else \
        "cannot load a config file"
    fail(f"{where} ({type(e).__name__}: {e})", exit_code)
  except (flags.Error, ValueError, TypeError, OSError) as e:
    fail(_flag_error_message(e), exit_code)
  _check_config_files(exit_code)
  if check is not None:
    try:
      with user_errors(errors, exit_code):
        check()
    except app.UsageError as e:
      fail(str(e), e.exitcode)
  return rest


def define_config_file(name: str, default: Optional[str] = None, help_string: str = "",
                       **kwargs):
  """`config_flags.DEFINE_config_file`, for a flag with a default file: ml_collections
  loads that default and applies the command line's `--<name>.a.b=v` overrides as the
  flag is defined (at import), so a mistyped key there is reported here, as one line."""
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  except (KeyError, AttributeError) as e:
    fail(_unknown_key_message(e, sys.argv, [name]) or _flag_error_message(e))
  except flags.Error as e:
    fail(_flag_error_message(e))
