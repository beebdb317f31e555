"""The documentation's commands are real: every ``cctuning ...`` command in a shell code block of
README.md and docs/ parses with that subcommand's own argument parser (``cctuning.cli.build_parser``).

How a block's lines are read (``commands_in``):

* a fenced block whose language is empty or a shell (bash, sh, shell, console) is read; python,
  yaml, json, ... blocks are not;
* a ``#`` that starts a word outside quotes starts a comment, as in bash; a line ending in ``\\``
  continues on the next;
* shell values are replaced, not skipped: ``$NAME``, ``${NAME}``, ``$1`` and ``$(...)`` in an
  option's value place become a value the option accepts (its first choice, ``X`` or ``1``), and
  ``X`` inside a word;
* a command starts at a command position (the line's start, after ``VAR=value`` assignments, or
  after ``;``, ``&&``, ``||``, ``|``, ``(``, ``do``, ``then``, ``time``) with the word ``cctuning``
  (or a path ending in ``/cctuning``), or after ``-m cctuning.cli`` anywhere (``python -m``,
  ``accelerate launch ... -m``, ``torchrun ... -m``); it ends at the next separator or redirection;
* in a synopsis, ``[--flag value]`` is read as ``--flag value`` and a word ``a|b|c`` is tried with
  each of its alternatives; a word ``...`` is a placeholder: in an option's value place it becomes a
  value the option accepts, elsewhere it stands for elided arguments and is dropped, and then (as
  with ``--config FILE``, whose file may give them) a missing required argument is not an error;
* ``cctuning lm-eval``: our parser passes lm-eval's arguments through, so only our part is checked:
  the ``--model_args`` keys of ``--model cctuning`` against the model class's parameters and the
  ``--tasks`` named ``cctuning_*`` against the shipped task folder.

Every ``--flag`` must be written as the parser spells it: argparse accepts an abbreviation
(``--batch`` for ``--batch-size``), which would let a renamed flag pass. A line that names a
cctuning command and cannot be tokenised fails: nothing is skipped silently.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import itertools
import re
import shlex
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_LIMIT = 25_000  # characters: the README is a user's guide, the lab's record lives in docs/
DOC_FILES = [README, *sorted((ROOT / "docs").rglob("*.md"))]

SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console", "zsh"}
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "do", "then", "else", "time", "{", "}"}
REDIRECTIONS = re.compile(r"^\d*(>>?|<)&?\d*$")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SHELL_VALUE = re.compile(r"\$\([^()]*\)|\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|\$[0-9@*#]")
MENTION = re.compile(r"(^|[\s;&|(/])cctuning(\s|$)|-m\s+cctuning\.cli(\s|$)")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
SHELL = "__shell_value__"  # what a shell value ($NAME, $(...)) reads as until check() picks a value
ELIDED = "..."


@dataclass
class Command:
    """One ``cctuning`` command found in a document."""

    where: str  # file:line of the command's first line
    text: str  # the logical line as written (continuations joined)
    argv: list[str]  # the arguments after ``cctuning`` (placeholders: see resolve_placeholders)
    elided: bool = False  # a ``...`` stood for arguments
    alternatives: list[list[str]] = field(default_factory=list)  # argv with each a|b|c alternative

    def __str__(self) -> str:
        return f"{self.where}: {self.text.strip()}"


class DocError(Exception):
    """A line of a document that names a cctuning command but cannot be read as one."""


def strip_comment(line: str) -> str:
    """``line`` without its bash comment: a ``#`` that starts a word outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def shell_blocks(text: str):
    """(first line number, lines) of every fenced block in a shell language (or none)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, language = m.group(2), m.group(3).lower()
        body_start = i + 1
        j = body_start
        while j < len(lines) and not lines[j].strip().startswith(fence[0] * len(fence)):
            j += 1
        if language in SHELL_LANGUAGES:
            yield body_start + 1, lines[body_start:j]
        i = j + 1


def logical_lines(first: int, lines: list[str]):
    """(line number, text) with comments removed and ``\\`` continuations joined."""
    pending, start = "", None
    for number, raw in enumerate(lines, first):
        line = strip_comment(raw)
        if start is None:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield start, pending + line
        pending, start = "", None
    if start is not None and pending.strip():
        yield start, pending


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(SHELL_VALUE.sub(SHELL, line), posix=True, punctuation_chars=";&()<>")
    lexer.whitespace_split = True
    lexer.commenters = ""
    return list(lexer)


def _is_cctuning(token: str) -> bool:
    return token == "cctuning" or token.endswith("/cctuning")


def _ends_command(tokens: list[str], i: int) -> bool:
    """A separator or a redirection (``> f``, ``2> f``, ``2>&1``) at ``tokens[i]``."""
    token = tokens[i]
    if token in SEPARATORS or REDIRECTIONS.match(token):
        return True
    return token.isdigit() and i + 1 < len(tokens) and tokens[i + 1][:1] in "<>"


def _split_commands(tokens: list[str]) -> list[list[str]]:
    """The argument lists of the cctuning commands among ``tokens``."""
    found, i, at_start = [], 0, True
    while i < len(tokens):
        token = tokens[i]
        start = None
        if token in SEPARATORS:
            at_start = True
        elif at_start and ASSIGNMENT.match(token):
            pass  # VAR=value before a command
        elif at_start and _is_cctuning(token):
            start = i + 1
        elif token == "-m" and i + 1 < len(tokens) and tokens[i + 1] == "cctuning.cli":
            start = i + 2
        else:
            at_start = False
        if start is None:
            i += 1
            continue
        end = start
        while end < len(tokens) and not _ends_command(tokens, end):
            end += 1
        found.append(tokens[start:end])
        i, at_start = end, False
    return found


def _synopsis(argv: list[str]) -> tuple[list[str], bool, list[list[str]]]:
    """``argv`` with ``[...]`` brackets removed and ``...`` dropped (elided), and the variants with
    each word ``a|b|c`` set to each of its alternatives in turn (the first alternative in ``argv``)."""
    out, elided, choices = [], False, []
    for token in argv:
        while token.startswith("[") and token[1:2] in ("-", "["):
            token = token[1:]
        while token.endswith("]") and token.count("]") > token.count("["):
            token = token[:-1]
        if token in ("...", "…"):
            elided, token = True, ELIDED
        parts = token.split("|")
        if len(parts) > 1 and all(parts) and not token.startswith("-"):
            choices.append((len(out), parts))
            token = parts[0]
        out.append(token)
    variants = []
    for position, parts in choices:
        for part in parts[1:]:
            variant = list(out)
            variant[position] = part
            variants.append(variant)
    return out, elided, variants


def commands_in(text: str, name: str) -> list[Command]:
    """Every cctuning command in the shell blocks of a markdown text called ``name``."""
    commands = []
    for first, lines in shell_blocks(text):
        for number, line in logical_lines(first, lines):
            if not MENTION.search(line):
                continue
            try:
                tokens = _tokens(line)
            except ValueError as err:  # unbalanced quotes: fail, never skip
                raise DocError(f"{name}:{number}: cannot tokenise ({err}): {line.strip()}") from None
            for argv in _split_commands(tokens):
                argv, elided, variants = _synopsis(argv)
                commands.append(Command(f"{name}:{number}", line, argv, elided, variants))
    return commands


@functools.lru_cache(maxsize=1)
def parser():
    from cctuning.cli import build_parser

    return build_parser()


def _parse(argv: list[str]) -> str | None:
    """None when the command line parses, else argparse's message."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            parser().parse_args(argv)
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help, --version
            return None
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {exit_.code}"
    return None


