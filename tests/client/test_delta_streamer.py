"""The HTTP API's incremental detokenizer: streamed pieces add up to the whole text's decode."""
import os
import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from potluck.client.decode_loop import TokenLogprob
from potluck.client.serving import PromptError, TextGenerator, _DeltaStreamer, _held
from potluck.protocol.checkpoint import resolve_checkpoint

TEXT = ("Once upon a time, a fox named Zoë met a crow. \"Hello!\" said the fox; the crow said nothing . "
        "They ate 3.5 crêpes in Zürich 🦊🐦 and 你好 , then went home .\n\nIt ' s the end , isn ' t it ?")


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """A small BPE with Llama's word-boundary marker (its decoder drops the first word's space)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>", *bytes_])
    tokenizer.train_from_iterator([TEXT] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>")


def wordpiece_cleaning_up_spaces() -> PreTrainedTokenizerFast:
    """BERT's kind of tokenizer, whose decode removes spaces before punctuation and around
    apostrophes: the one kind whose text of a few tokens can change with the token after them."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(cleanup=False)  # transformers cleans up (clean_up_tokenization_spaces)
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[SEP]"])
    tokenizer.train_from_iterator([TEXT] * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="[SEP]", unk_token="[UNK]",
                                   clean_up_tokenization_spaces=True)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(resolve_checkpoint(None).path)


@pytest.mark.parametrize("which", ["smollm2", "sentencepiece", "wordpiece"])
def test_streamed_pieces_add_up_to_the_whole_decode(which, request):
    tokenizer = {"smollm2": lambda: request.getfixturevalue("smollm2_tokenizer"),
                 "sentencepiece": sentencepiece_like,
                 "wordpiece": wordpiece_cleaning_up_spaces}[which]()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    pieces = []
    streamer = _DeltaStreamer(tokenizer, (), lambda text, scored: pieces.append(text))
    for token in ids:
        streamer.add([token])
        assert "".join(pieces) == streamer.text  # nothing half-sent: a multi-byte character waits
    streamer.end()
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert streamer.text == whole
    if which == "wordpiece":  # spaces cleaned up across tokens: what was sent stays, the answer is right
        assert "it's the end, isn't it?" in whole.lower()
    else:
        assert "".join(pieces) == whole
        assert "🦊" in whole and "你好" in whole  # characters of several bytes, split across tokens


def test_a_stop_string_across_tokens_is_never_sent_in_part(smollm2_tokenizer):
    ids = smollm2_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces = []
    streamer = _DeltaStreamer(smollm2_tokenizer, ("crêpes in",), lambda text, scored: pieces.append(text))
    for token in ids:
        streamer.add([token])
    streamer.end()
    assert streamer.stopped and "".join(pieces) == streamer.text == TEXT[:TEXT.index("crêpes in")]


def test_an_answer_cut_inside_a_character_ends_before_it(smollm2_tokenizer):
    ids = smollm2_tokenizer("A fox 🦊", add_special_tokens=False)["input_ids"]
    cut = next(n for n in range(len(ids)) if smollm2_tokenizer.decode(ids[:n]).endswith("\ufffd"))
    pieces = []
    streamer = _DeltaStreamer(smollm2_tokenizer, (), lambda text, scored: pieces.append(text))
    for token in ids[:cut]:  # max_tokens reached halfway through the fox's bytes
        streamer.add([token])
    streamer.end()
    assert "".join(pieces) == streamer.text == "A fox"  # the space came in the fox's first token


