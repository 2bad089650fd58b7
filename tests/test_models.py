import math
import os

import pytest
import torch
import torch.nn.functional as F

from seedstory.models.agent import DecodingConfig, SeedStoryAgent, cosine_loss
from seedstory.models.kv import kv_length
from seedstory.models.qwen_resampler import QwenResampler, resize_pos_table, sincos_2d
from seedstory.models.qwen_vit import QwenVisionTransformer, VisualAttention
from seedstory.models.resampler_xl import ResamplerXL
from seedstory.prompt import PromptFormat
from seedstory.tokens import build_byte_tokenizer


def small_vit(**kw):
    cfg = dict(image_size=56, patch_size=14, width=32, layers=2, heads=2, mlp_width=64, n_queries=16,
               output_dim=32, pool_heads=2, pos_table_size=16)
    cfg.update(kw)
    return QwenVisionTransformer(**cfg).eval()


def test_vit_shapes_and_pos_table_resize():
    torch.manual_seed(0)
    vit = small_vit(image_size=112)  # 8x8 patches from a 4x4 table
    out = vit(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 16, 32)
    table = vit.positional_embedding.detach()
    resized = resize_pos_table(table, 64)
    manual = F.interpolate(table.reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(8, 8), mode="bicubic",
                           align_corners=False).permute(0, 2, 3, 1).reshape(64, -1)
    assert torch.allclose(resized, manual)
    assert resize_pos_table(table, 16) is table


def test_vit_attention_uses_head_major_fused_qkv():
    torch.manual_seed(0)
    attn = VisualAttention(12, 3).eval()
    x = torch.randn(2, 5, 12)
    w, b = attn.in_proj.weight, attn.in_proj.bias
    heads = []
    for h in range(3):
        rows = slice(h * 12, h * 12 + 12)  # q, k, v rows of head h, 4 each
        qkv = x @ w[rows].T + b[rows]
        q, k, v = qkv[..., :4], qkv[..., 4:8], qkv[..., 8:]
        heads.append(torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v)
    expected = attn.out_proj(torch.cat(heads, -1))
    assert torch.allclose(attn(x), expected, atol=1e-6)


def test_unconditional_features_are_the_zero_image():
    vit = small_vit()
    assert torch.allclose(vit.unconditional_features(), vit(torch.zeros(1, 3, 56, 56)))


def test_qwen_resampler_shapes_and_sincos():
    r = QwenResampler(grid_size=4, embed_dim=16, num_heads=4, kv_dim=8).eval()
    assert r(torch.randn(3, 36, 8)).shape == (3, 16, 16)
    assert isinstance(r.kv_proj, torch.nn.Linear) and not r.pos_embed.requires_grad
    table = sincos_2d(16, 4)
    # position (row 1, col 2): first half encodes the column index w, second half the row index h.
    omega = 1.0 / 10000 ** (torch.arange(4) / 4.0)
    expected = torch.cat([torch.sin(2 * omega), torch.cos(2 * omega), torch.sin(1 * omega), torch.cos(1 * omega)])
    assert torch.allclose(table[1 * 4 + 2], expected, atol=1e-6)
    assert isinstance(QwenResampler(grid_size=2, embed_dim=8, num_heads=2, kv_dim=8).kv_proj, torch.nn.Identity)


def test_resampler_xl_normalizes_over_tokens():
    torch.manual_seed(0)
    r = ResamplerXL(dim=32, depth=2, dim_head=8, heads=4, num_queries=8, embedding_dim=24, output1_dim=16,
                    output2_dim=20).eval()
    x = torch.randn(2, 10, 24)
    embeds, pooled = r(x)
    assert embeds.shape == (2, 8, 36) and pooled.shape == (2, 20)
    # Normalizing over dim 1 means scaling one channel across all tokens changes nothing...
    scaled = x.clone()
    scaled[:, :, 3] *= 7.0
    assert torch.allclose(r(scaled)[0], embeds, atol=1e-5)
    # ...while scaling one token across channels does.
    scaled = x.clone()
    scaled[:, 2] *= 7.0
    assert not torch.allclose(r(scaled)[0], embeds, atol=1e-3)


