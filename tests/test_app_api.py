"""The web app's API over HTTP: ``python app.py --preset tiny`` in a subprocess (the ``app_server`` fixture in
conftest.py), driven by ``gradio_client`` as a remote program would."""
import os
import re
import threading

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

CALL_TIMEOUT_S = 120  # any one API call on the tiny preset takes a second or two

# What every story action returns (the session state is not part of the API).
BOARD, FRAME_IMAGE, FRAME_TEXT, FRAME_INFO, FRAME_SELECTOR, TREE, STATUS, VERSIONS = range(8)


def call(client, *args, api_name):
    """``client.predict`` with a time limit."""
    job = client.submit(*args, api_name=api_name)
    return job.result(timeout=CALL_TIMEOUT_S)


def captions(result):
    """The storyboard's captions without the mark of the selected frame (checked on its own below)."""
    return [item["caption"].removeprefix("▶ ") for item in result[BOARD]]


def choices(result):
    return [c[0] if isinstance(c, (list, tuple)) else c for c in result[FRAME_SELECTOR]["choices"]]


@pytest.fixture(scope="module")
def opening_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "opening.png"
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(path)
    return str(path)


def new_client(url):
    return Client(url, verbose=False, download_files=True)


def test_story_flow(app_server, opening_png):
    client = new_client(app_server)
    r = call(client, handle_file(opening_png), "The lighthouse keeper found a bottle.", api_name="/start_story")
    assert captions(r) == ["0. The lighthouse keeper found a bottle."] and r[BOARD][0]["caption"].startswith("▶ 0.")
    assert r[FRAME_TEXT] == "The lighthouse keeper found a bottle." and "**Frame #0**" in r[FRAME_INFO]
    assert r[FRAME_SELECTOR]["value"] == "#0 · The lighthouse keeper found a bottle."
    assert os.path.isfile(r[FRAME_IMAGE]) and Image.open(r[FRAME_IMAGE]).size == (96, 72)
    assert "Story started" in r[STATUS]

    r = call(client, api_name="/next_frame")
    assert len(r[BOARD]) == 2 and r[FRAME_SELECTOR]["value"].startswith("#1 ") and "Added 1 frame(s)" in r[STATUS]
    r = call(client, api_name="/next_frame")
    assert len(r[BOARD]) == 3 and r[FRAME_SELECTOR]["value"].startswith("#2 ")
    assert [c.split(". ", 1)[0] for c in captions(r)] == ["0", "1", "2"]
    assert len(choices(r)) == 3 and all(os.path.isfile(item["image"]) for item in r[BOARD])
    frame2_text = r[FRAME_TEXT]

    # Regenerate #2 with a fixed seed: a sibling (#3) replaces it on the storyboard.
    r = call(client, "#2", "both", 77, api_name="/regenerate_frame")
    assert "Regenerated as frame #3: new text and picture (seed 77)" in r[STATUS]
    assert len(r[BOARD]) == 3 and r[FRAME_SELECTOR]["value"].startswith("#3 ") and "version 2 of 2" in r[FRAME_INFO]
    assert len(choices(r)) == 4

    # Edit #1's text: a new version of frame 1 (#4); the storyboard is 0 -> 4.
    r = call(client, "#1", "She opened it and read the map.", api_name="/edit_frame")
    assert r[FRAME_TEXT] == "She opened it and read the map." and r[FRAME_SELECTOR]["value"].startswith("#4 ")
    assert captions(r) == ["0. The lighthouse keeper found a bottle.", "1. She opened it and read the map."]
    assert "version 2 of 2" in r[FRAME_INFO]

    # Branch from the opening frame with the person's text (#5, a third child of #0).
    r = call(client, "#0", "Far away, a ship sailed north.", api_name="/branch_story")
    assert "New branch at frame #5" in r[STATUS]
    assert captions(r) == ["0. The lighthouse keeper found a bottle.", "1. Far away, a ship sailed north."]
    assert "version 3 of 3" in r[FRAME_INFO] and len(choices(r)) == 6

    # Versions: back to the first version of frame 1, whose branch continues 0 -> 1 -> 3.
    r = call(client, api_name="/previous_version")
    r = call(client, api_name="/previous_version")
    assert r[FRAME_SELECTOR]["value"].startswith("#1 ") and "version 1 of 3" in r[FRAME_INFO]
    assert len(r[BOARD]) == 3  # 0 -> 1 -> 3, the newest continuation of this version
    r = call(client, "#2", api_name="/select_frame")
    assert r[FRAME_TEXT] == frame2_text and "version 1 of 2" in r[FRAME_INFO]

    # Export the branch through #2 (0 -> 1 -> 2) as PDF.
    path = call(client, "pdf", api_name="/export_story")
    with open(path, "rb") as f:
        data = f.read()
    assert path.endswith(".pdf") and data.startswith(b"%PDF")
    assert len(re.findall(rb"/Type\s*/Page\b(?!s)", data)) == 3  # one page per frame

    # Save, then load into a fresh client: the same story.
    saved = call(client, api_name="/save_session")
    other = new_client(app_server)
    r2 = call(other, handle_file(saved), api_name="/load_session")
    assert "Story loaded" in r2[STATUS] and len(choices(r2)) == 6 and r2[FRAME_TEXT] == frame2_text

    # Delete #2: the storyboard ends at #1's newest continuation (#3).
    r = call(client, "#2", api_name="/delete_frame")
    assert len(choices(r)) == 5 and not any(c.startswith("#2 ") for c in choices(r))


