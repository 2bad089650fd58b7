r"""The one prompt serializer, shared by training and inference (docs/formats.md §5).

A story is captions c0, c1, ... and one image per caption. Serialized:

    [BOS] c0 IMG [INST] c1 IMG ... [INST] c_k IMG  |  [INST] c_{k+1} IMG [EOS]
    \------------------ context -----------------/    \------- target -------/

with ``IMG = <img><img_00000>..<img_{n-1}></img>``. Context images enter as features in the n slots
between ``<img>`` and ``</img>``; the target image is regressed from the final hidden states at its n
slots. Labels cover the target text, its ``<img>`` and ``[EOS]`` only.

Token-exactness: the context is one string encoded at once (as the release's data pipeline does) and
the target is encoded on its own. ``frame_ids`` produces per-frame pieces whose concatenation equals
the encoding of the whole context string, so an incremental decoder sees the same tokens as a full one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .tokens import (
    EOI_TOKEN, INST, ImageTokenIds, defuse_special_tokens, image_block_string, neutralize_text, special_token_strings,
)

IGNORE_INDEX = -100


@dataclass
class EncodedStory:
    """A serialized story. All tensors are 1-D over positions except the ``embeds_*`` masks (one per image)."""

    input_ids: torch.Tensor  # [L] long
    attention_mask: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long, -100 where not supervised
    ids_cmp_mask: torch.Tensor  # [L] bool: context image slots (filled with resampled features)
    ids_gen_mask: torch.Tensor  # [L] bool: target image slots (hidden states regressed)
    embeds_cmp_mask: torch.Tensor  # [num_images] bool: image i is a context image
    embeds_gen_mask: torch.Tensor  # [num_images] bool: image i is the target image

    def as_dict(self) -> dict:
        return dict(self.__dict__)


SPACE_MARKERS = ("\u0120", "\u2581")  # byte-level BPE's "Ġ", sentencepiece's "▁"


@dataclass
class WordForms:
    """A caption's first word is another token than the same word later on (``Wex`` vs ``ĠWex``): the
    repetition penalty's word scope treats the two as one. ``twin`` maps an id to the same text with/without
    the leading space; ``word_starts`` holds the ids that begin a word (spaced ones and their bare twins)."""

    twin: dict[int, int]
    word_starts: frozenset[int]

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "WordForms":
        vocab = tokenizer.get_vocab()  # token string -> id
        special = set(getattr(tokenizer, "all_special_ids", []))
        twin, starts = {}, set()
        for token, i in vocab.items():
            if i in special or len(token) < 2 or token[0] not in SPACE_MARKERS:
                continue
            starts.add(i)
            bare = vocab.get(token[1:])
            if bare is not None and bare not in special:
                twin[i], twin[bare] = bare, i
                starts.add(bare)
        return cls(twin, frozenset(starts))


class PromptFormat:
    """Turns story frames into token ids and masks. Image-token ids come from the tokenizer."""

    def __init__(self, tokenizer, num_img_tokens: int = 64, sanitize: bool = True):
        self.tokenizer = tokenizer
        self.num_img_tokens = num_img_tokens
        self.image_ids = ImageTokenIds.from_tokenizer(tokenizer, num_img_tokens)
        self.img_str = image_block_string(num_img_tokens)
        self.sanitize = sanitize
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs BOS and EOS tokens")
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        # Encoding "</img>" + s and dropping the first id gives exactly the ids s gets right after an
        # image block inside a longer string (the `legacy` flag decides whether that starts with "▁").
        self._eoi_prefix = tokenizer.encode(EOI_TOKEN, add_special_tokens=False)
        assert self._eoi_prefix == [self.image_ids.eoi]
        self._word_forms: Optional[WordForms] = None
        image_strings = set(tokenizer.convert_ids_to_tokens(list(self.image_ids.all)))
        self._specials = [t for t in special_token_strings(tokenizer) if t not in image_strings]
        # ids the text may never produce (an unknown piece legitimately becomes <unk>)
        self._special_ids = (set(getattr(tokenizer, "all_special_ids", []) or []) - set(self.image_ids.all)
                             - {tokenizer.unk_token_id})

    # -- text pieces -------------------------------------------------------------------------
    def clean(self, text: str) -> str:
        return defuse_special_tokens(neutralize_text(text), self._specials) if self.sanitize else text

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _encode_after_image(self, text: str) -> list[int]:
        return self._encode(EOI_TOKEN + text)[1:]

    def _check_text_ids(self, ids: Sequence[int], n_blocks: int) -> None:
        # Defence in depth: after neutralizing, image tokens may appear only inside our own blocks.
        count = sum(1 for i in ids if i in self.image_ids.all)
        if count != n_blocks * (self.num_img_tokens + 2):
            raise ValueError("text contains image tokens; they are reserved for image slots")
        if self.sanitize and any(i in self._special_ids for i in ids):
            raise ValueError("text contains a special token of the tokenizer")

    def context_string(self, captions: Sequence[str]) -> str:
        caps = [self.clean(c) for c in captions]
        return caps[0] + self.img_str + "".join(INST + c + self.img_str for c in caps[1:])

    def target_string(self, caption: str) -> str:
        return INST + self.clean(caption) + self.img_str

    def frame_ids(self, caption: str, first: bool) -> list[int]:
        """ids of one frame (its text and image block) as it appears inside a context.

        The first frame is ``c0 IMG``; every later one ``[INST] c IMG`` right after the previous block.
        """
        text = self.clean(caption) + self.img_str if first else INST + self.clean(caption) + self.img_str
        ids = self._encode(text) if first else self._encode_after_image(text)
        self._check_text_ids(ids, 1)
        return ids

    def word_forms(self) -> "WordForms":
        """Which ids spell the same word with and without a leading space (cached; see ``WordForms``)."""
        if self._word_forms is None:
            self._word_forms = WordForms.from_tokenizer(self.tokenizer)
        return self._word_forms

    def text_ids_after_image(self, text: str) -> list[int]:
        """ids of free text placed right after an image block (no image block of its own)."""
        ids = self._encode_after_image(self.clean(text))
        self._check_text_ids(ids, 0)
        return ids

    # -- whole sequences ---------------------------------------------------------------------
    def context_ids(self, captions: Sequence[str]) -> list[int]:
        """[BOS] + the context of all ``captions`` (each with its image slot), for inference."""
        ids = [self.bos_id]
        for i, c in enumerate(captions):
            ids += self.frame_ids(c, first=(i == 0))
        return ids

    def image_slot_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of the ``num_img_tokens`` positions after each ``<img>`` ([L] or [B, L])."""
        if input_ids.dim() == 2:
            return torch.stack([self.image_slot_mask(row) for row in input_ids])
        mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for b in (input_ids == self.image_ids.boi).nonzero().flatten().tolist():
            mask[b + 1 : b + 1 + self.num_img_tokens] = True
        return mask

    def training_sample(
        self, captions: Sequence[str], num_given: int, max_length: Optional[int] = None, pad: bool = False,
        label_context: bool = False,
    ) -> Optional[EncodedStory]:
        """A stage-2 sample: ``captions[0..num_given]`` as context, ``captions[num_given+1]`` as target.

        With ``label_context`` the LM loss also covers every context caption after the first (``[INST] c <img>``,
        each read after the real pictures before it): the same forward pass teaches the text of every frame
        instead of the last one only. The regression target stays the last picture.

        Images used: ``num_given + 2`` (context images then the target). Returns None when the sample
        is longer than ``max_length`` (the release drops such samples rather than truncating them, as a
        truncated sample would cut an image slot in half). With ``pad`` the sample is right-padded.
        """
        if not 0 <= num_given <= len(captions) - 2:
            raise ValueError(f"num_given must be in [0, {len(captions) - 2}] for {len(captions)} captions")
        context = self.context_string(captions[: num_given + 1])
        target = self.target_string(captions[num_given + 1])
        ctx_ids, tgt_ids = self._encode(context), self._encode(target)
        self._check_text_ids(ctx_ids, num_given + 1)
        self._check_text_ids(tgt_ids, 1)
        input_ids = [self.bos_id] + ctx_ids + tgt_ids + [self.eos_id]
        labels = [IGNORE_INDEX] * (1 + len(ctx_ids)) + tgt_ids + [self.eos_id]
        if label_context:
            # ids after each context picture's </img>, up to and including the next <img>: [INST] c <img>
            inside = False
            for i, t in enumerate(ctx_ids):
                if inside:
                    labels[1 + i] = t
                if t == self.image_ids.eoi:
                    inside = True
                elif t == self.image_ids.boi:
                    inside = False
        if max_length is not None and len(input_ids) >= max_length:
            return None
        n = len(input_ids)
        attention = [1] * n
        if pad and max_length is not None:
            extra = max_length - n
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
            input_ids += [pad_id] * extra
            labels += [IGNORE_INDEX] * extra
            attention += [0] * extra
        ids = torch.tensor(input_ids, dtype=torch.long)
        labels_t = torch.tensor(labels, dtype=torch.long)
        slots = self.image_slot_mask(ids)
        boi_pos = (ids == self.image_ids.boi).nonzero().flatten().tolist()
        gen = torch.zeros_like(slots)
        last = boi_pos[-1]
        gen[last + 1 : last + 1 + self.num_img_tokens] = True
        # Unsupervised: the target's image tokens and </img> (the model is forced through them).
        labels_t[last + 1 : last + 2 + self.num_img_tokens] = IGNORE_INDEX
        n_images = num_given + 2
        return EncodedStory(
            input_ids=ids,
            attention_mask=torch.tensor(attention, dtype=torch.long),
            labels=labels_t,
            ids_cmp_mask=slots & ~gen,
            ids_gen_mask=gen,
            embeds_cmp_mask=torch.tensor([True] * (n_images - 1) + [False]),
            embeds_gen_mask=torch.tensor([False] * (n_images - 1) + [True]),
        )
