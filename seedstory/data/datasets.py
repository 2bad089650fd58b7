"""Streaming training datasets over StoryStream-format jsonl (one story a line: ``images``, ``captions``).

* ``StorySampleDataset`` — stage 2 (and 3): story samples serialized by ``PromptFormat.training_sample`` (the
  one serializer, docs/formats.md §5) plus the ViT inputs of every image the sample uses (none with ``text_only``).
* ``ImageDataset`` — stages 0/1: every frame image, as ViT input and as SDXL-style de-tokenizer target with
  its ``time_ids``.

Both read the jsonl line by line (a dataset larger than memory works), shuffle with a bounded buffer, and
are deterministic for (seed, epoch): a resumed run that skips the batches already seen gets the same data.
Across processes (``rank``/``world_size``) and DataLoader workers, both shard the items of the one stream a
single process would read, so N processes with batch B train on exactly one process's batches of N x B (without
DataLoader workers; with them, the same items in another order). One pass over the file is one epoch; ``set_epoch`` reseeds the next. Broken
records (bad JSON, missing fields, length mismatch, unreadable images) are skipped and counted in
``skipped``, never raised halfway through an epoch.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..image_processing import ImageProcessor
from ..prompt import IGNORE_INDEX, PromptFormat

__all__ = ["StorySampleDataset", "ImageDataset", "collate_story_samples", "collate_images", "sdxl_resize_crop"]


def sdxl_resize_crop(image: Image.Image, resolution: int, rng: Optional[random.Random] = None):
    """SDXL's training transform: shorter side to ``resolution`` (bicubic), then a center crop (or a random
    one with ``rng``). Returns (tensor [3, R, R] in [-1, 1], time_ids [6] = (orig_h, orig_w, top, left, R, R))."""
    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    if rng is None:
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
    else:
        top, left = rng.randint(0, nh - resolution), rng.randint(0, nw - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    time_ids = torch.tensor([h, w, top, left, resolution, resolution], dtype=torch.float32)
    return pixels, time_ids


class _JsonlStream(IterableDataset):
    """Buffer-shuffled, epoch-seeded stream of story records. Every process and DataLoader worker reads the same
    stream (``stream``) and keeps every shards-th item made from it (``_shard``)."""

    def __init__(self, jsonl: str, image_root: str, seed: int = 0, shuffle_buffer: int = 256, rank: int = 0,
                 world_size: int = 1):
        if not os.path.isfile(jsonl):
            raise FileNotFoundError(f"training data not found: {jsonl}")
        self.jsonl, self.image_root = jsonl, image_root
        self.seed, self.shuffle_buffer = int(seed), max(1, int(shuffle_buffer))
        self.rank, self.world_size = int(rank), max(1, int(world_size))
        self.epoch = 0
        self.skipped: Counter = Counter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _shard(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def stream_rng(self) -> random.Random:
        """The epoch's one random stream (the shuffle, the samples' windows), the same in every process."""
        return random.Random(f"{self.seed}/{self.epoch}/0/1")

    def records(self) -> Iterator[dict]:
        """The valid records, in file order."""
        with open(self.jsonl, "rb") as f:  # bytes: a line of invalid UTF-8 is one bad record, not a crash
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except (ValueError, RecursionError):  # bad JSON or encoding, absurd nesting
                    self.skipped["bad json"] += 1
                    continue
                images, captions = rec.get("images") if isinstance(rec, dict) else None, None
                if isinstance(rec, dict):
                    captions = rec.get("captions")
                if not isinstance(images, list) or not isinstance(captions, list):
                    self.skipped["missing field"] += 1
                    continue
                if len(images) != len(captions):
                    self.skipped["length mismatch"] += 1
                    continue
                yield rec

    def shuffled(self, rng: random.Random) -> Iterator[dict]:
        buf: list = []
        for rec in self.records():
            buf.append(rec)
            if len(buf) >= self.shuffle_buffer:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def load_image(self, rel: str) -> Optional[Image.Image]:
        try:
            with Image.open(os.path.join(self.image_root, rel)) as im:
                return im.convert("RGB")
        except (OSError, ValueError, TypeError, Image.DecompressionBombError):  # TypeError: a path not a string
            self.skipped["unreadable image"] += 1
            return None


class StorySampleDataset(_JsonlStream):
    """Stage-2 samples: a random number of given frames (``min_given`` .. all but the target) before a random
    target frame, within ``max_frames`` consecutive frames.

    Such a window mostly starts in the middle of a story, where its first caption ("Tansy waves at Bodo.") does
    not say who is there. ``opening_share`` of the samples instead start at the story's opening, which does
    (the story so far, up to a random target): without them an agent never learns to read an opening, and
    the engine always starts a story from one.

    Length policy: a sample longer than ``max_length`` tokens is never truncated (that could cut an image slot
    in half); its earliest context frames are dropped one by one until it fits, and the story is skipped
    (counted in ``skipped['too long']``) when even ``min_given`` frames do not fit.

    With ``text_only`` no picture is read: each image slot keeps its placeholder tokens, so the LLM learns the
    stories' text in the very layout it later reads with pictures (the agent's text pre-training)."""

    def __init__(self, jsonl: str, image_root: str, prompt: PromptFormat, image_processor: ImageProcessor,
                 max_length: int = 1280, max_frames: Optional[int] = None, min_given: int = 0, seed: int = 0,
                 shuffle_buffer: int = 256, rank: int = 0, world_size: int = 1,
                 target_image_resolution: Optional[int] = None, label_context: bool = False,
                 text_only: bool = False, opening_share: float = 0.0, possible_next=None,
                 learn_own_captions: bool = True):
        super().__init__(jsonl, image_root, seed, shuffle_buffer, rank, world_size)
        # False: a caption the agent wrote itself (``written`` of a corrected story says "agent") is read, not
        # learned: the agent is taught the world's captions in the states its stories reach, not its own habits.
        self.learn_own_captions = bool(learn_own_captions)
        self.possible_next = possible_next  # a PossibleNext: each sample also gets its captions' possible tokens
        self._possible_cache: dict = {}
        if not 0.0 <= float(opening_share) <= 1.0:
            raise ValueError(f"opening_share must be between 0 and 1, not {opening_share}")
        self.opening_share = float(opening_share)
        self.prompt, self.image_processor = prompt, image_processor
        self.label_context, self.text_only = bool(label_context), bool(text_only)
        if self.text_only and target_image_resolution:
            raise ValueError("text_only samples have no target picture")
        self.max_length, self.min_given = int(max_length), max(0, int(min_given))
        self.max_frames = int(max_frames) if max_frames else None
        if self.max_frames is not None and self.max_frames < 2:
            raise ValueError("max_frames must be at least 2 (one given frame and the target)")
        self.target_image_resolution = target_image_resolution

    def choose(self, rec: dict, rng: random.Random) -> Optional[tuple[int, int]]:
        """``(target frame, frames given before it)`` for a sample of ``rec`` (None: the story is too short)."""
        n = len(rec["captions"])
        span = min(n, self.max_frames) if self.max_frames else n
        if span < self.min_given + 2:
            return None
        if self.opening_share and rng.random() < self.opening_share:
            target = rng.randint(self.min_given + 1, span - 1)  # the window: the opening .. target
            return target, target - 1
        num_given = rng.randint(self.min_given, span - 2)
        return rng.randint(num_given + 1, n - 1), num_given

    def sample(self, rec: dict, rng: random.Random) -> Optional[dict]:
        choice = self.choose(rec, rng)
        if choice is None:
            self.skipped["too short"] += 1
            return None
        return self.build(rec, *choice)

    def build(self, rec: dict, target: int, num_given: int) -> Optional[dict]:
        """The sample whose window ends at ``target`` with ``num_given`` frames before it (fewer when it is too
        long); None when it cannot be made."""
        captions, images = rec["captions"], rec["images"]
        while num_given >= self.min_given:
            first = target - num_given - 1
            window = [str(c) for c in captions[first: target + 1]]
            try:
                encoded = self.prompt.training_sample(window, num_given, self.max_length, label_context=self.label_context)
            except ValueError:  # a caption the serializer refuses (e.g. empty)
                self.skipped["bad caption"] += 1
                return None
            if encoded is not None:
                break
            num_given -= 1
        else:
            self.skipped["too long"] += 1
            return None
        out = encoded.as_dict()
        if not self.learn_own_captions and rec.get("written"):
            self.unlabel_own(out, rec["written"][first: target + 1])
        if self.possible_next is not None:
            out["possible_ids"] = self.possible_ids(rec, first, out["input_ids"], out["labels"])
        if self.text_only:
            return out
        pictures = [self.load_image(p) for p in images[first: target + 1]]
        if any(p is None for p in pictures):
            return None
        out["pixel_values"] = self.image_processor(pictures)
        if self.target_image_resolution:
            out["sd_pixel_values"], out["time_ids"] = sdxl_resize_crop(pictures[-1], int(self.target_image_resolution))
        return out

    def unlabel_own(self, sample: dict, written: Sequence[str]) -> None:
        """No LM loss on the window's captions that ``written`` marks as the agent's: each caption is the tokens
        after the previous picture's </img> up to and including its <img>."""
        ids, labels = sample["input_ids"], sample["labels"]
        boi = (ids == self.prompt.image_ids.boi).nonzero().flatten().tolist()
        eoi = (ids == self.prompt.image_ids.eoi).nonzero().flatten().tolist()
        for i, b in enumerate(boi):
            if i and i < len(written) and written[i] == "agent":
                labels[eoi[i - 1] + 1: b + 1] = IGNORE_INDEX

    def possible_ids(self, rec: dict, first: int, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[L, K] token ids possible at each labelled caption token and caption end (-1: none given), from
        ``possible_next`` on the whole story (the story's state comes from its opening, not the window's)."""
        key = rec.get("id") or hash(tuple(rec["captions"]))
        if key not in self._possible_cache:
            per_caption = self.possible_next.for_story([str(c) for c in rec["captions"]])
            self._possible_cache[key] = [None if a is None else _ragged(a) for a in per_caption]
        per_caption = self._possible_cache[key]
        boi = self.prompt.image_ids.boi
        placed: list[tuple[int, np.ndarray]] = []  # (position of the caption's first token, its table)
        for i, b in enumerate((input_ids == boi).nonzero().flatten().tolist()):
            table = per_caption[first + i] if first + i < len(per_caption) else None
            if table is not None and labels[b] != IGNORE_INDEX:
                placed.append((b - (table.shape[0] - 1), table))  # the caption's tokens, then its <img> at b
        width = max((table.shape[1] for _, table in placed), default=1)
        out = torch.full((input_ids.shape[0], width), -1, dtype=torch.long)
        for start, table in placed:
            out[start: start + table.shape[0], : table.shape[1]] = torch.from_numpy(table.astype(np.int64))
        return out

    def __iter__(self):
        # Every process and worker walks the one stream a single process would (the same shuffle, the same random
        # windows) and makes every shards-th sample: N processes with batch B see exactly the samples of one
        # process with batch N x B, step by step.
        shard, shards = self._shard()
        rng = self.stream_rng()
        k = 0
        for rec in self.shuffled(rng):
            choice = self.choose(rec, rng)
            if choice is None:
                if shard == 0:
                    self.skipped["too short"] += 1
                continue
            k += 1
            if (k - 1) % shards == shard:
                sample = self.build(rec, *choice)
                if sample is not None:
                    sample["sample_seed"] = sample_seed(self.seed, self.epoch, k)
                    yield sample


class ImageDataset(_JsonlStream):
    """Every frame image of the stories: ViT input ``pixel_values`` and de-tokenizer target
    ``sd_pixel_values`` + ``time_ids`` (SDXL resize, center or random crop)."""

    def __init__(self, jsonl: str, image_root: str, image_processor: ImageProcessor, resolution: int,
                 random_crop: bool = False, seed: int = 0, shuffle_buffer: int = 1024, rank: int = 0,
                 world_size: int = 1):
        super().__init__(jsonl, image_root, seed, shuffle_buffer, rank, world_size)
        self.image_processor, self.resolution, self.random_crop = image_processor, int(resolution), bool(random_crop)

    def __iter__(self):
        # As StorySampleDataset: every process and worker walks the one stream of pictures a single process would
        # and loads every shards-th; a random crop is drawn from the picture's own place in that stream, so N
        # processes with batch B see exactly one process's batches of N x B.
        shard, shards = self._shard()
        rng = self.stream_rng()
        buf: list = []
        k = 0

        def emit(rel):
            nonlocal k
            k += 1
            if (k - 1) % shards != shard:
                return None
            picture = self.load_image(rel)
            if picture is None:
                return None
            crop = random.Random(f"{self.seed}/{self.epoch}/crop/{k}") if self.random_crop else None
            sd, time_ids = sdxl_resize_crop(picture, self.resolution, crop)
            return {"pixel_values": self.image_processor(picture)[0], "sd_pixel_values": sd, "time_ids": time_ids,
                    "sample_seed": sample_seed(self.seed, self.epoch, k)}

        for rec in self.shuffled(rng):
            for rel in rec["images"]:
                buf.append(rel)
                if len(buf) >= self.shuffle_buffer:
                    item = emit(buf.pop(rng.randrange(len(buf))))
                    if item is not None:
                        yield item
        rng.shuffle(buf)
        for rel in buf:
            item = emit(rel)
            if item is not None:
                yield item


def sample_seed(seed: int, epoch: int, k: int) -> torch.Tensor:
    """The seed of the k-th item of an epoch's stream (``"sample_seed"`` in every item): the item's random draws in
    training (crop, noise, timestep, dropout) follow it, whichever process or batch holds the item."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{k}".encode(), digest_size=8).digest()
    return torch.tensor(int.from_bytes(digest, "little") >> 1, dtype=torch.int64)


