"""The released tokenizer (``cvlm_llama2_tokenizer/``; docs/formats.md §5): Llama-2's SentencePiece model plus
66 added tokens, loaded as the slow SentencePiece Llama tokenizer the release ran with (on transformers 5, an
equivalent with the same rules). ``load_release_tokenizer(dir)``.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping
from typing import Optional

from .files import CheckpointError
from .layout import require_file
from .validation import first_few

SPIECE_UNDERLINE = "\u2581"
# A second NormalizerSpec (ModelProto field 3) holding add_dummy_prefix=false (field 3, varint 0). Protobuf
# merges repeated message fields, so appending it turns the dummy prefix off without the protobuf package.
_NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


@functools.lru_cache(maxsize=None)
def _tokenizer_class():
    """The slow SentencePiece Llama tokenizer of transformers 4.x (what the release used), or, on
    transformers 5 where that class is gone, a SentencePiece-backed equivalent with the same rules."""
    import transformers

    slow = getattr(transformers, "LlamaTokenizer", None)
    if slow is not None and hasattr(slow, "get_spm_processor"):
        return slow

    import sentencepiece as spm
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    class ReleaseLlamaTokenizer(SentencePieceBackend):
        """transformers-4.34 ``LlamaTokenizer`` rules: with ``legacy`` every chunk between added tokens gets
        SentencePiece's dummy prefix (so text right after ``</img>`` starts with "▁"); without it only the
        start of the text does. BOS is prepended, EOS not (``add_bos_token``/``add_eos_token``)."""

        vocab_files_names = {"vocab_file": "tokenizer.model"}
        model_input_names = ["input_ids", "attention_mask"]

        def __init__(self, vocab_file=None, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token=None,
                     add_bos_token=True, add_eos_token=False, legacy=True, clean_up_tokenization_spaces=False,
                     **kwargs):
            self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
            legacy = True if legacy is None else bool(legacy)
            kwargs.pop("sp_model_kwargs", None)
            super().__init__(vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
                             pad_token=pad_token, add_bos_token=add_bos_token, add_eos_token=add_eos_token,
                             clean_up_tokenization_spaces=clean_up_tokenization_spaces, legacy=True, **kwargs)
            self.legacy = self.init_kwargs["legacy"] = legacy
            if not legacy:
                with open(vocab_file, "rb") as f:
                    proto = f.read()
                self.sp_model = spm.SentencePieceProcessor()
                self.sp_model.LoadFromSerializedProto(proto + _NO_DUMMY_PREFIX)

        @property
        def unk_token_length(self) -> int:
            return len(self.sp_model.encode(str(self.unk_token)))

        def tokenize(self, text, **kwargs):
            if self.legacy or len(text) == 0:
                return super().tokenize(text, **kwargs)
            tokens = super().tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "), **kwargs)
            if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
                tokens = tokens[1:]
            return tokens

        def _tokenize(self, text, **kwargs):
            if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
                return self.sp_model.encode(text, out_type=str)
            tokens = self.sp_model.encode(self.unk_token + text, out_type=str)
            n = self.unk_token_length
            return tokens[n:] if len(tokens) >= n else tokens

        def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
            bos = [self.bos_token_id] if self.add_bos_token else []
            eos = [self.eos_token_id] if self.add_eos_token else []
            out = bos + token_ids_0 + eos
            return out if token_ids_1 is None else out + bos + token_ids_1 + eos

        def convert_tokens_to_string(self, tokens):
            tokens = list(tokens)
            if tokens and tokens[0].startswith(SPIECE_UNDERLINE):
                tokens[0] = tokens[0][1:]
            out, sub, prev_special = "", [], False
            for i, token in enumerate(tokens):
                if token in self.all_special_tokens:
                    if not prev_special and i != 0 and self.legacy:
                        out += " "
                    out += self.sp_model.decode(sub) + token
                    prev_special, sub = True, []
                else:
                    sub.append(token)
                    prev_special = False
            return out + self.sp_model.decode(sub)

    return ReleaseLlamaTokenizer


def tokenizer_config(path: str) -> dict:
    """``tokenizer_config.json`` of a tokenizer folder; ``{}`` when there is none."""
    cfg_path = os.path.join(path, "tokenizer_config.json")
    tok_cfg = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            tok_cfg = json.load(f)
    return tok_cfg


def declared_token_ids(path: str, tok_cfg: Mapping) -> dict[str, int]:
    """``{token: id}`` of the added tokens a tokenizer folder declares: ``added_tokens.json``, then the
    ``added_tokens_decoder`` of its ``tokenizer_config.json`` (``tok_cfg``) for tokens that file does not name."""
    declared = {}
    added_path = os.path.join(path, "added_tokens.json")
    if os.path.isfile(added_path):
        with open(added_path) as f:
            declared.update(json.load(f))
    for idx, spec in (tok_cfg.get("added_tokens_decoder") or {}).items():
        declared.setdefault(spec["content"] if isinstance(spec, dict) else str(spec), int(idx))
    return declared


def load_release_tokenizer(path: str, num_img_tokens: Optional[int] = 64):
    """``cvlm_llama2_tokenizer/`` (``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json``,
    ``added_tokens.json``) -> the slow SentencePiece Llama tokenizer, from local files only.

    ``legacy`` comes from ``tokenizer_config.json`` (absent: True, the transformers-4.34 default the release
    ran with). Added-token ids come from the files and are checked after loading; the image tokens
    (``<img>``, ``</img>``, ``<img_00000>``..) must each be one token."""
    from ..tokens import ImageTokenIds, TokenizerError

    require_file(path, ("tokenizer",), is_dir=True)
    require_file(os.path.join(path, "tokenizer.model"), ("tokenizer",))
    tok_cfg = tokenizer_config(path)
    legacy = tok_cfg.get("legacy")
    legacy = True if legacy is None else bool(legacy)
    try:
        tok = _tokenizer_class().from_pretrained(path, legacy=legacy, local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot load the Llama tokenizer ({type(e).__name__}: {e})") from e

    declared = declared_token_ids(path, tok_cfg)
    wrong = [(t, i, tok.convert_tokens_to_ids(t)) for t, i in declared.items() if tok.convert_tokens_to_ids(t) != i]
    if wrong:
        raise CheckpointError(f"{path}: added tokens got other ids than the files give (token, file id, "
                              f"loaded id): {first_few(wrong)}")
    if num_img_tokens is None:  # no image-token check
        return tok
    try:
        ImageTokenIds.from_tokenizer(tok, num_img_tokens)
    except TokenizerError as e:
        raise CheckpointError(f"{path}: not a SEED-Story tokenizer: {e}") from e
    return tok


__all__ = ["declared_token_ids", "load_release_tokenizer", "tokenizer_config"]
