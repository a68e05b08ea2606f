"""Tokenizer: encode/decode, chat template, eos ids, UTF-8 safe incremental decoding and stop-string hold-back."""

from __future__ import annotations

import itertools
import json
import pathlib
import random
import shutil
from typing import Any

import pytest

from engine.errors import InvalidRequestError
from engine.tokenizer import ChatTemplateInfo, StopStringMatcher, Tokenizer

TEXTS = [
    "Hello world",
    "Family: 👨‍👩‍👧‍👦, flag 🇫🇷, thumbs 👍🏽, rainbow flag 🏳️‍🌈!",
    "日本語のテキストと中文字符，한국어도 있어요。",
    "Café naïve façade — Ωμέγα, Привет, e\u0301 (combining accent)",
    "  leading spaces,\ttabs\nnew lines\n\n and trailing  ",
    "😀😃😄😁 mixed 漢字 and ascii 123 ✅",
]


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir: pathlib.Path) -> Tokenizer:
    return Tokenizer(embedded_model_dir)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A tiny Llama/Mistral-style tokenizer (Metaspace, byte fallback, leading-space strip), built offline."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer_tokenizer = RawTokenizer(models.BPE(unk_token="<unk>"))
    trainer_tokenizer.pre_tokenizer = pre_tokenizer
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "café au lait"] * 10
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=30, show_progress=False)
    trainer_tokenizer.train_from_iterator(corpus, trainer)
    trained = json.loads(trainer_tokenizer.to_str())["model"]
    # Byte tokens must be ordinary vocabulary (not special) so decode keeps them, as in Mistral's tokenizer.
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in trained["vocab"]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    raw = RawTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    raw.pre_tokenizer = pre_tokenizer
    raw.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    out_dir = tmp_path_factory.mktemp("sentencepiece_tokenizer")
    fast_tokenizer_class: Any = PreTrainedTokenizerFast  # untyped in transformers
    fast_tokenizer_class(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(out_dir)
    return Tokenizer(out_dir)


def stream(tokenizer: Tokenizer, token_ids: list[int], prompt_token_ids: list[int] | None = None, skip: bool = True) -> list[str]:
    detokenizer = tokenizer.detokenizer(prompt_token_ids, skip_special_tokens=skip)
    deltas = [detokenizer.add(t) for t in token_ids]
    return [*deltas, detokenizer.flush()]


def assert_clean(deltas: list[str], full_text: str) -> None:
    assert "".join(deltas) == full_text
    for delta in deltas:
        delta.encode("utf-8")  # raises on a lone surrogate
        assert delta.count("\ufffd") <= full_text.count("\ufffd"), delta


def byte_level_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte (GPT-2 byte-to-unicode mapping): every multi-byte character arrives in pieces."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    byte_char = {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}
    vocab = tokenizer._tokenizer.get_vocab()
    return [vocab[byte_char[b]] for b in text.encode("utf-8")]


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_deltas_concatenate_to_full_decode(tokenizer: Tokenizer, text: str) -> None:
    token_ids = tokenizer.encode(text)
    assert tokenizer.decode(token_ids) == text
    assert_clean(stream(tokenizer, token_ids), text)


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_one_byte_per_token_never_splits_a_character(tokenizer: Tokenizer, text: str) -> None:
    token_ids = byte_level_ids(tokenizer, text)
    assert tokenizer.decode(token_ids) == text
    deltas = stream(tokenizer, token_ids)
    assert_clean(deltas, text)
    assert "".join(deltas[:-1]) == text  # nothing was left for flush: every character completed


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_sentencepiece_leading_spaces(sentencepiece_tokenizer: Tokenizer, text: str) -> None:
    token_ids = sentencepiece_tokenizer.encode(text)
    full_text = sentencepiece_tokenizer.decode(token_ids)
    assert_clean(stream(sentencepiece_tokenizer, token_ids), full_text)


def test_detokenizer_with_prompt_context_keeps_the_leading_space(sentencepiece_tokenizer: Tokenizer) -> None:
    prompt_ids = sentencepiece_tokenizer.encode("hello world")
    num_hello_ids = len(sentencepiece_tokenizer.encode("hello"))
    generated_ids = sentencepiece_tokenizer.encode("hello there, café 日本")[num_hello_ids:]  # starts at "▁there"
    whole = sentencepiece_tokenizer.decode(prompt_ids + generated_ids)
    expected = whole[len(sentencepiece_tokenizer.decode(prompt_ids)) :]
    assert expected.startswith(" there")
    assert_clean(stream(sentencepiece_tokenizer, generated_ids, prompt_ids), expected)


def test_detokenizer_skips_special_tokens_mid_stream(tokenizer: Tokenizer) -> None:
    token_ids = [*tokenizer.encode("Hi there"), 2, 1, *tokenizer.encode(" 👋 bye")]
    assert_clean(stream(tokenizer, token_ids), tokenizer.decode(token_ids))
    kept = tokenizer.decode(token_ids, skip_special_tokens=False)
    assert "<|im_end|>" in kept
    assert_clean(stream(tokenizer, token_ids, skip=False), kept)


def test_detokenizer_flush_returns_an_unfinished_character(tokenizer: Tokenizer) -> None:
    token_ids = byte_level_ids(tokenizer, "ok 😀")[:-2]  # the emoji's last two bytes never arrive
    full_text = tokenizer.decode(token_ids)
    assert full_text.endswith("\ufffd")
    deltas = stream(tokenizer, token_ids)
    assert "".join(deltas[:-1]) == "ok "
    assert "".join(deltas) == full_text


def test_detokenizer_decodes_a_small_window_only(tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    window_sizes: list[int] = []
    decode = tokenizer.decode

    def recording_decode(token_ids: list[int], skip_special_tokens: bool = True) -> str:
        window_sizes.append(len(token_ids))
        return decode(token_ids, skip_special_tokens)

    token_ids = tokenizer.encode(" ".join(TEXTS) * 20)
    detokenizer = tokenizer.detokenizer(tokenizer.encode("a long prompt " * 50))
    monkeypatch.setattr(tokenizer, "decode", recording_decode)
    text = "".join(detokenizer.add(t) for t in token_ids) + detokenizer.flush()
    monkeypatch.undo()
    assert text == tokenizer.decode(token_ids)
    assert len(token_ids) > 500
    assert max(window_sizes) <= 16


def test_chat_template_renders_system_and_turns_and_ends_with_generation_prompt(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ]
    token_ids = tokenizer.apply_chat_template(messages)
    rendered = tokenizer.decode(token_ids, skip_special_tokens=False)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert token_ids[0] == 1 and token_ids[1] != 1  # <|im_start|> once, not doubled as a BOS
    assert token_ids.count(2) == 4  # each <|im_end|> is the special token, not its characters


def test_chat_template_without_system_uses_the_default_one(tokenizer: Tokenizer) -> None:
    rendered = tokenizer.decode(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]), skip_special_tokens=False)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_error_is_an_invalid_request(tokenizer: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError) as info:
        tokenizer.apply_chat_template([{"role": "user"}])
    assert info.value.param == "messages"


