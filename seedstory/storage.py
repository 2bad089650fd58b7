"""Saving and loading a whole story tree: one directory or one ``.zip`` holding

    story.json              the tree: frames with text, parent, seed, settings, token ids
    frames/<id>.png         one picture per frame
    features.safetensors    each frame's features (what re-enters the context) and, where they differ,
                            the features its picture was painted from

Writes are atomic (a temporary sibling, then a rename); a corrupt or foreign file gives a clear
``StoryFileError`` and changes nothing.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from typing import Optional

from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .atomic import write_dir, write_file
from .image_processing import ImageError, load_image
from .story import Frame, StoryTree

STORY_FORMAT = "seedstory-story"
STORY_VERSION = 1


class StoryFileError(ValueError):
    pass


def _frame_png(frame_id: int) -> str:
    return f"frames/{frame_id:04d}.png"


def frame_png(frame: Frame, png_cache: Optional[dict] = None) -> bytes:
    """The frame's picture as PNG bytes, encoded once per ``png_cache`` ({frame id: PNG bytes}, for one tree: a
    frame's picture never changes)."""
    data = png_cache.get(frame.id) if png_cache is not None else None
    if data is None:
        buf = io.BytesIO()
        frame.image.save(buf, format="PNG")
        data = buf.getvalue()
        if png_cache is not None:
            png_cache[frame.id] = data
    return data


def story_to_files(tree: StoryTree, model_name: str = "", png_cache: Optional[dict] = None) -> dict[str, bytes]:
    """The files of a saved story, as {relative path: bytes}. ``png_cache`` (``frame_png``) saves re-encoding the
    pictures of a story saved again and again."""
    files: dict[str, bytes] = {}
    frames, tensors = [], {}
    for fid in sorted(tree.frames):
        f = tree.frames[fid]
        entry = {"id": f.id, "parent": f.parent, "text": f.text, "seed": f.seed, "settings": f.settings,
                 "origin": f.origin, "children": f.children, "token_ids": f.token_ids, "created": f.created,
                 "image": None}
        if f.image is not None:
            entry["image"] = _frame_png(f.id)
            files[entry["image"]] = frame_png(f, png_cache)
        # clones: a repainted frame shares its features with the frame it repaints, and safetensors refuses
        # tensors that share memory
        if f.features is not None:
            tensors[f"frame_{f.id}"] = f.features.detach().float().cpu().clone()
        if f.painted_from is not None:
            tensors[f"painted_{f.id}"] = f.painted_from.detach().float().cpu().clone()
        frames.append(entry)
    meta = {"format": STORY_FORMAT, "version": STORY_VERSION, "model": model_name or tree.model, "roots": tree.roots,
            "current": tree.current, "path": [f.id for f in tree.path()], "frames": frames}
    files["story.json"] = json.dumps(meta, indent=1, ensure_ascii=False).encode()
    files["features.safetensors"] = st_save(tensors) if tensors else st_save({})
    return files


def save_story(tree: StoryTree, path: str, model_name: str = "", png_cache: Optional[dict] = None) -> str:
    """Save to ``path`` (a directory, or a ``.zip`` file if the name ends so), atomically."""
    files = story_to_files(tree, model_name, png_cache)
    path = os.path.abspath(path)
    if path.endswith(".zip"):
        def pack(raw):
            with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
                for name, data in files.items():
                    zf.writestr(name, data)

        return write_file(path, pack)
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, "story.json")) and os.listdir(path):
        raise StoryFileError(f"{path} exists and is not a saved story; refusing to replace it")

    def fill(tmp):
        for name, data in files.items():
            os.makedirs(os.path.join(tmp, os.path.dirname(name)), exist_ok=True)
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)

    return write_dir(path, fill)


# Bounds on what a story file may hold, checked before anything is unpacked: one visitor's upload must not
# hang the server or fill its memory.
MAX_FRAMES = 2000               # frames in one story tree
MAX_MEMBERS = 2 * MAX_FRAMES + 8  # a picture per frame, story.json, features.safetensors
MAX_MEMBER_BYTES = 64 * 2**20   # one unpacked file
MAX_UNPACKED_BYTES = 1 * 2**30  # all of them
MAX_RATIO = 50                  # unpacked / packed size of any member over 1 MiB (zeros pack 1000:1)


def _name(path: str) -> str:
    """How a message names the file: its base name, never a server's folders."""
    return os.path.basename(os.path.normpath(path)) or "the story file"