@functools.lru_cache(maxsize=1)
def _lm_eval_names() -> tuple[frozenset, frozenset] | None:
    """The model class's ``model_args`` and the names of the shipped lm-eval tasks and groups (None
    without lm-eval, the ``eval`` extra: then only our parser checks ``cctuning lm-eval``)."""
    try:
        from cctuning.eval.lmeval import CCLM, TASKS_DIR
    except ImportError:
        return None

    params = inspect.signature(CCLM.__init__).parameters
    model_args = frozenset(n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD)
    names = set()
    for path in TASKS_DIR.rglob("*.yaml"):
        for line in path.read_text(encoding="utf-8").splitlines():
            m = re.match(r"^(task|group):\s*['\"]?([\w.-]+)", line)
            if m:
                names.add(m.group(2))
    return model_args, frozenset(names)


def _check_lm_eval(argv: list[str]) -> str | None:
    """Our part of ``cctuning lm-eval ...``: the cctuning model's arguments and our task names."""
    args = argv[1:]
    model = next((args[i + 1] for i, a in enumerate(args[:-1]) if a == "--model"), None)
    if _lm_eval_names() is None:
        return None
    model_args, tasks = _lm_eval_names()
    for i, a in enumerate(args[:-1]):
        if a == "--model_args" and model == "cctuning":
            for pair in args[i + 1].split(","):
                key = pair.split("=", 1)[0].strip()
                if key not in model_args:
                    return f"model 'cctuning' takes no model_args key '{key}'"
    if "--tasks" in args:
        start = args.index("--tasks") + 1
        given = itertools.takewhile(lambda a: not a.startswith("--"), args[start:])
        for name in (n for t in given for n in t.split(",")):
            if name.startswith("cctuning_") and name not in tasks:
                return f"no task or group '{name}' in the shipped task folder"
    return None