def test_missing_chat_template_is_an_invalid_request(embedded_model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model_dir / name, tmp_path / name)
    with pytest.raises(InvalidRequestError, match="chat template") as info:
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])
    assert info.value.param == "messages"


def test_eos_ids_join_generation_config_and_tokenizer(tokenizer: Tokenizer, embedded_model_dir: pathlib.Path) -> None:
    generation_eos = json.loads((embedded_model_dir / "generation_config.json").read_text())["eos_token_id"]
    im_end_id = tokenizer._tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation_eos == 2 and im_end_id == 2  # SmolLM2: both sources name <|im_end|>
    assert tokenizer.eos_token_ids == {generation_eos, im_end_id}


@pytest.mark.parametrize(
    ("generation_config", "expected"), [(None, {2}), ({"eos_token_id": [0, 2]}, {0, 2}), ({"eos_token_id": 0}, {0, 2})]
)
def test_eos_ids_read_int_list_or_missing_generation_config(
    embedded_model_dir: pathlib.Path, tmp_path: pathlib.Path, generation_config: dict[str, object] | None, expected: set[int]
) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model_dir / name, tmp_path / name)
    if generation_config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    assert Tokenizer(tmp_path).eos_token_ids == expected


def test_encode_decode_vocab_and_token_text(tokenizer: Tokenizer) -> None:
    assert tokenizer.vocab_size == 49152
    assert tokenizer.byte_fallback_ids == frozenset()  # byte-level BPE: no <0xNN> tokens
    token_ids = tokenizer.encode("Hello world")
    assert token_ids == [19556, 905]  # SmolLM2 adds no BOS to plain text
    assert tokenizer.token_text(905) == " world"
    assert tokenizer.token_text(2) == "<|im_end|>"
    assert tokenizer.decode([*token_ids, 2]) == "Hello world"