def test_mistakes_come_back_as_messages(app_server, opening_png, tmp_path, png_bomb):
    client = new_client(app_server)
    with pytest.raises(AppError, match="start a story first"):
        call(client, api_name="/next_frame")
    with pytest.raises(AppError, match="the text is empty"):
        call(client, handle_file(opening_png), "   ", api_name="/start_story")
    # The app's own loader sees every upload (Gradio used to open it first and answer with its raw error and
    # the server's temporary path); its messages name the file, never a server folder.
    for name, data, message in [("not-a-picture.png", b"GIF89a but not really", "not-a-picture.png is not a readable"),
                                ("empty.png", b"", "empty.png is empty")]:
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(AppError, match=message) as err:
            call(client, handle_file(str(bad)), "A story.", api_name="/start_story")
        assert "/" not in str(err.value)
    # Decompression-bomb headers are refused before anything is decoded, whatever the picture's mode.
    for name, (w, h, mode), message in [
        ("huge.png", (100000, 100000, "RGB"), "decompression bomb|pixels"),
        ("big.png", (7000, 7000, "RGB"), "7000x7000 pixels; at most 40,000,000"),
        ("big-grey.png", (7000, 7000, "L"), "7000x7000 pixels; at most 40,000,000"),
    ]:
        bomb = tmp_path / name
        bomb.write_bytes(png_bomb(w, h, mode))
        with pytest.raises(AppError, match=message):
            call(client, handle_file(str(bomb)), "A story.", api_name="/start_story")
    r = call(client, handle_file(opening_png), "A story.", api_name="/start_story")
    assert len(r[BOARD]) == 1
    with pytest.raises(AppError, match="between 1 and 25 frames|greater than maximum value 25"):
        call(client, 26, api_name="/next_frames")
    with pytest.raises(AppError, match="no frame 9"):
        call(client, "#9", api_name="/select_frame")
    # The story is still there and works.
    r = call(client, 2, api_name="/next_frames")
    assert len(r[BOARD]) == 3 and "Added 2 frame(s)" in r[STATUS]


CLIENTS = 8


def _hostile_files(folder, png_bomb):
    """A saved session whose frames are each other's children (it used to hang the server), a zip bomb, a picture
    bomb and an empty picture."""
    import json
    import zipfile

    folder.mkdir(exist_ok=True)
    cycle = folder / "cycle.zip"
    frames = [{"id": 0, "parent": None, "children": [1], "text": "a"},
              {"id": 1, "parent": 0, "children": [0], "text": "b"}]
    with zipfile.ZipFile(cycle, "w") as zf:
        zf.writestr("story.json", json.dumps({"format": "seedstory-story", "version": 1, "roots": [0],
                                              "frames": frames}))
    bomb = folder / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("story.json", "{}")
        zf.writestr("frames/0000.png", bytes(40 * 2**20))
    huge = folder / "huge.png"
    huge.write_bytes(png_bomb(100000, 100000))
    empty = folder / "empty.png"
    empty.write_bytes(b"")
    return [("/load_session", cycle), ("/load_session", bomb), ("/start_story", huge), ("/start_story", empty)]