def _subparser(name: str):
    import argparse

    commands = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices.get(name)


def _a_valid_value(action) -> str:
    """A value that ``action`` accepts: the first of its choices, else "X" or "1" as its type allows."""
    if action.choices:
        return str(next(iter(action.choices)))
    for candidate in ("X", "1"):
        try:
            (action.type or str)(candidate)
            return candidate
        except Exception:  # noqa: BLE001 - any refusal: try the next candidate
            continue
    return "X"


def resolve_placeholders(argv: list[str]) -> list[str]:
    """``argv`` with a shell value or ``...`` in an option's value place set to a value the option
    accepts, a shell value inside a word set to ``X``, and any other ``...`` dropped."""
    sub = _subparser(argv[0]) if argv else None
    out = []
    for i, token in enumerate(argv):
        previous = argv[i - 1] if i else ""
        action = sub._option_string_actions.get(previous) if sub is not None else None
        takes_value = action is not None and action.nargs != 0
        if token in (SHELL, ELIDED) and takes_value:
            out.append(_a_valid_value(action))
        elif token == ELIDED:
            continue
        else:
            out.append(token.replace(SHELL, "X"))
    return out


def _inexact_option(argv: list[str]) -> str | None:
    """The first ``--flag`` that is not one of the subcommand's own option strings: argparse would
    take an abbreviation (``--batch`` for ``--batch-size``), which a renamed flag can silently match."""
    sub = _subparser(argv[0]) if argv else None
    if sub is None:
        return None
    for token in argv[1:]:
        name = token.split("=", 1)[0]
        if name.startswith("--") and name != "--" and name not in sub._option_string_actions:
            return f"{name} is not an option of 'cctuning {argv[0]}' as written (an abbreviation?)"
    return None


def check(command: Command) -> str | None:
    """None when the command is valid, else why not."""
    for argv in [command.argv, *command.alternatives]:
        argv = resolve_placeholders(argv)
        if argv[:1] == ["lm-eval"]:
            problem = _parse(argv[:1]) or _check_lm_eval(argv)
        else:
            problem = _parse(argv)
            lenient = command.elided or "--config" in argv
            if problem and lenient and "the following arguments are required" in problem:
                problem = None
            problem = problem or _inexact_option(argv)
        if problem:
            shown = f" (read as: cctuning {' '.join(argv)})"
            return f"{command}{shown}\n    {problem}"
    return None


def _doc_name(path: Path) -> str:
    return str(path.relative_to(ROOT))


@functools.lru_cache(maxsize=1)
def documented_commands() -> tuple[Command, ...]:
    found = []
    for path in DOC_FILES:
        found += commands_in(path.read_text(encoding="utf-8"), _doc_name(path))
    return tuple(found)


# -- the documentation -----------------------------------------------------------------------------


def test_every_documented_command_parses():
    commands = documented_commands()
    failures = [problem for problem in map(check, commands) if problem]
    assert not failures, (
        f"{len(failures)} of {len(commands)} documented commands do not parse:\n" + "\n".join(failures)
    )


def test_the_documents_have_commands_to_check():
    """The extraction finds the commands (a reader that found none would pass everything)."""
    commands = documented_commands()
    in_readme = [c for c in commands if c.where.startswith("README.md:")]
    assert len(in_readme) >= 15, [str(c) for c in in_readme]
    assert len(commands) >= 45
    subcommands = {c.argv[0] for c in commands if c.argv}
    expected = {"train", "fit-matrix", "generate", "eval", "export", "lm-eval", "report", "experiment"}
    assert expected | {"demo"} <= subcommands


def test_the_readme_is_a_short_guide():
    size = len(README.read_text(encoding="utf-8"))
    assert size < README_LIMIT, (
        f"README.md has {size} characters (limit {README_LIMIT}): move detail to docs/"
    )