def _read_files(path: str) -> dict[str, bytes]:
    name = _name(path)
    if not os.path.exists(path):
        raise StoryFileError(f"no saved story at {path}")
    if os.path.isdir(path):
        found = []
        for root, _, names in os.walk(path):
            found += [os.path.join(root, n) for n in names]
        if len(found) > MAX_MEMBERS:
            raise StoryFileError(f"{name} holds {len(found)} files; a saved story has at most {MAX_MEMBERS}")
        sizes = {full: os.path.getsize(full) for full in found}
        _check_sizes(name, sizes.values())
        out = {}
        for full in found:
            with open(full, "rb") as f:
                out[os.path.relpath(full, path).replace(os.sep, "/")] = f.read(MAX_MEMBER_BYTES + 1)
        return out
    if os.path.getsize(path) > MAX_UNPACKED_BYTES:
        raise StoryFileError(f"{name} is too large to be a saved story")
    try:
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if not i.is_dir()]
            if len(members) > MAX_MEMBERS:
                raise StoryFileError(f"{name} holds {len(members)} files; a saved story has at most {MAX_MEMBERS}")
            _check_sizes(name, [i.file_size for i in members])
            unpacked, packed = sum(i.file_size for i in members), os.path.getsize(path)
            if unpacked > max(MAX_RATIO * packed, 16 * 2**20):  # many small members, each under the per-file bound
                raise StoryFileError(f"{name} unpacks {unpacked // max(1, packed)} times larger than it is packed; "
                                     "not a saved story")
            for i in members:
                if i.file_size > 2**20 and i.file_size > MAX_RATIO * max(1, i.compress_size):
                    raise StoryFileError(f"{name}: {i.filename} unpacks {i.file_size // max(1, i.compress_size)} "
                                         "times larger than it is packed; not a saved story")
            out = {}
            for i in members:
                with zf.open(i) as f:  # never more than the header declares, whatever the data says
                    data = f.read(i.file_size + 1)
                if len(data) != i.file_size:
                    raise StoryFileError(f"{name}: {i.filename} is not the size its header declares")
                out[i.filename] = data
            return out
    except zipfile.BadZipFile:
        raise StoryFileError(f"{name} is neither a story folder nor a story .zip") from None
    except (zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError, OSError, zlib.error) as e:
        raise StoryFileError(f"{name} cannot be unpacked ({type(e).__name__})") from None


def _check_sizes(name: str, sizes) -> None:
    sizes = list(sizes)
    if any(n > MAX_MEMBER_BYTES for n in sizes):
        raise StoryFileError(f"{name} holds a file over {MAX_MEMBER_BYTES // 2**20} MiB; not a saved story")
    if sum(sizes) > MAX_UNPACKED_BYTES:
        raise StoryFileError(f"{name} unpacks to {sum(sizes) / 2**20:.0f} MiB; a saved story is at most "
                             f"{MAX_UNPACKED_BYTES // 2**20} MiB")


def _tree_order(meta: dict, name: str) -> list[int]:
    """The frame ids, parents before children, once the tree in ``story.json`` is checked as a whole: ids unique,
    every parent present, every frame listed as a child of its parent exactly once (or a root), no cycle, every
    frame reachable from a root. Raises StoryFileError; reads nothing else."""
    frames, roots = meta.get("frames"), meta.get("roots")
    if not isinstance(frames, list) or not isinstance(roots, list):
        raise StoryFileError(f"{name}: story.json has no frame list")
    if len(frames) > MAX_FRAMES:
        raise StoryFileError(f"{name} has {len(frames)} frames; a story has at most {MAX_FRAMES}")
    if not all(isinstance(e, dict) for e in frames):
        raise StoryFileError(f"{name}: story.json is malformed (a frame is not an object)")
    ids = [int(e["id"]) for e in frames]
    if len(set(ids)) != len(ids):
        raise StoryFileError(f"{name}: two frames share the id {next(i for i in ids if ids.count(i) > 1)}")
    by_id = {int(e["id"]): e for e in frames}
    parent = {fid: (None if e.get("parent") is None else int(e["parent"])) for fid, e in by_id.items()}
    children = {fid: [int(c) for c in (e.get("children") or [])] for fid, e in by_id.items()}
    roots = [int(r) for r in roots]
    for fid, p in parent.items():
        if p is not None and p not in by_id:
            raise StoryFileError(f"{name}: frame {fid} names a missing parent {p}")
        listed = roots if p is None else children[p]
        if listed.count(fid) != 1:
            raise StoryFileError(f"{name}: frame {fid} is not listed once under its parent; the frames do not "
                                 "form a tree")
    if sum(len(c) for c in children.values()) + len(roots) != len(by_id):
        raise StoryFileError(f"{name}: a frame is listed under another parent than its own; the frames do not "
                             "form a tree")
    order, seen, stack = [], set(), list(reversed(roots))
    while stack:
        fid = stack.pop()
        if fid in seen:
            raise StoryFileError(f"{name}: frame {fid} is its own ancestor; the frames do not form a tree")
        seen.add(fid)
        order.append(fid)
        stack.extend(reversed(children[fid]))
    if len(order) != len(by_id):
        raise StoryFileError(f"{name}: the frames do not form a tree")
    return order


