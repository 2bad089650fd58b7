import os
import stat

import pytest

from seedstory.atomic import write_dir, write_file


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_get_ordinary_permissions(tmp_path, umask_022):
    """A story, an export or a model written atomically is readable as a plainly written one would be (the temporary
    file or folder it starts as is private to its writer)."""
    f = write_file(str(tmp_path / "a" / "story.pdf"), lambda out: out.write(b"%PDF-"))
    assert open(f, "rb").read() == b"%PDF-" and mode(f) == 0o644
    d = write_dir(str(tmp_path / "model"), lambda tmp: open(os.path.join(tmp, "x.json"), "w").write("{}"))
    assert mode(d) == 0o755 and mode(os.path.join(d, "x.json")) == 0o644


def test_a_failed_write_leaves_the_old_file_and_no_leftovers(tmp_path):
    path = str(tmp_path / "story.zip")
    write_file(path, lambda out: out.write(b"old"))

    def broken(out):
        out.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_file(path, broken)
    assert open(path, "rb").read() == b"old" and os.listdir(tmp_path) == ["story.zip"]


def test_a_test_run_writes_its_temp_files_where_pytest_cleans_up(tmp_path_factory, pytestconfig):
    """Sessions' folders, Gradio's cache and the servers' files land under pytest's base folder, which a passing run
    removes: a run of the suite used to leave about 900 MB in /tmp."""
    import tempfile

    base = str(tmp_path_factory.getbasetemp())
    assert tempfile.gettempdir().startswith(base) and os.environ["TMPDIR"] == tempfile.gettempdir()
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