def tiny_agent(n_img=16, vit_dim=32):
    torch.manual_seed(0)
    tok = build_byte_tokenizer(n_img)
    agent = SeedStoryAgent.from_config(dict(
        llm=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                 bos_token_id=1, eos_token_id=2, pad_token_id=3),
        input_resampler=dict(grid_size=int(math.isqrt(n_img)), embed_dim=64, num_heads=4, kv_dim=vit_dim),
        output_resampler=dict(grid_size=4, embed_dim=vit_dim, num_heads=4, kv_dim=64))).eval()
    return agent, tok, PromptFormat(tok, n_img)


def test_agent_forward_losses():
    agent, tok, pf = tiny_agent()
    s = pf.training_sample(["a cat", "a dog", "the end"], 1)
    images = torch.randn(3, 16, 32)
    out = agent(s.input_ids[None], s.attention_mask[None], s.labels[None], images, s.embeds_gen_mask,
                s.embeds_cmp_mask, s.ids_gen_mask[None], s.ids_cmp_mask[None], return_recon_image_embeds=True)
    logits = out["logits"][0, :-1]
    labels = s.labels[1:]
    assert torch.allclose(out["lm_loss"], F.cross_entropy(logits, labels, ignore_index=-100), atol=1e-5)
    assert torch.allclose(out["rec_loss"], cosine_loss(out["recon_image_embeds"], images[2:]))
    assert torch.allclose(out["total_loss"], out["lm_loss"] + out["rec_loss"])
    # The context images really enter: changing one changes the loss.
    images2 = images.clone()
    images2[0] += 1.0
    out2 = agent(s.input_ids[None], s.attention_mask[None], s.labels[None], images2, s.embeds_gen_mask,
                 s.embeds_cmp_mask, s.ids_gen_mask[None], s.ids_cmp_mask[None])
    assert not torch.allclose(out2["lm_loss"], out["lm_loss"])
    out["total_loss"].backward()
    assert agent.output_resampler.query.grad is not None and agent.input_resampler.query.grad is not None


def test_incremental_prefill_equals_full_and_block_equals_forcing():
    agent, tok, pf = tiny_agent()
    images = torch.randn(2, 16, 32)
    ids = torch.tensor(pf.context_ids(["a cat", "a dog"]))
    mask = pf.image_slot_mask(ids)
    logits, hidden, kv = agent.prefill(ids, images, mask)
    n = 1 + len(pf.frame_ids("a cat", first=True))
    _, _, kv1 = agent.prefill(ids[:n], images[:1], mask[:n])
    logits2, hidden2, _ = agent.prefill(ids[n:], images[1:], mask[n:], kv=kv1)
    assert torch.allclose(logits, logits2, atol=1e-5) and torch.allclose(hidden[n:], hidden2, atol=1e-5)
    feats, after, kv_b = agent.image_block(kv, pf.image_ids)
    hs, kv_t = [], kv
    for t in pf.image_ids.block:
        lt, ht, kv_t = agent.prefill(torch.tensor([t]), kv=kv_t)
        hs.append(ht)
    forced = agent.output_resampler(torch.cat(hs)[1:17][None])
    assert feats.shape == (1, 16, 32)
    assert torch.allclose(feats, forced, atol=1e-5) and torch.allclose(after, lt, atol=1e-5)


def test_decode_text_never_emits_image_slots_and_sampling_is_seeded():
    agent, tok, pf = tiny_agent()
    ids = torch.tensor(pf.context_ids(["a cat"]))
    logits, _, kv = agent.prefill(ids, torch.randn(1, 16, 32), pf.image_slot_mask(ids))
    # Make the image-slot tokens the most likely: they must still never be chosen.
    logits = logits.clone()
    logits[list(pf.image_ids.img)] = 1e4
    logits[pf.image_ids.eoi] = 1e4
    r = agent.decode_text(logits, kv, pf.image_ids, tok.eos_token_id, DecodingConfig(max_new_tokens=5))
    assert r.stop in ("length", "image", "eos") and not set(r.ids) & pf.image_ids.all
    cfg = DecodingConfig(do_sample=True, temperature=1.5, top_p=0.9, max_new_tokens=6)
    a = agent.decode_text(logits, kv, pf.image_ids, 2, cfg, torch.Generator().manual_seed(1)).ids
    b = agent.decode_text(logits, kv, pf.image_ids, 2, cfg, torch.Generator().manual_seed(1)).ids
    c = agent.decode_text(logits, kv, pf.image_ids, 2, cfg, torch.Generator().manual_seed(2)).ids
    assert a == b and a != c