def test_concurrent_sessions_stay_apart(app_server, opening_png, tmp_path, png_bomb):
    """Eight clients at once, each with its own story, and a hostile one beside them sending a cyclic session
    file, a zip bomb and picture bombs: none of the eight sees another's frames, none is lost or held up, the
    hostile one gets a message for each file, and the server answers a new client afterwards."""
    results, errors, refused = {}, {}, []
    barrier = threading.Barrier(CLIENTS + 1, timeout=120)

    def hostile():
        try:
            client = new_client(app_server)
            barrier.wait()
            for api, path in _hostile_files(tmp_path / "hostile", png_bomb):
                args = (handle_file(str(path)),) if api == "/load_session" else (handle_file(str(path)), "A story.")
                try:
                    call(client, *args, api_name=api)
                except AppError as e:
                    refused.append((path.name, str(e)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors["hostile"] = repr(e)

    def run(k):
        try:
            client = new_client(app_server)
            opening = f"Story number {k} starts with a {['cat', 'dog', 'owl', 'fox', 'bee', 'elk', 'yak', 'emu'][k]}."
            barrier.wait()  # start together
            first = call(client, handle_file(opening_png), opening, api_name="/start_story")
            steps = [call(client, api_name="/next_frame") for _ in range(2)]
            results[k] = (opening, first, steps)
        except Exception as e:  # noqa: BLE001 - reported below
            errors[k] = repr(e)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(CLIENTS)]
    threads.append(threading.Thread(target=hostile, daemon=True))
    for t in threads:
        t.start()
    for t in threads:
        t.join(CALL_TIMEOUT_S * 4)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors, errors
    assert [name for name, _ in refused] == ["cycle.zip", "bomb.zip", "huge.png", "empty.png"], refused
    for _, message in refused:  # no server path reaches a visitor
        assert "/tmp" not in message and "gradio" not in message and not re.search(r"(^|\s)/\w", message), message
    assert sorted(results) == list(range(CLIENTS))
    for k, (opening, first, steps) in results.items():
        assert captions(first) == [f"0. {opening}"]
        last = steps[-1]
        assert [len(s[BOARD]) for s in steps] == [2, 3], k
        assert captions(last)[0] == f"0. {opening}"
        # Its own frames only: ids 0, 1, 2 and its own opening text, no other story's.
        labels = choices(last)
        assert [lab.split(" ", 1)[0] for lab in labels] == ["#0", "#1", "#2"], labels
        assert labels[0] == f"#0 · {opening}"
        others = [f"Story number {j} " for j in range(CLIENTS) if j != k]
        flat = " ".join(captions(last) + labels + [last[TREE]])
        assert not any(o in flat for o in others), (k, flat)
    after = call(new_client(app_server), handle_file(opening_png), "After the storm.", api_name="/start_story")
    assert captions(after) == ["0. After the storm."]
    # A visitor's mistake is a message, not a crash of ours (Gradio still logs its own slider bound checks).
    for block in app_server.log.read_text(errors="replace").split("Traceback (most recent call last):")[1:]:
        trace = block.split("\n\n")[0]
        assert "app.py" not in trace and "seedstory" not in trace, trace

def test_readme_client_example_runs(app_server, monkeypatch):
    """The README's ``gradio_client`` example, run as written (only the server address changed)."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"),
                  encoding="utf-8").read()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "gradio_client" in b)
    code = block.replace('"http://127.0.0.1:7860/"', repr(app_server))
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - our own README
    assert len(scope["board"]) == 2 and all(os.path.isfile(item["image"]) for item in scope["board"])
    with open(scope["pdf"], "rb") as f:
        assert f.read(5) == b"%PDF-"


def test_regenerating_the_text_says_which_seed_did_what(app_server, opening_png):
    client = new_client(app_server)
    call(client, handle_file(opening_png), "A kite rose over the hill.", api_name="/start_story")
    first = call(client, api_name="/next_frame")
    painted_with = re.search(r"seed (\d+)", first[FRAME_INFO]).group(1)
    r = call(client, "#1", "text", 5, api_name="/regenerate_frame")
    assert f"new text (seed 5), its picture painted with the frame's seed {painted_with}" in r[STATUS], r[STATUS]
    r = call(client, "#2", "image", 9, api_name="/regenerate_frame")
    assert "a new picture (seed 9)" in r[STATUS]


def test_outputs_are_named_and_versions_come_side_by_side(app_server, opening_png):
    client = new_client(app_server)
    api = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    labels = {name: [r["label"] for r in ep["returns"]] for name, ep in api.items()}
    assert labels["/next_frame"][STATUS] == "Status" and labels["/next_frame"][VERSIONS].startswith("Versions")
    unnamed = {name: ls for name, ls in labels.items() if any(not label or label.startswith("value_") for label in ls)}
    assert unnamed == {}
    call(client, handle_file(opening_png), "A kite rose over the hill.", api_name="/start_story")
    call(client, api_name="/next_frame")
    r = call(client, "#1", "image", 9, api_name="/regenerate_frame")
    assert [item["caption"].split(":")[0] for item in r[VERSIONS]] == ["version 1 of 2", "version 2 of 2 (shown)"]
    assert all(os.path.isfile(item["image"]) for item in r[VERSIONS])
    page = call(client, api_name="/read_branch")
    assert page.count("<figure>") == 2 and page.count("data:image/png;base64,") == 2 and "◀ selected" in page


def test_the_app_says_where_it_runs_and_nothing_else(tmp_path):
    """``python app.py`` prints one line with its address: no share-link hint (there is none), no library notices."""
    import subprocess
    import sys
    import time

    from conftest import ROOT, _free_port

    port = _free_port()
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", OMP_NUM_THREADS="1",
               GRADIO_TEMP_DIR=str(tmp_path / "gradio"), SEEDSTORY_AUTOSAVE_DIR=str(tmp_path / "autosave"))
    env.pop("SEEDSTORY_VERBOSE", None)
    log = tmp_path / "app.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "app.py"), "--preset", "tiny"], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 120
            while "is running" not in log.read_text() and time.time() < deadline and proc.poll() is None:
                time.sleep(0.5)
            time.sleep(1)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    printed = log.read_text()
    assert f"open http://127.0.0.1:{port}/ in a browser" in printed, printed
    assert "share=True" not in printed and "torchvision" not in printed and "Loading weights" not in printed, printed
