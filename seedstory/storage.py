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
import tempfile
import zipfile
from typing import Optional

from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .atomic import write_dir
from .image_processing import ImageError, load_image
from .story import Frame, StoryTree

STORY_FORMAT = "seedstory-story"
STORY_VERSION = 1
MAX_STORY_FILE_BYTES = 2 * 1024**3


class StoryFileError(ValueError):
    pass


def _frame_png(frame: Frame) -> str:
    return f"frames/{frame.id:04d}.png"


def story_to_files(tree: StoryTree, model_name: str = "") -> dict[str, bytes]:
    """The files of a saved story, as {relative path: bytes}."""
    files: dict[str, bytes] = {}
    frames, tensors = [], {}
    for fid in sorted(tree.frames):
        f = tree.frames[fid]
        entry = {"id": f.id, "parent": f.parent, "text": f.text, "seed": f.seed, "settings": f.settings,
                 "origin": f.origin, "children": f.children, "token_ids": f.token_ids, "created": f.created,
                 "image": None}
        if f.image is not None:
            buf = io.BytesIO()
            f.image.save(buf, format="PNG")
            entry["image"] = _frame_png(f)
            files[entry["image"]] = buf.getvalue()
        # clones: a repainted frame shares its features with the frame it repaints, and safetensors refuses
        # tensors that share memory
        if f.features is not None:
            tensors[f"frame_{f.id}"] = f.features.detach().float().cpu().clone()
        if f.painted_from is not None:
            tensors[f"painted_{f.id}"] = f.painted_from.detach().float().cpu().clone()
        frames.append(entry)
    meta = {"format": STORY_FORMAT, "version": STORY_VERSION, "model": model_name, "roots": tree.roots,
            "current": tree.current, "path": [f.id for f in tree.path()], "frames": frames}
    files["story.json"] = json.dumps(meta, indent=1, ensure_ascii=False).encode()
    files["features.safetensors"] = st_save(tensors) if tensors else st_save({})
    return files


def save_story(tree: StoryTree, path: str, model_name: str = "") -> str:
    """Save to ``path`` (a directory, or a ``.zip`` file if the name ends so), atomically."""
    files = story_to_files(tree, model_name)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if path.endswith(".zip"):
        fd, tmp = tempfile.mkstemp(dir=parent, suffix=".zip.tmp")
        try:
            with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
                for name, data in files.items():
                    zf.writestr(name, data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, "story.json")) and os.listdir(path):
        raise StoryFileError(f"{path} exists and is not a saved story; refusing to replace it")

    def fill(tmp):
        for name, data in files.items():
            os.makedirs(os.path.join(tmp, os.path.dirname(name)), exist_ok=True)
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)

    return write_dir(path, fill)


def _read_files(path: str) -> dict[str, bytes]:
    if not os.path.exists(path):
        raise StoryFileError(f"no saved story at {path}")
    if os.path.isdir(path):
        out = {}
        for root, _, names in os.walk(path):
            for n in names:
                full = os.path.join(root, n)
                out[os.path.relpath(full, path).replace(os.sep, "/")] = open(full, "rb").read()
        return out
    if os.path.getsize(path) > MAX_STORY_FILE_BYTES:
        raise StoryFileError(f"{path} is too large to be a saved story")
    try:
        with zipfile.ZipFile(path) as zf:
            total = sum(i.file_size for i in zf.infolist())
            if total > MAX_STORY_FILE_BYTES:
                raise StoryFileError(f"{path} unpacks to {total / 2**20:.0f} MiB; refusing it")
            return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}
    except zipfile.BadZipFile:
        raise StoryFileError(f"{path} is neither a story folder nor a story .zip") from None


def load_story(path: str) -> StoryTree:
    """Read a story saved by ``save_story``. Raises StoryFileError for anything not a valid story."""
    files = _read_files(path)
    if "story.json" not in files:
        raise StoryFileError(f"{path} has no story.json: not a saved seedstory story")
    try:
        meta = json.loads(files["story.json"].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoryFileError(f"{path}: story.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != STORY_FORMAT:
        raise StoryFileError(f"{path} is not a seedstory story file")
    if meta.get("version", 0) > STORY_VERSION:
        raise StoryFileError(f"{path} was written by a newer seedstory (format version {meta.get('version')})")
    try:
        tensors = st_load(files.get("features.safetensors", st_save({})))
    except Exception as e:  # safetensors raises its own error types
        raise StoryFileError(f"{path}: features.safetensors is damaged ({e})") from None
    tree = StoryTree()
    try:
        entries = sorted(meta["frames"], key=lambda e: int(e["id"]))
        ids = {int(e["id"]) for e in entries}
        by_id = {int(e["id"]): e for e in entries}
        for e in entries:
            parent = e.get("parent")
            if parent is not None and int(parent) not in ids:
                raise StoryFileError(f"{path}: frame {e['id']} names a missing parent {parent}")
        # Add parents before children, preserving each parent's child order.
        order, stack = [], [int(r) for r in reversed(meta["roots"])]
        while stack:
            fid = stack.pop()
            order.append(fid)
            stack.extend(int(c) for c in reversed(by_id[fid].get("children", [])))
        if sorted(order) != sorted(ids):
            raise StoryFileError(f"{path}: the frames do not form a tree")
        for fid in order:
            e = by_id[fid]
            image = None
            if e.get("image"):
                if e["image"] not in files:
                    raise StoryFileError(f"{path}: picture {e['image']} is missing")
                image = load_image(files[e["image"]])
            frame = Frame(id=fid, parent=e.get("parent"), text=str(e["text"]), image=image,
                          features=tensors.get(f"frame_{fid}"), painted_from=tensors.get(f"painted_{fid}"),
                          token_ids=[int(t) for t in e.get("token_ids", [])],
                          seed=e.get("seed"), settings=dict(e.get("settings") or {}), origin=str(e.get("origin", "generated")),
                          created=float(e.get("created", 0.0)))
            tree.add(frame, select=False)
        current = meta.get("current")
        tree.current = int(current) if current is not None and int(current) in ids else (tree.roots[0] if tree.roots else None)
    except StoryFileError:
        raise
    except ImageError as e:
        raise StoryFileError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise StoryFileError(f"{path}: story.json is malformed ({type(e).__name__}: {e})") from None
    return tree
