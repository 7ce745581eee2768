"""m_t on a Qwen3-style tokenizer built here: special tokens, *non-special* added ``<|...|>`` tokens and think tags,
newline runs of 1-8 (walawalagoose/SGSD skill/sgsd_trainer.py:557-593).  Expected masks are written by hand."""

from __future__ import annotations

import pytest

from stages.engine.objectives.sgsd import maskable_token_ids, token_mask


@pytest.fixture(scope="module")
def qwen3_style_tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["Therefore x = 12 .\n\nSo the answer is \\boxed{12} .\n", "line one \nline two \n",
              "a\n\n\nb\n\n\n\nc", "x\n\n\n\n\n\n\n\ny", "tab\there"] * 50
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    # as in Qwen3's tokenizer: think tags, <|box_start|>, <|fim_prefix|>, <tool_call> are added but NOT special
    tok.add_tokens(["<think>", "</think>", "<|box_start|>", "<|fim_prefix|>", "<tool_call>"], special_tokens=False)
    return tok


def test_added_non_special_tokens_and_newline_runs(qwen3_style_tok):
    tok = qwen3_style_tok
    assert tok.convert_tokens_to_ids("<|box_start|>") not in tok.all_special_ids  # the case the old mask missed
    # (token string, kept by m_t?) -- by hand from the reference's rules
    seq = [("<think>", False), ("Ċ", False), ("Therefore", True), ("ĠĊ", True), ("Ġ12", True), ("ĊĊ", False),
           ("<|box_start|>", False), ("Ġ", True), ("ĊĊĊ", False), ("ĊĊĊĊĊĊĊ", False), ("<tool_call>", True),
           ("ĉ", True), ("</think>", False), ("<|fim_prefix|>", False), ("<|im_start|>", False),
           ("<|im_end|>", False), ("<|endoftext|>", False)]
    ids = tok.convert_tokens_to_ids([t for t, _ in seq])
    assert tok.unk_token_id not in ids and None not in ids  # every token string exists in the vocabulary
    special, newline = maskable_token_ids(tok)
    assert token_mask(ids, special, newline) == [keep for _, keep in seq]


def test_newline_set_is_exactly_the_single_token_runs(qwen3_style_tok):
    tok = qwen3_style_tok
    _, newline = maskable_token_ids(tok)
    want = {tok.convert_tokens_to_ids("Ċ" * r) for r in range(1, 9) if ("Ċ" * r) in tok.get_vocab()}
    assert newline == want and tok.convert_tokens_to_ids("ĠĊ") not in newline
    assert len(want) >= 4  # the corpus makes runs of 1, 2, 3, 4 and 7 newlines single tokens
