import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def word_tokenizer():
    """A word-level tokenizer whose ids can be written by hand: [ INST ] a cat the dog sun ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "<pad>", "[", "INST", "]", "a", "cat", "the", "dog", "sun", "‹", "›",
             "img_00001", "/", "img", "ran", ".", "x"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>")
    tok.add_tokens(["<img>", "</img>"] + [f"<img_{i:05d}>" for i in range(4)])
    return tok


@pytest.fixture(scope="session")
def tiny_pipeline():
    from seedstory.pipeline import SeedStoryPipeline

    return SeedStoryPipeline.from_preset("tiny")


@pytest.fixture
def opening_image():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
