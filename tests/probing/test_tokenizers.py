from wordpos.probing.datasets import REFERENCE_PREFIX, sequence_start_id


def test_offline_gpt2_tokenizer_segments_like_gpt2(gpt2_tok):
    assert gpt2_tok.tokenize(" dramatisation") == ["Ġdram", "at", "isation"]
    assert len(gpt2_tok) == 50257
    assert gpt2_tok.eos_token_id == 50256


def test_reference_prefix_is_19_tokens_with_bos(gpt2_tok):
    ids = gpt2_tok.encode(REFERENCE_PREFIX, add_special_tokens=False)
    assert len(ids) + 1 == 19
    assert sequence_start_id(gpt2_tok) == 50256
    assert gpt2_tok.convert_ids_to_tokens(ids[-2:]) == ["Ċ", "When"]