MAX_STORY_PIXELS = 300_000_000  # all of a story's pictures together, decoded (about 900 MB in RGB)


def _check_pictures(frames: list, files: dict, name: str) -> None:
    """Each frame's picture is its own member (``frames/<id>.png``), and all of them together decode to at most
    ``MAX_STORY_PIXELS``: read from their headers, before any is decoded."""
    total = 0
    for e in frames:
        if not e.get("image"):
            continue
        if e["image"] != _frame_png(int(e["id"])):
            raise StoryFileError(f"{name}: frame {e['id']} names another frame's picture ({e['image']})")
        data = files.get(e["image"])
        if data is None:
            raise StoryFileError(f"{name}: picture {e['image']} is missing")
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except Exception:  # noqa: BLE001 - PIL raises many kinds for a broken header
            raise StoryFileError(f"{name}: picture {e['image']} is not a readable image") from None
        total += w * h
        if total > MAX_STORY_PIXELS:
            raise StoryFileError(f"{name}: its pictures add up to more than {MAX_STORY_PIXELS:,} pixels")


def load_story(path: str) -> StoryTree:
    """Read a story saved by ``save_story``. Raises StoryFileError for anything not a valid story; the whole
    file is checked (sizes, then the tree) before any picture or tensor is decoded."""
    name = _name(path)
    files = _read_files(path)
    if "story.json" not in files:
        raise StoryFileError(f"{name} has no story.json: not a saved seedstory story")
    try:
        meta = json.loads(files["story.json"].decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise StoryFileError(f"{name}: story.json is not valid JSON ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != STORY_FORMAT:
        raise StoryFileError(f"{name} is not a seedstory story file")
    if not isinstance(meta.get("version", 0), int) or meta.get("version", 0) > STORY_VERSION:
        raise StoryFileError(f"{name} was written by a newer seedstory (format version {meta.get('version')})")
    try:
        order = _tree_order(meta, name)
        _check_pictures(meta["frames"], files, name)
    except StoryFileError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise StoryFileError(f"{name}: story.json is malformed ({type(e).__name__}: {e})") from None
    try:
        tensors = st_load(files.get("features.safetensors", st_save({})))
    except Exception as e:  # safetensors raises its own error types
        raise StoryFileError(f"{name}: features.safetensors is damaged ({e})") from None
    tree = StoryTree()
    tree.model = str(meta.get("model") or "")
    try:
        by_id = {int(e["id"]): e for e in meta["frames"]}
        for fid in order:
            e = by_id[fid]
            image = None
            if e.get("image"):  # present and its own: _check_pictures
                image = load_image(files[e["image"]])
            frame = Frame(id=fid, parent=e.get("parent"), text=str(e["text"]), image=image,
                          features=tensors.get(f"frame_{fid}"), painted_from=tensors.get(f"painted_{fid}"),
                          token_ids=[int(t) for t in e.get("token_ids", [])],
                          seed=e.get("seed"), settings=dict(e.get("settings") or {}), origin=str(e.get("origin", "generated")),
                          created=float(e.get("created", 0.0)))
            tree.add(frame, select=False)
        current = meta.get("current")
        tree.current = int(current) if current is not None and int(current) in by_id else (tree.roots[0] if tree.roots else None)
    except StoryFileError:
        raise
    except ImageError as e:
        raise StoryFileError(f"{name}: {e}") from None
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise StoryFileError(f"{name}: story.json is malformed ({type(e).__name__}: {e})") from None
    return tree