def test_repetition_penalty_pushes_down_recent_and_written_tokens():
    agent, tok, pf = tiny_agent()
    ids = torch.tensor(pf.context_ids(["a cat"]))
    _, _, kv = agent.prefill(ids, torch.randn(1, 16, 32), pf.image_slot_mask(ids))
    eos = tok.eos_token_id
    a, b = 40, 41
    logits = torch.full((agent.llm.config.vocab_size,), -3.0)
    logits[a], logits[b] = 5.0, 4.0

    def first(penalty, recent=()):
        cfg = DecodingConfig(max_new_tokens=1, repetition_penalty=penalty)
        return agent.decode_text(logits, kv, pf.image_ids, eos, cfg, recent=recent).ids[0]

    assert first(1.0, [a]) == a          # off
    assert first(1.1, [a]) == a          # 5 / 1.1 still beats 4
    assert first(2.0, [a]) == b          # 5 / 2 does not
    assert first(2.0, [b]) == a          # only what was recent is penalized
    logits[:] = -3.0
    logits[a] = -1.0                     # negative logits are multiplied, so they fall too
    assert first(1.0, [a]) == a and first(4.0, [a]) != a
    # without ``recent`` the text written so far is penalized: greedy never repeats a token at penalty 10
    cfg = DecodingConfig(max_new_tokens=12, min_new_tokens=12, repetition_penalty=10.0)
    logits[:] = 0.0
    written = agent.decode_text(logits + torch.randn_like(logits), kv, pf.image_ids, eos, cfg).ids
    assert len(written) == 12
    assert len(set(written)) > 6, written


def test_word_forms_pair_a_word_with_its_spaced_form():
    from seedstory.config import REPO_ROOT
    from seedstory.prompt import WordForms
    from seedstory.tokens import load_tokenizer

    tok = load_tokenizer(os.path.join(REPO_ROOT, "assets", "demo-model", "tokenizer"), 16)
    forms = WordForms.from_tokenizer(tok)
    wex, spaced_wex, ing, dot = tok.convert_tokens_to_ids(["Wex", "\u0120Wex", "ing", "."])
    # a caption's first word and the same word later on are two tokens
    middle = tok.encode(" waves at", add_special_tokens=False)
    assert tok.encode("Wex waves at Wex.", add_special_tokens=False) == [wex, *middle, spaced_wex, dot]
    assert forms.twin[wex] == spaced_wex and forms.twin[spaced_wex] == wex
    assert {wex, spaced_wex} <= forms.word_starts
    assert not {ing, dot} & forms.word_starts  # inner pieces and punctuation never start a word
    assert not set(tok.all_special_ids) & (set(forms.twin) | forms.word_starts)


