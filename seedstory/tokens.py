"""Image-token strings, their ids (always looked up through the tokenizer), and text hygiene.

The release tokenizer is Llama-2's plus ``<img>``, ``</img>`` and ``<img_00000>``..``<img_00063>``; which
ids those received is decided by the tokenizer files, never by this code.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

BOI_TOKEN = "<img>"
EOI_TOKEN = "</img>"
IMG_TOKEN = "<img_{:05d}>"
INST = "[INST]"

# Anything that looks like an image token (any case, stray spaces) or the frame marker.
_IMAGE_TOKEN_LIKE = re.compile(r"<\s*/?\s*img(?:_\s*\d+)?\s*>", re.IGNORECASE)
_INST_LIKE = re.compile(r"\[\s*/?\s*INST\s*\]", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# Bidirectional controls (embeddings, overrides, isolates, marks): a U+202E in a caption reverses how every
# later character is shown, in the caption and the story tree.
_BIDI = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


class TokenizerError(ValueError):
    pass


def image_block_string(num_img_tokens: int) -> str:
    """``<img><img_00000>...<img_{n-1}></img>`` with no spaces, as the release writes it."""
    return BOI_TOKEN + "".join(IMG_TOKEN.format(i) for i in range(num_img_tokens)) + EOI_TOKEN


@dataclass(frozen=True)
class ImageTokenIds:
    boi: int
    eoi: int
    img: tuple[int, ...]

    @property
    def block(self) -> list[int]:
        """ids of a whole image block: boi, the n image tokens, eoi."""
        return [self.boi, *self.img, self.eoi]

    @property
    def all(self) -> frozenset[int]:
        return frozenset(self.block)

    @classmethod
    def from_tokenizer(cls, tokenizer, num_img_tokens: int) -> "ImageTokenIds":
        names = [BOI_TOKEN, EOI_TOKEN] + [IMG_TOKEN.format(i) for i in range(num_img_tokens)]
        ids = []
        for name in names:
            pieces = tokenizer.encode(name, add_special_tokens=False)
            if len(pieces) != 1 or pieces[0] == tokenizer.unk_token_id:
                raise TokenizerError(
                    f"the tokenizer has no single token for {name!r} (got ids {pieces}); a SEED-Story tokenizer "
                    f"must contain <img>, </img> and <img_00000>..<img_{num_img_tokens - 1:05d}> as added tokens"
                )
            ids.append(pieces[0])
        if len(set(ids)) != len(ids):
            raise TokenizerError("image tokens of the tokenizer are not distinct")
        return cls(boi=ids[0], eoi=ids[1], img=tuple(ids[2:]))


def neutralize_text(text: str, max_chars: int | None = None) -> str:
    """Make user text safe to place in a prompt.

    Image-token look-alikes get their angle brackets swapped for ‹ › so they can never open, fill or
    close an image slot, and ``[INST]`` look-alikes lose their brackets so text cannot fake a frame
    boundary. Control and bidirectional-control characters go, whitespace is collapsed. (A tokenizer's
    own special tokens, such as ``</s>``, are defused by ``defuse_special_tokens``.)
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub(" ", text)
    text = _BIDI.sub("", text)
    text = _IMAGE_TOKEN_LIKE.sub(lambda m: "‹" + m.group(0)[1:-1] + "›", text)
    text = _INST_LIKE.sub(lambda m: m.group(0)[1:-1].strip(), text)
    text = " ".join(text.split())
    if max_chars is not None and len(text) > max_chars:
        raise ValueError(f"text is {len(text)} characters long; the limit is {max_chars}")
    return text


def special_token_strings(tokenizer) -> list[str]:
    """Every special token string ``tokenizer`` knows (its own set, not a list of ours), longest first."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token.content))
    return sorted((t for t in found if t), key=len, reverse=True)


_DEFUSE = str.maketrans({"<": "‹", ">": "›", "[": "(", "]": ")", "|": "¦"})


def defuse_special_tokens(text: str, specials: list[str]) -> str:
    """``text`` with every occurrence of a special token string turned into look-alike plain text (``</s>`` ->
    ``‹/s›``), so a visitor's words can never become an end-of-sequence or any other control token."""
    for token in specials:
        if token in text:
            safe = token.translate(_DEFUSE)
            if safe == token:  # no bracket to swap: split it so the tokenizer cannot match it whole
                safe = token[0] + " " + token[1:]
            text = text.replace(token, safe)
    return text


_SENTENCEPIECE_LLAMA = ("LlamaTokenizer", "ReleaseLlamaTokenizer")


def load_tokenizer(path: str, num_img_tokens: int | None = None):
    """Load a saved tokenizer folder from local files: a SentencePiece Llama tokenizer saved in the slow layout
    (``tokenizer.model`` without ``tokenizer.json``, class ``LlamaTokenizer``/``ReleaseLlamaTokenizer``, as
    the release's ``cvlm_llama2_tokenizer`` and its re-saves) goes through
    ``seedstory.checkpoints.release_tokenizer.load_release_tokenizer`` (same ``legacy`` rules as the release);
    anything else through ``AutoTokenizer``. ``num_img_tokens``: check the image tokens are there (None: no check)."""
    import json
    import os

    cfg_path = os.path.join(path, "tokenizer_config.json")
    cls = None
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cls = json.load(f).get("tokenizer_class")
    slow = os.path.isfile(os.path.join(path, "tokenizer.model")) and not os.path.isfile(
        os.path.join(path, "tokenizer.json"))
    if slow and cls in _SENTENCEPIECE_LLAMA:
        from .checkpoints.release_tokenizer import load_release_tokenizer

        return load_release_tokenizer(path, num_img_tokens)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if num_img_tokens is not None:
        ImageTokenIds.from_tokenizer(tok, num_img_tokens)
    return tok


def build_byte_tokenizer(num_img_tokens: int = 64):
    """A byte-level tokenizer made in code (no files, no downloads) for tiny random presets.

    256 byte tokens + <unk>, <s>, </s>, <pad>, then the image tokens as added tokens, like the release.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.add_tokens([BOI_TOKEN, EOI_TOKEN] + [IMG_TOKEN.format(i) for i in range(num_img_tokens)])
    return tok
