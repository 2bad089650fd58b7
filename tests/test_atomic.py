import os
import stat

import pytest

import json

from seedstory.atomic import write_dir, write_file, write_json, write_path, write_text


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


def test_path_writers_secrets_and_json_share_the_one_writer(tmp_path, umask_022):
    import torch

    t = write_path(str(tmp_path / "w" / "weights.pt"), lambda tmp: torch.save({"x": torch.ones(2)}, tmp))
    assert torch.load(t)["x"].tolist() == [1.0, 1.0] and mode(t) == 0o644
    secret = write_text(str(tmp_path / ".secret"), "k3y", private=True)
    assert open(secret).read() == "k3y" and mode(secret) == 0o600
    j = write_json(str(tmp_path / "result.json"), {"name": "Tänsy"}, indent=1)
    assert json.load(open(j, encoding="utf-8")) == {"name": "Tänsy"} and "Tänsy" in open(j, encoding="utf-8").read()
    with pytest.raises(OSError):
        write_path(t, lambda tmp: (_ for _ in ()).throw(OSError("disk full")))
    assert torch.load(t)["x"].tolist() == [1.0, 1.0] and sorted(os.listdir(tmp_path / "w")) == ["weights.pt"]


def test_an_interrupted_export_keeps_the_last_final_model(tmp_path):
    """``training.common.export`` replaces ``final/`` atomically: a save that fails half-way (disk full, Ctrl-C)
    leaves the previous export whole, where it used to have deleted it first."""
    from training.common import export

    class Accelerator:
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def print(self, *a):
            pass

    class Pipe:
        def __init__(self, fail):
            self.fail = fail

        def save_pretrained(self, path):
            open(os.path.join(path, "seedstory.json"), "w").write('{"v": %d}' % (2 if self.fail else 1))
            if self.fail:
                raise KeyboardInterrupt

    final = export(Accelerator(), Pipe(False), str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        export(Accelerator(), Pipe(True), str(tmp_path))
    assert json.load(open(os.path.join(final, "seedstory.json"))) == {"v": 1} and os.listdir(tmp_path) == ["final"]
