"""The offline GPT-2 tokenizer matches GPT-2's published vocabulary."""

from __future__ import annotations

import re

from distrib_gpt.tokenizer import EOT_ID, VOCAB_SIZE, gpt2_encoding, ranks_sha256


def test_known_gpt2_ids():
    enc = gpt2_encoding()
    assert enc.name == "gpt2"
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode_ordinary("\n") == [198]
    assert enc.encode_ordinary("!") == [0]  # the first byte-level token
    assert enc.decode([50255]) == " gazed"  # the last merge


def test_vocab_and_eot():
    enc = gpt2_encoding()
    assert enc.n_vocab == VOCAB_SIZE == 50257
    assert enc.eot_token == EOT_ID == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT_ID]
    # encode_ordinary (what prepare uses) never turns text in the data into a real EOT
    assert EOT_ID not in enc.encode_ordinary("a <|endoftext|> b")


def test_unicode_round_trip():
    enc = gpt2_encoding()
    text = "naïve café — 東京 🚀 \t tabs\r\n and 'quotes' don't break"
    ids = enc.encode_ordinary(text)
    assert all(0 <= i < EOT_ID for i in ids)
    assert enc.decode(ids) == text
    # byte-level BPE: an emoji is several byte tokens that only decode together
    assert len(enc.encode_ordinary("🚀")) > 1


def test_cached_and_hashed():
    assert gpt2_encoding() is gpt2_encoding()
    assert re.fullmatch(r"[0-9a-f]{64}", ranks_sha256())