def _ragged(rows: list[list[int]]) -> np.ndarray:
    """Lists of token ids as one int32 table padded with -1 (compact for a cache of many stories)."""
    table = np.full((len(rows), max(len(r) for r in rows)), -1, dtype=np.int32)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    return table


def _pad_stack(seqs: Sequence[torch.Tensor], value) -> torch.Tensor:
    length = max(s.shape[0] for s in seqs)
    out = seqs[0].new_full((len(seqs), length), value)
    for i, s in enumerate(seqs):
        out[i, : s.shape[0]] = s
    return out


def collate_story_samples(samples: Sequence[dict], pad_id: int) -> dict:
    """Right-pad the per-position tensors to the batch's longest sample; concatenate the per-image ones
    (the agent takes every image of the batch in order, with ``embeds_*_mask`` saying which is which)."""
    batch = {
        "input_ids": _pad_stack([s["input_ids"] for s in samples], pad_id),
        "attention_mask": _pad_stack([s["attention_mask"] for s in samples], 0),
        "labels": _pad_stack([s["labels"] for s in samples], -100),
        "ids_cmp_mask": _pad_stack([s["ids_cmp_mask"] for s in samples], False),
        "ids_gen_mask": _pad_stack([s["ids_gen_mask"] for s in samples], False),
        "embeds_cmp_mask": torch.cat([s["embeds_cmp_mask"] for s in samples]),
        "embeds_gen_mask": torch.cat([s["embeds_gen_mask"] for s in samples]),
    }
    if "possible_ids" in samples[0]:  # [B, L, K], -1 where nothing is given
        length = batch["input_ids"].shape[1]
        width = max(s["possible_ids"].shape[1] for s in samples)
        possible = torch.full((len(samples), length, width), -1, dtype=torch.long)
        for i, s in enumerate(samples):
            p = s["possible_ids"]
            possible[i, : p.shape[0], : p.shape[1]] = p
        batch["possible_ids"] = possible
    if "pixel_values" in samples[0]:  # text-only samples have none
        batch["pixel_values"] = torch.cat([s["pixel_values"] for s in samples])
    for key in ("sd_pixel_values", "time_ids", "sample_seed"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    return batch


def collate_images(samples: Sequence[dict]) -> dict:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
