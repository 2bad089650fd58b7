"""The story tree: frames (text, image, features) linked to their parents. Pure data, no models.

Every frame but an opening frame has a parent; a parent may have several children (regenerations,
edits, branches). ``current`` is the frame the person is looking at; the path from its root to it is
the story as told so far.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from PIL import Image


class StoryError(ValueError):
    """A request the story cannot satisfy, with a message fit to show to a person."""


@dataclass
class Frame:
    id: int
    parent: Optional[int]
    text: str
    image: Optional[Image.Image] = field(default=None, repr=False)
    # ViT-space features [1, n, D] (fp32, CPU): what this frame's picture contributes to the context.
    features: Optional[torch.Tensor] = field(default=None, repr=False)
    # The features the picture was painted from, when they are not ``features`` (``context_from: picture``).
    painted_from: Optional[torch.Tensor] = field(default=None, repr=False)
    # This frame's ids when it follows another frame: "[INST]" text, then the image block.
    token_ids: list[int] = field(default_factory=list, repr=False)
    seed: Optional[int] = None
    settings: dict = field(default_factory=dict)
    origin: str = "generated"  # opening | generated | regenerated | edited | branch
    children: list[int] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    @property
    def paint_features(self) -> Optional[torch.Tensor]:
        """What this frame's picture was painted from (what repainting it starts from)."""
        return self.painted_from if self.painted_from is not None else self.features


class StoryTree:
    def __init__(self):
        self.frames: dict[int, Frame] = {}
        self.roots: list[int] = []
        self.current: Optional[int] = None
        self.uid = uuid.uuid4().hex  # identifies this story's cached states in a shared engine
        self.model = ""  # the model that made it (its token ids and features are that model's); "" = unknown
        self._next_id = 0

    # -- building ---------------------------------------------------------------------------
    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def add(self, frame: Frame, select: bool = True) -> Frame:
        if frame.id in self.frames:
            raise StoryError(f"frame {frame.id} already exists")
        if frame.parent is None:
            self.roots.append(frame.id)
        else:
            self.get(frame.parent).children.append(frame.id)
        self.frames[frame.id] = frame
        self._next_id = max(self._next_id, frame.id + 1)
        if select:
            self.current = frame.id
        return frame

    def delete(self, frame_id: int) -> list[int]:
        """Delete a frame and everything below it. Returns the deleted ids. The current frame moves
        to the deleted frame's parent (or another root) if it was inside the subtree."""
        frame = self.get(frame_id)
        doomed = [f.id for f in self.subtree(frame_id)]
        if frame.parent is None:
            self.roots.remove(frame_id)
        else:
            self.get(frame.parent).children.remove(frame_id)
        for i in doomed:
            del self.frames[i]
        if self.current in doomed:
            self.current = frame.parent if frame.parent is not None else (self.roots[0] if self.roots else None)
        return doomed

    def detach(self, frame_id: int) -> "Detached":
        """Delete a frame and everything below it, keeping what ``reattach`` needs to put it all back."""
        frame = self.get(frame_id)
        siblings = self.roots if frame.parent is None else self.get(frame.parent).children
        kept = Detached(frames=list(self.subtree(frame_id)), index=siblings.index(frame_id), current=self.current)
        self.delete(frame_id)
        return kept

    def reattach(self, kept: "Detached") -> Frame:
        """Put back what ``detach`` took, where it was; the frame that was current is current again."""
        top = kept.frames[0]
        if top.parent is not None and top.parent not in self.frames:
            raise StoryError("the frame it hung from is gone; it cannot be put back")
        if any(f.id in self.frames for f in kept.frames):
            raise StoryError("those frames are already in the story")
        for f in kept.frames:
            self.frames[f.id] = f
        siblings = self.roots if top.parent is None else self.get(top.parent).children
        siblings.insert(min(kept.index, len(siblings)), top.id)
        if kept.current in self.frames:
            self.current = kept.current
        return top

    # -- reading ----------------------------------------------------------------------------
    def get(self, frame_id: int) -> Frame:
        try:
            return self.frames[frame_id]
        except KeyError:
            raise StoryError(f"there is no frame {frame_id} in this story") from None

    def __len__(self) -> int:
        return len(self.frames)

    def __contains__(self, frame_id: int) -> bool:
        return frame_id in self.frames

    def path(self, frame_id: Optional[int] = None) -> list[Frame]:
        """Frames from the root to ``frame_id`` (default: the current frame)."""
        frame_id = self.current if frame_id is None else frame_id
        if frame_id is None:
            return []
        out = []
        frame: Optional[Frame] = self.get(frame_id)
        while frame is not None:
            out.append(frame)
            frame = self.frames[frame.parent] if frame.parent is not None else None
        return out[::-1]

    def depth(self, frame_id: int) -> int:
        return len(self.path(frame_id))

    def siblings(self, frame_id: int) -> list[int]:
        frame = self.get(frame_id)
        return list(self.roots) if frame.parent is None else list(self.get(frame.parent).children)

    def subtree(self, frame_id: int) -> Iterator[Frame]:
        stack = [frame_id]
        while stack:
            frame = self.get(stack.pop())
            yield frame
            stack.extend(reversed(frame.children))

    def leaf(self, frame_id: int) -> int:
        """Follow the most recent child down to a leaf: where 'continue this branch' lands."""
        frame = self.get(frame_id)
        while frame.children:
            frame = self.get(frame.children[-1])
        return frame.id

    def select(self, frame_id: int) -> Frame:
        frame = self.get(frame_id)
        self.current = frame_id
        return frame


@dataclass
class Detached:
    """A deleted subtree, kept to undo the delete: its frames (parent first), its place among its siblings and the
    frame that was current."""

    frames: list
    index: int
    current: Optional[int]
