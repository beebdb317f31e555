"""What a new user meets in the first hour (issue 30): files others can read, runs that say what ran
(the connection and the layers chosen), a warning where a default silently does less than it seems,
and the demo's defaults sized to what it measures."""

import os
import stat
from pathlib import Path

import pytest
import torch

from cctuning.cli import main
from tests.conftest import train


@pytest.fixture
def umask():
    """Run the test under umask 022; yields the mask, read back from the process."""
    old = os.umask(0o022)
    mask = os.umask(0o022)  # read back, not assumed
    yield mask
    os.umask(old)


def wrong_modes(folder: Path, mask: int) -> list[str]:
    """Every file or folder under ``folder`` (itself included) whose permissions are not those that
    open() and mkdir() give under ``mask``."""
    wrong = []
    for path in [folder, *sorted(folder.rglob("*"))]:
        want = (0o777 if path.is_dir() else 0o666) & ~mask
        have = stat.S_IMODE(path.lstat().st_mode)
        if have != want:
            wrong.append(f"{path.relative_to(folder.parent)}: {oct(have)}, not {oct(want)}")
    return wrong


# -- permissions ---------------------------------------------------------------------------------
def test_a_trained_run_its_matrix_and_its_export_are_readable_as_the_umask_allows(
    base_dir, data_file, tmp_path, umask, capsys
):
    run, export = tmp_path / "run", tmp_path / "export"
    assert train(model=base_dir, data=data_file, output=run, max_steps=2, batch_size=4, save_steps=1) == 0
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert main(["fit-matrix", "--model", run, "--data", data_file, "--samples", 8]) == 0
    assert main(["export", "--model", run, "--output", export]) == 0
    weights = ("model.safetensors", "decision_maker.safetensors", "transform_matrix.safetensors")
    assert all((folder / name).is_file() for folder in (run, export) for name in weights)
    assert wrong_modes(run, umask) == []
    assert wrong_modes(export, umask) == []


def test_the_writers_follow_the_umask_of_the_moment(tmp_path):
    """Not the umask the process had when cctuning was imported: the files of each writer get the
    mode open() gives under the umask in force when they are written."""
    from cctuning.io import save_safetensors, staged_dir, write_text

    old = os.umask(0o027)
    try:
        mask = os.umask(0o027)
        out = tmp_path / "out"
        out.mkdir()
        save_safetensors(out / "a.safetensors", {"x": torch.zeros(2)})
        write_text(out / "b.txt", "b")
        with staged_dir(out / "staged") as stage:
            save_safetensors(stage / "c.safetensors", {"x": torch.zeros(2)})
            (stage / "sub").mkdir()
            (stage / "sub" / "d.txt").write_text("d")
    finally:
        os.umask(old)
    assert wrong_modes(out, mask) == []