def test_no_document_uses_the_removed_transfer_task_command():
    """The transfer study is ``python -m studies.transfer``, not a cctuning command."""
    command = re.compile(r"(?<![\w-])transfer-task(?![\w-])")
    for path in DOC_FILES:
        assert not command.search(path.read_text(encoding="utf-8")), _doc_name(path)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|<[^>]+>", "", heading).strip().lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LNM")
    return kept.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, counts, in_code = set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_code = not in_code
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m and not in_code:
            slug = _slug(m.group(1))
            n = counts.get(slug, 0)
            counts[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_relative_links_resolve():
    """Links between the documents (and to files of the repository) point at something, and an
    anchor into a markdown file names one of its headings."""
    broken = []
    for path in DOC_FILES:
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / file_part).resolve() if file_part else path
            if not resolved.exists():
                broken.append(f"{_doc_name(path)}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{_doc_name(path)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_paper_recipe_config_is_accepted_by_train():
    """examples/paper_8b.yaml, the README's recipe for the paper's setting, is a valid train config."""
    from cctuning.training.options import build_train_config

    path = ROOT / "examples" / "paper_8b.yaml"
    args = parser().parse_args(["train", "--config", str(path)])
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "verbose", "func")}
    cfg = build_train_config(str(path), given)
    assert (cfg.method, cfg.lr, cfg.epochs, cfg.batch_size, cfg.max_length) == ("cc", 1e-5, 3, 16, 1024)
    assert cfg.bf16 and cfg.gradient_checkpointing


# -- the checker itself ----------------------------------------------------------------------------

SAMPLE = """\
Some prose that mentions cctuning train --no-such-flag outside a block (not checked).

```bash
cctuning train --model M --data d.jsonl --output runs/cc \\
    --learning-rate-typo 1e-4        # a renamed flag
make demo CONFIG=examples/demo_full.yaml
```
"""


def test_a_renamed_flag_is_caught():
    [command] = commands_in(SAMPLE, "sample.md")
    assert command.where == "sample.md:4"
    assert command.argv == ["train", "--model", "M", "--data", "d.jsonl", "--output", "runs/cc",
                            "--learning-rate-typo", "1e-4"]  # fmt: skip
    problem = check(command)
    assert problem and "sample.md:4" in problem and "--learning-rate-typo" in problem


def test_a_valid_sample_passes_and_shell_forms_are_read():
    text = """\
```bash
OUT=runs/x cctuning eval --model $MODEL --nll XQuAD --langs ar,de --limit $N --connection $C  # comment
for seed in 1 2; do cctuning train --model "$M" --output runs/s$seed --seed 1; done
accelerate launch --config_file examples/accelerate/multi_cpu.yaml -m cctuning.cli train ...
python -m cctuning.cli generate --model runs/cc --prompt "a # not a comment" --connection transform|none
cctuning fit-matrix --model runs/cc --data train.jsonl [--samples 1000] [--per-layer] | tee log
cctuning lm-eval --model cctuning --model_args pretrained=runs/cc,connection=none --tasks cctuning_xnli_sw
pip install cctuning
```

```python
cctuning train --not-checked-in-python
```
"""
    commands = commands_in(text, "ok.md")
    assert [c.argv[0] for c in commands] == ["eval", "train", "train", "generate", "fit-matrix", "lm-eval"]
    assert resolve_placeholders(commands[0].argv)[2::2] == ["X", "XQuAD", "ar,de", "1", "transform"]
    assert commands[2].elided and resolve_placeholders(commands[2].argv) == ["train"]
    assert commands[3].argv[-1] == "transform" and commands[3].alternatives[0][-1] == "none"
    assert commands[4].argv[-3:] == ["--samples", "1000", "--per-layer"]
    assert [check(c) for c in commands] == [None] * len(commands)


@pytest.mark.parametrize(
    "line, expected",
    [
        ("cctuning generate --model runs/cc --connection transform|sideways", "sideways"),
        ("cctuning eval --model runs/cc --sample-layer K", "--sample-layer"),
        ("cctuning fit-matrix --data train.jsonl", "--model"),
        ("cctuning train --model m --batch 4", "--batch"),  # argparse would take the abbreviation
        ("cctuning fit-matrix ... --sample 10", "--sample"),  # elided arguments: still checked
        ("cctuning lm-eval --model cctuning --model_args pretrained=runs/cc,conection=none", "conection"),
        (
            "cctuning lm-eval --model cctuning --model_args pretrained=x --tasks cctuning_xnli_xx",
            "cctuning_xnli_xx",
        ),
        ("cctuning no-such-command --x", "no-such-command"),
    ],
)
def test_invalid_commands_are_caught(line, expected):
    if "lm-eval" in line:
        pytest.importorskip("lm_eval")
    [command] = commands_in(f"```\n{line}\n```\n", "bad.md")
    problem = check(command)
    assert problem and expected in problem


def test_an_untokenisable_command_fails_instead_of_being_skipped():
    with pytest.raises(DocError, match="bad.md:2"):
        commands_in("```sh\ncctuning train --system-prompt 'unclosed\n```\n", "bad.md")