# --- stop strings -------------------------------------------------------------------------------------------------------


def run_matcher(stop: tuple[str, ...], pieces: list[str]) -> tuple[str, str | None]:
    matcher = StopStringMatcher(stop)
    emitted = []
    for piece in pieces:
        text, matched = matcher.feed(piece)
        emitted.append(text)
        if matched is not None:
            assert matcher.feed("more text") == ("", None)
            assert matcher.flush() == ""
            return "".join(emitted), matched
    return "".join(emitted) + matcher.flush(), None


def reference_stop(text: str, stop: tuple[str, ...]) -> tuple[str, str | None]:
    """The first stop string to be completed as the text grows (ties: the longer one)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stop if text[:end].endswith(s)]
        if ending:
            longest = max(ending, key=len)
            return text[: end - len(longest)], longest
    return text, None


def splits(text: str, num_cuts: int) -> list[list[str]]:
    result = []
    for cuts in itertools.combinations(range(1, len(text)), num_cuts):
        bounds = [0, *cuts, len(text)]
        result.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return result


def test_stop_string_empty_tuple_passes_through() -> None:
    matcher = StopStringMatcher(())
    assert matcher.feed("abc") == ("abc", None)
    assert matcher.feed("") == ("", None)
    assert matcher.flush() == ""


@pytest.mark.parametrize("num_cuts", [1, 2, 3])
def test_stop_string_split_anywhere_never_leaks(num_cuts: int) -> None:
    before, stop, after = "Answer: 42 👍 ", "<|end|>", " trailing text"
    text = before + stop + after
    for pieces in splits(text, num_cuts):
        assert run_matcher((stop,), pieces) == (before, stop), pieces


def test_stop_string_streamed_one_character_at_a_time_holds_back_exactly_the_candidate() -> None:
    matcher = StopStringMatcher(("STOP",))
    assert matcher.feed("abc S") == ("abc ", None)
    assert matcher.feed("T") == ("", None)
    assert matcher.feed("x") == ("STx", None)  # no longer a prefix of STOP: released
    assert matcher.feed("ST") == ("", None)
    assert matcher.feed("OP and more") == ("", "STOP")


def test_stop_string_overlapping_candidates() -> None:
    assert run_matcher(("abcd", "bc"), list("xabcdy")) == ("xa", "bc")  # "bc" completes first
    assert run_matcher(("abcd", "bc"), ["xabcdy"]) == ("xa", "bc")
    assert run_matcher(("abc", "bc"), ["xabcy"]) == ("x", "abc")  # both complete together: the longer wins
    assert run_matcher(("aab",), list("aaab")) == ("a", "aab")
    assert run_matcher(("abab",), ["ab", "aca", "ba", "b!"]) == ("abac", "abab")


def test_stop_string_flush_without_match_returns_held_text() -> None:
    matcher = StopStringMatcher(("</answer>",))
    assert matcher.feed("the end </ans") == ("the end ", None)
    assert matcher.flush() == "</ans"
    assert run_matcher(("</answer>",), ["no stop", " here </", "answ"]) == ("no stop here </answ", None)


def test_stop_string_result_does_not_depend_on_the_split() -> None:
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("abc😀") for _ in range(rng.randint(0, 14)))
        stop = tuple("".join(rng.choice("abc😀") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3)))
        cuts = sorted(rng.sample(range(1, len(text)), min(rng.randint(0, 5), max(len(text) - 1, 0))))
        pieces = [text[a:b] for a, b in itertools.pairwise([0, *cuts, len(text)])]
        assert run_matcher(stop, pieces) == reference_stop(text, stop), (text, stop, pieces)


@pytest.mark.parametrize("name", ["tokenizer", "sentencepiece_tokenizer"])
def test_detokenizer_random_ids_including_broken_utf8(name: str, request: pytest.FixtureRequest) -> None:
    """Any id sequence, invalid UTF-8 included, streams to exactly the full decode."""
    tokenizer: Tokenizer = request.getfixturevalue(name)
    rng = random.Random(1)
    for _ in range(100):
        token_ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 40))]
        prompt_ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 8))]
        for skip in (True, False):
            assert_clean(stream(tokenizer, token_ids, skip=skip), tokenizer.decode(token_ids, skip_special_tokens=skip))
            "".join(stream(tokenizer, token_ids, prompt_ids, skip=skip)).encode("utf-8")


def test_detokenizer_random_pieces_and_byte_fallback_characters(sentencepiece_tokenizer: Tokenizer) -> None:
    """SentencePiece: random pieces mixed with characters spelled as byte-fallback tokens (valid UTF-8 runs)."""
    tok = sentencepiece_tokenizer
    assert len(tok.byte_fallback_ids) == 256
    rng = random.Random(2)
    piece_ids = [i for i in range(tok.vocab_size) if not tok._tokenizer.convert_ids_to_tokens(i).startswith("<0x")]
    for _ in range(200):
        token_ids: list[int] = []
        for _ in range(rng.randint(1, 30)):
            if rng.random() < 0.6:
                token_ids.append(rng.choice(piece_ids))
            else:
                char = rng.choice("é日👍🏽\u200d한")
                token_ids += [tok._tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in char.encode("utf-8")]
        assert_clean(stream(tok, token_ids), tok.decode(token_ids))


def test_chat_template_info_and_tools_reach_the_template(embedded_model_dir: pathlib.Path, tmp_path: pathlib.Path) -> None:
    tokenizer = Tokenizer(embedded_model_dir)
    # SmolLM2's template ignores `tools` (the gateway then writes its own tool prompt); no Mistral [TOOL_CALLS] token
    assert tokenizer.chat_template_info == ChatTemplateInfo(renders_tools=False, has_tool_calls_token=False)
    messages = [{"role": "user", "content": "hi"}]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    assert tokenizer.apply_chat_template(messages, tools) == tokenizer.apply_chat_template(messages)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model_dir / name, tmp_path / name)
    template = (
        "{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    (tmp_path / "chat_template.jinja").write_text(template)
    with_tools = Tokenizer(tmp_path)
    assert with_tools.chat_template_info.renders_tools
    assert with_tools.decode(with_tools.apply_chat_template(messages, tools)) == "TOOL lookup\nhi"


@pytest.mark.parametrize("name", ["tokenizer", "sentencepiece_tokenizer"])
def test_decode_equals_transformers_decode(name: str, request: pytest.FixtureRequest) -> None:
    """decode() may call the `tokenizers` backend directly; its text must be transformers' decode, special ids included."""
    tok: Tokenizer = request.getfixturevalue(name)
    rng = random.Random(0)
    specials = sorted(tok.special_token_ids)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]
        ids[rng.randrange(len(ids))] = rng.choice(specials)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == tok.hf_tokenizer.decode(ids, skip_special_tokens=skip), ids
        assert tok.token_text(ids[0]) == tok.hf_tokenizer.decode([ids[0]], skip_special_tokens=False)
