"""The tiny text encoder's tokenizers: the world's words whole, anything else spelled, and the byte one of
runs saved before it."""

from __future__ import annotations

import torch

from helios.config.schema import TextEncoderConfig
from helios.model.encoders import build_text_encoder, encode_prompts
from helios.world.shapes import all_scenes


def _tokens(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)


def test_every_caption_of_the_world_fits_whole_words_and_other_text_is_spelled():
    tokenizer, _ = build_text_encoder(TextEncoderConfig(source="tiny", max_sequence_length=32))
    for scene in all_scenes():
        words = scene.caption.split()
        assert _tokens(tokenizer, scene.caption) == [*words, "</s>"]  # 10 of the 32 tokens
    assert _tokens(tokenizer, "a cat!") == ["a", "c", "##a", "##t", "!", "</s>"]
    assert _tokens(tokenizer, "") == ["</s>"]
    # the ids the cached synthetic shards and the tiny checkpoints were made with: the words first, sorted
    assert tokenizer("background yellow a").input_ids == [4, 19, 3, 1] and len(tokenizer) == 531


def test_the_byte_tokenizer_of_earlier_runs_still_encodes_as_it_did():
    cfg = TextEncoderConfig(source="tiny", max_sequence_length=32, tiny_tokenizer="bytes")
    tokenizer, encoder = build_text_encoder(cfg)
    caption = all_scenes()[0].caption
    assert _tokens(tokenizer, caption)[:3] == ["a", " ", "r"] and len(tokenizer(caption).input_ids) == 47
    words = build_text_encoder(TextEncoderConfig(source="tiny", max_sequence_length=32))
    a = encode_prompts(tokenizer, encoder, [caption], 32)
    b = encode_prompts(*words, [caption], 32)
    assert a.shape == b.shape == (1, 32, 32) and not torch.allclose(a, b)