def test_repetition_scope_counts_a_word_with_or_without_its_space(monkeypatch):
    from seedstory.prompt import WordForms

    agent, tok, pf = tiny_agent()
    ids = torch.tensor(pf.context_ids(["a cat"]))
    _, _, kv = agent.prefill(ids, torch.randn(1, 16, 32), pf.image_slot_mask(ids))
    eos = tok.eos_token_id
    word, spaced, piece, other = 40, 41, 42, 43
    forms = WordForms(twin={word: spaced, spaced: word}, word_starts=frozenset({word, spaced}))
    logits = torch.full((agent.llm.config.vocab_size,), -3.0)

    def first(scope, recent):
        cfg = DecodingConfig(max_new_tokens=1, repetition_penalty=2.0, repetition_scope=scope)
        return agent.decode_text(logits, kv, pf.image_ids, eos, cfg, recent=recent, word_forms=forms).ids[0]

    logits[spaced], logits[other] = 5.0, 4.0
    assert first("tokens", [word]) == spaced       # as transformers: another token, not penalized
    assert first("words", [word]) == other         # the same word: 5 / 2 < 4
    assert first("word_starts", [word]) == other
    logits[spaced], logits[piece] = -3.0, 5.0
    assert first("tokens", [piece]) == other
    assert first("words", [piece]) == other
    assert first("word_starts", [piece]) == piece  # a word's inner piece is never penalized
    # the text written so far counts the same way: after ``word`` the next logits favour its spaced twin
    logits[piece], logits[word] = -3.0, 9.0
    after = logits.clone()
    after[word], after[spaced] = -3.0, 5.0
    monkeypatch.setattr(agent, "_next_logits", lambda ids, cache, pos: (after.expand(len(ids), -1), cache))

    def written(scope):
        cfg = DecodingConfig(max_new_tokens=2, min_new_tokens=2, repetition_penalty=2.0, repetition_scope=scope)
        return agent.decode_text(logits, kv, pf.image_ids, eos, cfg, word_forms=forms).ids

    assert written("tokens") == [word, spaced]
    assert written("words") == [word, other]
    with pytest.raises(ValueError, match="needs the tokenizer's word_forms"):
        agent.decode_text(logits, kv, pf.image_ids, eos, DecodingConfig(repetition_scope="words"))


def test_decode_text_scores_the_caption_it_draws(monkeypatch):
    """``logprob``: log p(text, stop) under the decoder's logits before temperature, what ranks caption candidates."""
    agent, tok, pf = tiny_agent()
    ids = torch.tensor(pf.context_ids(["a cat"]))
    _, _, kv = agent.prefill(ids, torch.randn(1, 16, 32), pf.image_slot_mask(ids))
    eos = tok.eos_token_id
    first = torch.full((agent.llm.config.vocab_size,), -3.0)
    first[40], first[41] = 2.0, 1.0
    after = torch.full_like(first, -3.0)
    after[eos] = 4.0
    monkeypatch.setattr(agent, "_next_logits", lambda ids, cache, pos: (after.expand(len(ids), -1), cache))
    result = agent.decode_text(first, kv, pf.image_ids, eos, DecodingConfig(max_new_tokens=4))
    # scored by the distribution drawn from: the image tokens other than <img> are masked out, and at the first
    # step (the minimum length) EOS and <img> as well
    masked = sorted(pf.image_ids.all - {pf.image_ids.boi})

    def log_p(logits, token, also=()):
        logits = logits.clone()
        logits[masked + list(also)] = float("-inf")
        return float(torch.log_softmax(logits, dim=-1)[token])

    assert result.ids == [40] and result.stop == "eos"
    start = (eos, pf.image_ids.boi)
    assert result.logprob == pytest.approx(log_p(first, 40, start) + log_p(after, eos))
    # a draw at a high temperature is scored by the same untempered distribution
    hot = DecodingConfig(do_sample=True, temperature=5.0, max_new_tokens=1)
    drawn = agent.decode_text(first, kv, pf.image_ids, eos, hot, torch.Generator().manual_seed(0))
    assert drawn.logprob == pytest.approx(log_p(first, drawn.ids[0], start))


