"""dsla.outputs.check_output_path: what a tool may write, checked before any model is loaded."""
import os

import pytest

from dsla.errors import UserError
from dsla.outputs import check_output_path


def test_a_new_path_is_accepted_and_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_output_path("new/model.pth", overwrite=False) == str(tmp_path / "new/model.pth")
    assert check_output_path("out", overwrite=False, kind="folder") == str(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    assert check_output_path("empty", overwrite=False, kind="folder") == str(tmp_path / "empty")


def test_an_existing_output_needs_overwrite(tmp_path):
    f = tmp_path / "model.pth"
    f.write_text("user data")
    with pytest.raises(UserError, match=r"--output .*model.pth exists: pass --overwrite"):
        check_output_path(str(f), overwrite=False)
    assert check_output_path(str(f), overwrite=True) == str(f)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match="is not empty: pass --overwrite"):
        check_output_path(str(tmp_path / "d"), overwrite=False, kind="folder", option="OUT")
    assert f.read_text() == "user data"  # nothing is touched


def test_the_wrong_kind_is_refused_even_with_overwrite(tmp_path):
    f = tmp_path / "a.pth"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file; give a folder"):
        check_output_path(str(f), overwrite=True, kind="folder")
    with pytest.raises(UserError, match="is a folder; give a file name"):
        check_output_path(str(tmp_path), overwrite=True, kind="file")
    with pytest.raises(UserError, match=r"cannot create .*: .*a.pth is a file"):
        check_output_path(str(f / "sub" / "b.pth"), overwrite=False)


def test_an_unwritable_folder_is_refused(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path)
                        else real_access(p, mode))
    with pytest.raises(UserError, match="cannot write into .*permission denied"):
        check_output_path(str(tmp_path / "new" / "x.pth"), overwrite=False)
