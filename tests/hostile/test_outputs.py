"""Nothing a command writes may destroy what it reads (issue 26): the output guard (unit cases worked
out by hand, symbolic links included), the guard of every writing command, the reader/writer lock of a
model folder, the content fingerprint of cached evaluations, full disks and read-only folders, and the
one-line errors of hostile configs and half-written runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cctuning.errors import CCError
from cctuning.guard import check_output, safe_name, within


# -- the guard, by hand --------------------------------------------------------------------------------
@pytest.fixture
def tree(tmp_path) -> Path:
    """``model/`` (weights, eval/), ``data.jsonl``, ``conf.yaml``, ``out/`` (empty) and ``old.jsonl``."""
    (tmp_path / "model" / "eval").mkdir(parents=True)
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "data.jsonl").write_text("{}\n")
    (tmp_path / "conf.yaml").write_text("a: 1\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "old.jsonl").write_text("old\n")
    return tmp_path


def _inputs(t: Path) -> dict:
    return {"--model": t / "model", "--data": t / "data.jsonl", "--config": t / "conf.yaml", "--hub": "org/x"}


# (output, folder, expected error or None): the output relative to the tree
GUARD_CASES = [
    ("model", True, "is the input --model"),
    ("model/model.safetensors", False, "lies inside the input --model"),
    ("model/sub", True, "lies inside the input --model"),
    ("model/eval/run", True, None),  # the place eval keeps its results
    ("model/eval", True, None),
    ("model/evaluation", True, "lies inside the input --model"),  # a prefix is not the place
    ("model/eval/../model.safetensors", False, "lies inside the input --model"),
    ("data.jsonl", False, "is the input --data"),
    ("conf.yaml", False, "is the input --config"),
    (".", True, "contains the input --model"),
    ("out", True, None),
    ("out/new.jsonl", False, None),
    ("out", False, "is a folder"),
    ("data.jsonl/x", True, "lies inside the input --data"),
    ("old.jsonl", False, "exists and is not a result of this command"),
    ("old.jsonl", True, "exists and is not a folder"),
    ("org/x", False, None),  # a hub id is not a path: nothing to compare
]


@pytest.mark.parametrize("output, folder, expected", GUARD_CASES)
def test_the_guard_by_hand(tree, output, folder, expected):
    def run():
        return check_output(tree / output, _inputs(tree), inside={"--model": ["eval"]}, folder=folder)

    if expected is None:
        assert run() == tree / output
    else:
        with pytest.raises(CCError, match=expected) as err:
            run()
        assert "\n" not in str(err.value) and str(tree / output) in str(err.value)


def test_the_guard_lets_a_command_replace_its_own_result(tree):
    own = tree / "old.jsonl"
    assert check_output(own, _inputs(tree), own=lambda p: p.read_text() == "old\n") == own
    with pytest.raises(CCError, match="not a result of this command"):
        check_output(own, _inputs(tree), own=lambda p: False)


SYMLINK_CASES = [
    # (link, what it points to, the output: relative to the tree, expected)
    ("link.jsonl", "data.jsonl", "link.jsonl", "is the input --data"),
    ("mlink", "model", "mlink/model.safetensors", "lies inside the input --model"),
    ("mlink", "model", "mlink/eval/x", None),  # the model's own eval/ through a link to the model
    ("mlink", "model", "mlink", "is the input --model"),
    ("elink", "model/eval", "elink/x", None),
    ("olink", ".", "olink/out/new.jsonl", None),
    # eval/loop → model: the output's real path is model/weights, not in eval/
    ("model/eval/loop", "model", "model/eval/loop/weights", "lies inside the input --model"),
    ("dangling", "nowhere.jsonl", "dangling", None),
]


@pytest.mark.parametrize("link, target, output, expected", SYMLINK_CASES)
def test_the_guard_follows_symbolic_links(tree, link, target, output, expected):
    (tree / link).symlink_to(tree / target)

    def run():
        return check_output(tree / output, _inputs(tree), inside={"--model": ["eval"]})

    if expected is None:
        run()
    else:
        with pytest.raises(CCError, match=expected):
            run()


def test_an_input_given_through_a_link_is_the_file_it_names(tree):
    (tree / "in.jsonl").symlink_to(tree / "data.jsonl")
    with pytest.raises(CCError, match="is the input --input"):
        check_output(tree / "data.jsonl", {"--input": tree / "in.jsonl"})


def test_a_hard_link_to_an_input_is_the_input(tree):
    os.link(tree / "data.jsonl", tree / "hard.jsonl")
    with pytest.raises(CCError, match="is the input --data"):
        check_output(tree / "hard.jsonl", {"--data": tree / "data.jsonl"}, own=lambda p: True)


@pytest.mark.parametrize("name", ["../x", "..", ".", ".hidden", "a/b", "", "a\\b", "x\0", 3, "-rf", "a b"])
def test_unsafe_names_are_refused_in_one_line(name):
    with pytest.raises(CCError, match="cell") as err:
        safe_name(name, "exp.yaml: cell")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["sft", "cc-none", "fixed-8", "lr1e-4", "a.b", "A_1+x=y@z"])
def test_safe_names_pass(name):
    assert safe_name(name, "cell") == name


def test_within_refuses_a_path_that_climbs_out(tmp_path):
    assert within(tmp_path, tmp_path / "a" / "b", "cell") == tmp_path / "a" / "b"
    with pytest.raises(CCError, match="lies outside"):
        within(tmp_path / "a", tmp_path / "a" / ".." / "b", "cell")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "up").symlink_to(tmp_path)
    with pytest.raises(CCError, match="lies outside"):
        within(tmp_path / "a", tmp_path / "a" / "up" / "b", "cell")
