"""Train a small byte-level BPE text tokenizer on story captions, with the image tokens added as the
release's tokenizer has them (``<img>``, ``</img>``, ``<img_00000>``..), for models trained from scratch.

    python -m training.text_tokenizer --jsonl data/world/train.jsonl --vocab-size 1024 --out DIR
"""
from __future__ import annotations

import argparse
import json
from typing import Iterable, Iterator

from seedstory.tokens import BOI_TOKEN, EOI_TOKEN, IMG_TOKEN, INST

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def captions_from_jsonl(paths: Iterable[str]) -> Iterator[str]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                for caption in record.get("captions", []):
                    if isinstance(caption, str):
                        yield caption


def train_tokenizer(texts: Iterable[str], vocab_size: int, num_img_tokens: int = 64):
    """A PreTrainedTokenizerFast: byte-level BPE (no unknown characters ever) + the image tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The frame marker is frequent in every prompt: let BPE see it.
    core.train_from_iterator((t for text in texts for t in (text, INST + text)), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.add_tokens([BOI_TOKEN, EOI_TOKEN] + [IMG_TOKEN.format(i) for i in range(num_img_tokens)])
    return tok


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jsonl", nargs="+", required=True, help="StoryStream-style jsonl files with captions")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--num-img-tokens", type=int, default=64)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    tok = train_tokenizer(captions_from_jsonl(args.jsonl), args.vocab_size, args.num_img_tokens)
    tok.save_pretrained(args.out)
    print(f"wrote {args.out}: {len(tok)} tokens")
    return args.out


if __name__ == "__main__":
    main()