def test_decode_texts_in_one_batch_is_each_caption_decoded_alone(monkeypatch):
    """n captions drawn as one batch: each row's ids, cache and score are what feeding its text alone gives, also when
    the rows stop at different lengths (a finished row is fed on, and what it adds is never read)."""
    agent, tok, pf = tiny_agent()
    ids = torch.tensor(pf.context_ids(["a cat"]))
    logits, _, kv = agent.prefill(ids, torch.randn(1, 16, 32), pf.image_slot_mask(ids))
    eos = tok.eos_token_id
    bias = torch.zeros_like(logits)
    bias[eos] = 7.0  # EOS about as likely as any other token: the rows stop at different lengths
    step = agent._next_logits

    def biased_step(ids, cache, pos):
        next_logits, cache = step(ids, cache, pos)
        return next_logits + bias, cache

    monkeypatch.setattr(agent, "_next_logits", biased_step)
    cfg = DecodingConfig(do_sample=True, temperature=1.5, max_new_tokens=6, repetition_penalty=1.3)
    rows = agent.decode_texts(logits + bias, kv, pf.image_ids, eos, cfg, 6, torch.Generator().manual_seed(3),
                              recent=[40, 41])
    assert len({len(r.ids) for r in rows}) > 1 and {r.stop for r in rows} > {"length"}
    banned = sorted(pf.image_ids.all - {pf.image_ids.boi})
    for row in rows:
        assert 1 <= len(row.ids) <= 6 and row.stop in ("image", "eos", "length")
        assert (row.stop == "length") == (len(row.ids) == 6)
        # the cache: the context, then this row's text, as feeding it after the context gives
        _, _, alone = agent.prefill(torch.tensor(row.ids), kv=kv)
        assert kv_length(row.kv) == kv_length(kv) + len(row.ids)
        for (k, v), (k2, v2) in zip(row.kv, alone):
            assert torch.allclose(k, k2, atol=1e-5) and torch.allclose(v, v2, atol=1e-5)
        # the score: each token under the penalized, masked logits before it (the context's, then its own)
        seen, total, step_logits = {40, 41}, 0.0, logits + bias
        chosen = row.ids + ([] if row.stop == "length" else [pf.image_ids.boi if row.stop == "image" else eos])
        for i, token in enumerate(chosen):
            scores = step_logits.clone()
            for t in seen:
                scores[t] = scores[t] / 1.3 if scores[t] > 0 else scores[t] * 1.3
            scores[banned] = float("-inf")
            if i == 0:
                scores[[eos, pf.image_ids.boi]] = float("-inf")
            total += float(torch.log_softmax(scores, dim=-1)[token])
            seen.add(token)
            if i < len(row.ids):
                step_logits = agent.prefill(torch.tensor(row.ids[: i + 1]), kv=kv)[0] + bias
        assert row.logprob == pytest.approx(total, abs=1e-4)
        # the logits after its last fed token
        assert torch.allclose(row.next_logits, agent.prefill(torch.tensor(row.ids), kv=kv)[0] + bias, atol=1e-4)
    # greedy rows are the one greedy caption
    greedy = agent.decode_texts(logits, kv, pf.image_ids, eos, DecodingConfig(max_new_tokens=6), 3)
    one = agent.decode_text(logits, kv, pf.image_ids, eos, DecodingConfig(max_new_tokens=6))
    assert [r.ids for r in greedy] == [one.ids] * 3


def test_engine_keeps_the_likeliest_new_caption_of_its_candidates(tiny_pipeline, opening_image, monkeypatch):
    from seedstory.engine import StoryEngine

    engine = StoryEngine(tiny_pipeline, mode="window", window=4)
    tree = engine.start(opening_image, "Pim is on the left.")
    opening = tree.get(tree.current)
    base = tiny_pipeline.settings.replace(do_sample=True, max_new_tokens=8, num_inference_steps=1,
                                          no_repeat_captions=3)
    agent, real_decode, real_display = tiny_pipeline.agent, tiny_pipeline.agent.decode_texts, engine.display_text
    scores, draws = [], []

    def decode(*args, **kwargs):
        results = real_decode(*args, **kwargs)
        for result in results:
            result.logprob = scores[len(draws)]
            draws.append(result.ids)
        return results

    # a step's first draw reads as a copy of the opening caption: the likeliest, but a repeat
    monkeypatch.setattr(agent, "decode_texts", decode)
    monkeypatch.setattr(engine, "display_text",
                        lambda ids: "Pim is on the left." if ids is draws[0] else real_display(ids))
    scores[:] = [-1.0, -6.0, -2.0, -4.0]
    frame = engine.step(tree, opening.id, settings=base.replace(caption_candidates=4), seed=5)
    assert len(draws) == 4 and frame.text == real_display(draws[2])  # of the new ones, the likeliest
    assert frame.token_ids[: len(draws[2])] == draws[2]  # the cache holds the kept caption's tokens
    # one candidate: the first new draw, as before
    draws.clear()
    frame = engine.step(tree, opening.id, settings=base, seed=5)
    assert len(draws) == 2 and frame.text == real_display(draws[1])
    # greedy: every draw would be the same caption, so one is drawn
    draws.clear()
    engine.step(tree, opening.id, settings=base.replace(caption_candidates=4, do_sample=False), seed=5)
    assert len(draws) == 1
    with pytest.raises(Exception, match="caption_candidates must be between 1"):
        base.replace(caption_candidates=0)


