"""Exporting one path of a story: comic page (PNG), standalone HTML, PDF, animated GIF, zip.

Captions are drawn with the bundled DejaVu Sans (Bitstream Vera licence, assets/fonts), so exports
look the same on every machine.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import zipfile
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

from .atomic import write_file
from .config import REPO_ROOT
from .storage import frame_png
from .story import Frame, StoryError, StoryTree

FONT_PATH = os.path.join(REPO_ROOT, "assets", "fonts", "DejaVuSans.ttf")
FORMATS = {"comic": ".png", "html": ".html", "pdf": ".pdf", "gif": ".gif", "zip": ".zip"}
PANEL = 384  # panel side in pixels; pictures are upscaled to it


def font(size: int) -> ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(FONT_PATH, size)
    except OSError:  # the asset is missing: still export, with Pillow's own font
        return ImageFont.load_default(size)


def wrap(text: str, fnt: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; words longer than a line are split."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            while fnt.getlength(word) > width:  # a very long word: cut it
                cut = max(1, int(len(word) * width / fnt.getlength(word)) - 1)
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:cut])
                word = word[cut:]
            candidate = f"{line} {word}".strip()
            if fnt.getlength(candidate) <= width:
                line = candidate
            else:
                lines.append(line)
                line = word
        lines.append(line)
    return lines


def _picture(frame: Frame, side: int) -> Image.Image:
    if frame.image is None:
        return Image.new("RGB", (side, side), "gray")
    return frame.image.convert("RGB").resize((side, side), Image.LANCZOS)


def panel(frame: Frame, index: int, side: int = PANEL, caption_lines: int = 5) -> Image.Image:
    """One captioned panel: the picture, then the wrapped text under it."""
    fnt = font(max(12, side // 24))
    line_h = int(fnt.size * 1.3)
    lines = wrap(f"{index}. {frame.text}", fnt, side - 16)
    if len(lines) > caption_lines:
        lines = lines[: caption_lines - 1] + [lines[caption_lines - 1].rstrip() + " …"]
    out = Image.new("RGB", (side, side + 12 + caption_lines * line_h), "white")
    out.paste(_picture(frame, side), (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((8, side + 6 + i * line_h), line, fill="black", font=fnt)
    return out


def comic_page(frames: list[Frame], columns: Optional[int] = None, side: int = PANEL, title: str = "") -> Image.Image:
    columns = columns or min(4, max(1, math.ceil(math.sqrt(len(frames)))))
    panels = [panel(f, i, side) for i, f in enumerate(frames)]
    pw, ph = panels[0].size
    gap, top = 12, (48 if title else 12)
    rows = math.ceil(len(panels) / columns)
    page = Image.new("RGB", (columns * (pw + gap) + gap, top + rows * (ph + gap)), (240, 236, 228))
    draw = ImageDraw.Draw(page)
    if title:
        draw.text((gap, 10), title, fill="black", font=font(26))
    for i, p in enumerate(panels):
        r, c = divmod(i, columns)
        x, y = gap + c * (pw + gap), top + r * (ph + gap)
        page.paste(p, (x, y))
        draw.rectangle([x - 1, y - 1, x + pw, y + ph], outline="black", width=2)
    return page


def figures_html(frames: list[Frame], selected: Optional[int] = None, png_cache: Optional[dict] = None) -> list[str]:
    """One ``<figure>`` per frame: its picture embedded as a PNG, "i. text" below it; the frame whose id is
    ``selected`` is marked. ``png_cache``: see ``storage.frame_png``."""
    items = []
    for i, f in enumerate(frames):
        img = ""
        if f.image is not None:
            data = base64.b64encode(frame_png(f, png_cache)).decode()
            img = f'<img alt="frame {i}" src="data:image/png;base64,{data}">'
        mark = "<i> ◀ selected</i>" if f.id == selected else ""
        items.append(f"<figure>{img}<figcaption><b>{i}.</b> {html.escape(f.text)}{mark}</figcaption></figure>")
    return items


def html_page(frames: list[Frame], title: str = "A story") -> str:
    items = figures_html(frames)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:60rem;margin:2rem auto;background:#f6f3ee}"
        "figure{display:inline-block;width:18rem;margin:.5rem;vertical-align:top;background:#fff;padding:.5rem}"
        "img{width:100%;image-rendering:auto}figcaption{font-size:.95rem;line-height:1.3}"
        f"</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(items) + "\n</body></html>\n"
    )


def export_frames(frames: list[Frame], fmt: str, path: str, title: str = "A story") -> str:
    """Write ``frames`` (one path of a story) to ``path`` in ``fmt`` (comic, html, pdf, gif, zip)."""
    if fmt not in FORMATS:
        raise StoryError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not frames:
        raise StoryError("there is nothing to export yet")
    if fmt == "comic":
        page = comic_page(frames, title=title)
        return write_file(path, lambda f: page.save(f, format="PNG"))
    if fmt == "html":
        text = html_page(frames, title).encode()
        return write_file(path, lambda f: f.write(text))
    if fmt == "pdf":
        pages = [panel(f, i, side=512) for i, f in enumerate(frames)]
        return write_file(path, lambda f: pages[0].save(f, format="PDF", save_all=True, append_images=pages[1:],
                                                           resolution=96, title=title))
    if fmt == "gif":
        pages = [panel(f, i, side=320).convert("P", palette=Image.ADAPTIVE) for i, f in enumerate(frames)]
        return write_file(path, lambda f: pages[0].save(f, format="GIF", save_all=True, append_images=pages[1:],
                                                           duration=1800, loop=0))

    def write_zip(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
            story = []
            for i, fr in enumerate(frames):
                name = f"frame_{i:03d}.png"
                if fr.image is not None:
                    zf.writestr(name, frame_png(fr))
                story.append({"index": i, "text": fr.text, "image": name, "seed": fr.seed})
            zf.writestr("story.txt", "\n\n".join(f"{i}. {fr.text}" for i, fr in enumerate(frames)) + "\n")
            zf.writestr("story.json", json.dumps({"title": title, "frames": story}, indent=1, ensure_ascii=False))

    return write_file(path, write_zip)


def export_story(tree: StoryTree, fmt: str, path: str, frame_id: Optional[int] = None, title: str = "A story") -> str:
    """Export the branch through ``frame_id`` (default: the current frame), root to leaf."""
    frame_id = tree.current if frame_id is None else frame_id
    if frame_id is None:
        raise StoryError("the story is empty")
    return export_frames(tree.path(tree.leaf(frame_id)), fmt, path, title)