def test_each_tokens_score_comes_with_the_piece_that_completes_its_text(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    ids = tokenizer("A fox 🦊 ate crêpes in Zürich", add_special_tokens=False)["input_ids"]
    ids.append(tokenizer.eos_token_id)
    pieces = []
    streamer = _DeltaStreamer(tokenizer, ("in Z",), lambda text, scored: pieces.append((text, scored)))
    for n, token in enumerate(ids):
        streamer.add([token], TokenLogprob(token, -float(n), ()))
    streamer.end()
    text = "".join(t for t, _ in pieces)
    assert text == streamer.text == "A fox 🦊 ate crêpes "
    scored = [s for _, batch in pieces for s in batch]
    assert scored == streamer.logprobs
    tokens = [s.token for s, _ in scored]
    assert tokens == ids[:len(tokens)] and [s.logprob for s, _ in scored] == [-float(n) for n in range(len(tokens))]
    offsets = [offset for _, offset in scored] + [len(text)]
    # each token's text starts where the one before it ends, and the tokens' texts make up the answer
    assert "".join(tokenizer.decode(ids[:n + 1])[offsets[n]:offsets[n + 1]] for n in range(len(tokens))) == text
    covered = tokenizer.decode(ids[:len(tokens)])  # the last token scored holds the stop string's start;
    assert covered.startswith(text) and "in Z".startswith(covered[len(text):])  # those after it, none of the answer
    sent = 0
    for piece, batch in pieces:  # no score comes before its token's text is sent, or before a piece it was in
        sent += len(piece)
        assert all(offsets[tokens.index(s.token)] < sent or not piece for s, _ in batch)


def test_every_token_has_its_score_and_starts_where_its_own_text_does(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    text = "A fox 🦊hogs the 你好 crêpes 🐦."
    special = tokenizer.convert_tokens_to_ids("<|im_start|>")  # no text in the answer
    for ids in (tokenizer(text, add_special_tokens=False)["input_ids"] + [special, special],
                tokenizer("A fox 🦊", add_special_tokens=False)["input_ids"][:-1]):  # cut inside the fox
        scored = []
        streamer = _DeltaStreamer(tokenizer, (), lambda piece, batch: scored.extend(batch))
        for token in ids:
            streamer.add([token], TokenLogprob(token, 0.0, ()))
        streamer.end()
        assert [s.token for s, _ in scored] == ids  # one entry per token, in order
        for n, (score, offset) in enumerate(scored):  # where the text of the tokens before it stops agreeing
            assert offset == len(os.path.commonprefix([tokenizer.decode(ids[:n]), streamer.text])), n
            own = tokenizer.decode([score.token], skip_special_tokens=True)
            if "\ufffd" not in own and own:
                assert streamer.text[offset:].startswith(own)


def test_a_tokens_bytes_rebuild_the_characters_it_holds_part_of(smollm2_tokenizer):
    def generator_of(tokenizer):
        generator = TextGenerator.__new__(TextGenerator)  # only its tokenizer takes part
        generator.tokenizer, generator._token_texts = tokenizer, {}
        return generator

    text, generator = "🦊 and 你好, crêpes", generator_of(smollm2_tokenizer)  # byte-level BPE
    ids = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in generator.token_text(t) for t in ids)  # some hold only part of a character
    assert b"".join(bytes(generator.token_bytes(t)) for t in ids) == text.encode()
    tokenizer = sentencepiece_like()  # byte fallback: a character it never saw comes as <0xHH> pieces
    generator = generator_of(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("🐙", add_special_tokens=False)["input_ids"])
    fallback = [p for p in pieces if p.startswith("<0x")]
    assert len(fallback) == 4 and [generator.token_bytes(tokenizer.convert_tokens_to_ids(p)) for p in fallback] == [
        [b] for b in "🐙".encode()]
    word = tokenizer.convert_tokens_to_ids("▁the")
    assert generator.token_text(word) == " the" and generator.token_bytes(word) == list(b" the")  # its space kept


def test_what_is_held_back_is_the_longest_end_of_the_text_that_starts_a_stop_string():
    rng = random.Random(0)
    for _ in range(20000):  # small alphabets: many partial matches, overlapping ones included
        text = "".join(rng.choice("ab") for _ in range(rng.randint(0, 12)))
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 6)))
        longest = max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        assert _held(text, stop) == longest, (text, stop)


def test_messages_for_a_tokenizer_without_a_chat_template_are_a_prompt_error_naming_messages():
    generator = TextGenerator.__new__(TextGenerator)  # only its tokenizer and name take part
    generator.tokenizer, generator.name = sentencepiece_like(), "plain"
    with pytest.raises(PromptError, match="no chat template.*/v1/completions") as raised:
        generator.chat_ids([{"role": "user", "content": "hi"}])
    assert raised.value.param == "messages"
