import pytest
import torch

from seedstory.prompt import IGNORE_INDEX, PromptFormat
from seedstory.tokens import ImageTokenIds, build_byte_tokenizer, neutralize_text

# ids in the word tokenizer of conftest: <s>=1 </s>=2 [=4 INST=5 ]=6 a=7 cat=8 the=9 dog=10 sun=11
# added: <img>=20 </img>=21 <img_00000..3>=22..25
BOS, EOS, B, E = 1, 2, 20, 21
SLOTS = [22, 23, 24, 25]
INST = [4, 5, 6]
IMG = [B, *SLOTS, E]


def test_image_ids_come_from_the_tokenizer(word_tokenizer):
    ids = ImageTokenIds.from_tokenizer(word_tokenizer, 4)
    assert (ids.boi, ids.eoi, list(ids.img)) == (B, E, SLOTS)


def test_missing_image_tokens_is_a_clear_error(word_tokenizer):
    with pytest.raises(ValueError, match="<img_00004>"):
        ImageTokenIds.from_tokenizer(word_tokenizer, 5)


def test_training_sample_matches_formats_section_5(word_tokenizer):
    pf = PromptFormat(word_tokenizer, 4)
    s = pf.training_sample(["a cat", "the dog", "a sun"], num_given=1)
    context = [7, 8, *IMG, *INST, 9, 10, *IMG]
    target = [*INST, 7, 11, *IMG]
    assert s.input_ids.tolist() == [BOS, *context, *target, EOS]
    expected_labels = [IGNORE_INDEX] * (1 + len(context)) + [*INST, 7, 11, B] + [IGNORE_INDEX] * 5 + [EOS]
    assert s.labels.tolist() == expected_labels
    n = len(s.input_ids)
    cmp = [False] * n
    for start in (1 + 2 + 1, 1 + len(context) - 5):  # slots after each context <img>
        cmp[start : start + 4] = [True] * 4
    assert s.ids_cmp_mask.tolist() == cmp
    gen = [False] * n
    gen[n - 6 : n - 2] = [True] * 4
    assert s.ids_gen_mask.tolist() == gen
    assert s.embeds_cmp_mask.tolist() == [True, True, False]
    assert s.embeds_gen_mask.tolist() == [False, False, True]
    assert s.attention_mask.tolist() == [1] * n


def test_label_context_teaches_every_caption_after_the_first(word_tokenizer):
    pf = PromptFormat(word_tokenizer, 4)
    caps = ["a cat", "the dog", "a dog", "a sun"]
    plain = pf.training_sample(caps, num_given=2)
    s = pf.training_sample(caps, num_given=2, label_context=True)
    assert s.input_ids.tolist() == plain.input_ids.tolist()
    context = [7, 8, *IMG, *INST, 9, 10, *IMG, *INST, 7, 10, *IMG]
    hidden = [IGNORE_INDEX] * 5  # a picture's slots and </img>: never text to learn
    expected = ([IGNORE_INDEX] * (1 + 2 + 6) + [*INST, 9, 10, B] + hidden + [*INST, 7, 10, B] + hidden
                + [*INST, 7, 11, B] + hidden + [EOS])
    assert s.labels.tolist() == expected and len(expected) == len(s.input_ids) == 1 + len(context) + 11 + 1
    for key in ("ids_cmp_mask", "ids_gen_mask", "embeds_cmp_mask", "embeds_gen_mask"):
        assert getattr(s, key).tolist() == getattr(plain, key).tolist()


def test_too_long_sample_is_dropped_and_padding(word_tokenizer):
    pf = PromptFormat(word_tokenizer, 4)
    assert pf.training_sample(["a", "a", "a"], 1, max_length=10) is None
    s = pf.training_sample(["a", "a"], 0, max_length=40, pad=True)
    assert len(s.input_ids) == 40 and s.attention_mask.sum() == 1 + 7 + 3 + 1 + 6 + 1
    assert (s.labels[s.attention_mask == 0] == IGNORE_INDEX).all()


def test_incremental_frames_equal_the_whole_context(word_tokenizer):
    pf = PromptFormat(word_tokenizer, 4)
    caps = ["a cat", "the dog ran .", "a sun"]
    ids = pf.context_ids(caps)
    whole = [BOS] + word_tokenizer.encode(pf.context_string(caps), add_special_tokens=False)
    assert ids == whole
    assert pf.frame_ids("the dog", first=False) == [*INST, 9, 10, *IMG]


@pytest.mark.parametrize("evil", ["<img>", "</img>", "<img_00001>", "< IMG >", "<img_00003></img>", "[INST]"])
def test_user_text_cannot_touch_image_slots(word_tokenizer, evil):
    pf = PromptFormat(word_tokenizer, 4)
    ids = pf.frame_ids(f"a {evil} cat", first=True)
    # Exactly one image block: ours.
    assert sum(i in (B, E, *SLOTS) for i in ids) == 6 and ids[-6:] == IMG
    s = pf.training_sample([f"a {evil}", "cat", f"x {evil}"], 1)
    assert int((s.input_ids == B).sum()) == 3 and s.ids_cmp_mask.sum() == 8 and s.ids_gen_mask.sum() == 4


def test_neutralize_text():
    assert neutralize_text("a <img_00012> b") == "a ‹img_00012› b"
    assert neutralize_text("x [INST] y") == "x INST y"
    assert neutralize_text("bell\x07 and\ttab  ") == "bell and tab"
    with pytest.raises(ValueError, match="limit"):
        neutralize_text("abc", max_chars=2)


def test_byte_tokenizer_round_trips_any_text():
    tok = build_byte_tokenizer(4)
    text = "Zoë's café — 你好 🙂"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert ImageTokenIds.from_tokenizer(tok, 4).boi == len(tok) - 6


def test_image_slot_mask_batched(word_tokenizer):
    pf = PromptFormat(word_tokenizer, 4)
    ids = torch.tensor([pf.context_ids(["a", "cat"]), pf.context_ids(["dog", "x"])])
    mask = pf.image_slot_mask(ids)
    assert mask.shape == ids.shape and mask.sum() == 16
    assert (ids[mask] >= 22).all()