def test_engine_redraws_a_caption_that_repeats_a_recent_one(tiny_pipeline, opening_image, monkeypatch):
    from seedstory.engine import CAPTION_RETRIES, StoryEngine, repeated_captions

    engine = StoryEngine(tiny_pipeline, mode="window", window=4)
    tree = engine.start(opening_image, "Pim is on the left.")
    opening = tree.get(tree.current)
    base = tiny_pipeline.settings.replace(do_sample=True, max_new_tokens=8, num_inference_steps=1)
    guard = base.replace(no_repeat_captions=3)
    # what a caption may not repeat: the last N on the path, compared without case or spacing; off when
    # greedy (another draw would be the same text) or N = 0
    assert repeated_captions([opening], guard) == {"pim is on the left."}
    assert repeated_captions([opening], base) == set()
    assert repeated_captions([opening], guard.replace(do_sample=False)) == set()
    draws, real_display = [], engine.display_text

    def display(ids, repeat_first=1):
        draws.append(list(ids))
        # the first ``repeat_first`` draws come out as a copy of the opening caption
        return "  PIM is on the LEFT. " if len(draws) <= repeat_first else real_display(ids)

    monkeypatch.setattr(engine, "display_text", display)
    frame = engine.step(tree, opening.id, settings=guard, seed=5)
    assert len(draws) == 2 and frame.text == real_display(draws[1])
    assert draws[0] != draws[1]  # the retry is another draw, not the same one again
    # the frame's tokens are those of the caption it kept, so the KV cache matches its text
    assert frame.token_ids[: len(draws[1])] == draws[1]
    draws.clear()
    engine.step(tree, opening.id, settings=base, seed=5)
    assert len(draws) == 1  # off: the copy is kept
    draws.clear()
    monkeypatch.setattr(engine, "display_text", lambda ids: display(ids, repeat_first=99))
    stuck = engine.step(tree, opening.id, settings=guard, seed=5)
    assert len(draws) == 1 + CAPTION_RETRIES and stuck.text.strip()  # gives up and keeps the likeliest draw
    with pytest.raises(Exception, match="no_repeat_captions"):
        base.replace(no_repeat_captions=-1)


def test_engine_penalizes_the_previous_caption_and_off_changes_nothing(tiny_pipeline, opening_image, monkeypatch):
    from seedstory.engine import StoryEngine

    engine = StoryEngine(tiny_pipeline, mode="window", window=4)
    tree = engine.start(opening_image, "Pim is on the left.")
    opening = tree.get(tree.current)
    off = tiny_pipeline.settings.replace(repetition_penalty=1.0, do_sample=False, num_inference_steps=1)
    assert engine._penalized(opening, off) == []
    on = off.replace(repetition_penalty=1.3)
    assert engine._penalized(opening, on) == engine.prompt.text_ids_after_image("Pim is on the left.")
    a = engine.step(tree, opening.id, settings=off, seed=3)
    b = engine.step(tree, opening.id, settings=tiny_pipeline.settings.replace(do_sample=False, num_inference_steps=1),
                    seed=3)
    assert a.text == b.text  # the default (1.0) is off
    # the scope reaches the decoder with the tokenizer's word forms
    seen, decode = [], tiny_pipeline.agent.decode_texts

    def spy(*args, **kw):
        seen.append((args[4].repetition_scope, kw["word_forms"]))
        return decode(*args, **kw)

    monkeypatch.setattr(tiny_pipeline.agent, "decode_texts", spy)
    for scope in ("tokens", "words", "word_starts"):
        engine.step(tree, opening.id, settings=on.replace(repetition_scope=scope), seed=3)
    assert [s for s, _ in seen] == ["tokens", "words", "word_starts"]
    assert seen[0][1] is None and seen[1][1] is engine.prompt.word_forms() is seen[2][1]
    with pytest.raises(Exception, match="repetition_scope must be one of"):
        off.replace(repetition_scope="letters")
    with pytest.raises(Exception, match="repetition_penalty"):
        off.replace(repetition_penalty=0.5)
