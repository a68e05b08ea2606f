"""Structured outputs through the engine: JSON schema, json_object, regex, choice, EBNF and structural tags honoured by a
random-weight model (so the grammar, not the model, makes the output valid), batch invariance, preemption, n > 1, the
grammar cache, and bad or hostile grammars refused with InvalidRequestError(param="structured_outputs")."""

from __future__ import annotations

import json
import pathlib
import re

import jsonschema
import pytest

from engine import LLM, InvalidRequestError, SamplingParams, StructuredOutputs
from engine.structured import MAX_TEXT_BYTES, StructuredOutputManager

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 6}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "active"],
}
PERSON = StructuredOutputs(json=json.dumps(PERSON_SCHEMA))
PROMPTS = [[1, 2000 + 37 * i, 300 + 11 * i, 4000 + i] for i in range(4)]


def _parse(text: str) -> object:
    # xgrammar's JSON strings admit raw control characters (a random model picks byte tokens like \x01); only those
    # escapes differ from strict JSON, so they are let through here rather than masked by a stricter grammar.
    return json.loads(text, strict=False)


@pytest.fixture(scope="module", params=[False, True], ids=["sync_output", "async_output"])
def tiny(tiny_mistral_dir: pathlib.Path, request: pytest.FixtureRequest) -> LLM:
    return LLM(model=str(tiny_mistral_dir), async_output=request.param)


@pytest.fixture(scope="module")
def smol(embedded_model_dir: pathlib.Path) -> LLM:
    return LLM(model=str(embedded_model_dir))


def _sampled(structured: StructuredOutputs, seed: int, max_tokens: int = 200, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, structured_outputs=structured, **kwargs)  # type: ignore[arg-type]


def test_json_schema_output_parses_and_validates(tiny: LLM) -> None:
    results = tiny.generate(PROMPTS, [_sampled(PERSON, seed) for seed in range(len(PROMPTS))])
    texts = set()
    for result in results:
        choice = result.outputs[0]
        assert choice.finish_reason == "stop", choice.text
        jsonschema.validate(_parse(choice.text), PERSON_SCHEMA)
        texts.add(choice.text)
    assert len(texts) > 1  # the seeds really sampled different documents


def test_regex_choice_and_ebnf_are_matched_exactly(tiny: LLM) -> None:
    regex = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"
    choices = ('say "hi"', "back\\slash", "two\nlines", "été")
    grammar = 'root ::= num " " op " " num\nnum ::= [1-9] [0-9]?\nop ::= "+" | "-" | "*"'
    cases = [(StructuredOutputs(regex=regex), regex), (StructuredOutputs(grammar=grammar), r"[1-9][0-9]? [-+*] [1-9][0-9]?")]
    for structured, pattern in cases:
        for result in tiny.generate(PROMPTS, [_sampled(structured, seed) for seed in range(len(PROMPTS))]):
            assert result.outputs[0].finish_reason == "stop"
            assert re.fullmatch(pattern, result.outputs[0].text), result.outputs[0].text
    picked = tiny.generate(PROMPTS, [_sampled(StructuredOutputs(choice=choices), seed) for seed in range(len(PROMPTS))])
    assert all(r.outputs[0].text in choices and r.outputs[0].finish_reason == "stop" for r in picked)


def test_structural_tag_free_text_then_constrained_json(tiny: LLM) -> None:
    schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}
    # Free JSON whitespace is bounded, or a random model fills max_tokens with it (xgrammar allows any by default).
    content = {"type": "json_schema", "json_schema": schema, "max_whitespace_cnt": 1}
    tag = {
        "type": "structural_tag",
        "format": {
            "type": "sequence",
            "elements": [
                {"type": "any_text", "max_tokens": 5},
                {"type": "tag", "begin": "<tool>", "content": content, "end": "</tool>"},
            ],
        },
    }
    structured = StructuredOutputs(structural_tag=json.dumps(tag))
    results = tiny.generate(PROMPTS, [_sampled(structured, seed) for seed in range(len(PROMPTS))])
    free_texts = []
    for result in results:
        choice = result.outputs[0]
        match = re.fullmatch(r"(.*)<tool>(.*)</tool>", choice.text, re.DOTALL)
        assert match is not None and choice.finish_reason == "stop", choice.text
        jsonschema.validate(_parse(match.group(2)), schema)
        free_texts.append(match.group(1))
    assert any(free_texts)  # free text really came before the trigger


def test_embedded_model_json_object_and_schema(smol: LLM) -> None:
    chat = [{"role": "user", "content": "Give the name and age of a person called Ann, aged 31, as a short JSON object."}]
    params = [
        SamplingParams(max_tokens=160, temperature=0.0, structured_outputs=StructuredOutputs(json_object=True)),
        SamplingParams(max_tokens=80, temperature=0.0, structured_outputs=StructuredOutputs(json=json.dumps(PERSON_SCHEMA))),
    ]
    as_object, as_person = smol.chat([chat, chat], params)
    assert as_object.outputs[0].finish_reason == "stop", as_object.outputs[0].text
    assert isinstance(_parse(as_object.outputs[0].text), dict)
    assert as_person.outputs[0].finish_reason == "stop"
    jsonschema.validate(_parse(as_person.outputs[0].text), PERSON_SCHEMA)


def test_n_choices_each_follow_the_grammar(tiny: LLM) -> None:
    (result,) = tiny.generate([PROMPTS[0]], _sampled(PERSON, seed=7, n=2))
    assert len(result.outputs) == 2
    for choice in result.outputs:
        assert choice.finish_reason == "stop"
        jsonschema.validate(_parse(choice.text), PERSON_SCHEMA)
    assert result.outputs[0].text != result.outputs[1].text


def test_constrained_and_unconstrained_rows_equal_their_runs_alone(tiny: LLM) -> None:
    constrained = _sampled(PERSON, seed=3, logprobs=2)
    free = [SamplingParams(max_tokens=30, temperature=1.0, seed=10 + i, ignore_eos=True) for i in range(3)]
    batch = tiny.generate(PROMPTS, [free[0], constrained, free[1], free[2]])
    alone = [tiny.generate([p], s)[0] for p, s in zip(PROMPTS, [free[0], constrained, free[1], free[2]], strict=True)]
    for together, single in zip(batch, alone, strict=True):
        assert together.outputs[0].token_ids == single.outputs[0].token_ids
    # Logprobs stay those of the raw model: the first token's top-2 equal an unconstrained run's on the same prompt.
    raw = tiny.generate([PROMPTS[1]], SamplingParams(max_tokens=1, temperature=0.0, logprobs=2))[0].outputs[0]
    assert raw.logprobs is not None and batch[1].outputs[0].logprobs is not None
    top, raw_top = batch[1].outputs[0].logprobs[0].top, raw.logprobs[0].top
    assert [t.token_id for t in top] == [t.token_id for t in raw_top]
    assert [t.logprob for t in top] == pytest.approx([t.logprob for t in raw_top], abs=1e-5)


def test_constrained_output_survives_preemption(tiny_mistral_dir: pathlib.Path, tiny: LLM) -> None:
    prompts = [p * 10 for p in PROMPTS] * 3  # 12 sequences of 40 prompt tokens plus up to 200 output tokens
    params = [_sampled(PERSON, seed) for seed in range(len(prompts))]
    expected = [r.outputs[0].token_ids for r in tiny.generate(prompts, params)]
    small = LLM(
        model=str(tiny_mistral_dir), num_kv_blocks=24, max_num_batched_tokens=128, async_output=tiny.engine.is_async_output
    )
    results = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert [r.outputs[0].token_ids for r in results] == expected
    for result in results:
        jsonschema.validate(_parse(result.outputs[0].text), PERSON_SCHEMA)


@pytest.mark.parametrize(
    ("structured", "fragment"),
    [
        (StructuredOutputs(json="{not json"), "Failed to parse JSON"),
        (StructuredOutputs(json='{"type": "frob"}'), 'Unsupported type "frob"'),
        (StructuredOutputs(regex="a(b"), "parenthesis is not closed"),
        (StructuredOutputs(grammar='root ::= "a" | '), "EBNF parser error"),
        (StructuredOutputs(structural_tag='{"type": "structural_tag"}'), "format"),
    ],
)
def test_bad_grammars_are_refused_in_one_line(tiny: LLM, structured: StructuredOutputs, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        tiny.generate([PROMPTS[0]], SamplingParams(structured_outputs=structured))
    assert caught.value.param == "structured_outputs"
    message = str(caught.value)
    assert fragment in message and "\n" not in message and ".cc:" not in message, message
    assert not tiny.engine.has_unfinished  # refused before it reached the scheduler


def test_huge_text_is_refused_before_compiling() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        StructuredOutputs(json=json.dumps({"enum": ["x" * 1000] * (MAX_TEXT_BYTES // 1000 + 1)}))
    assert caught.value.param == "structured_outputs" and "KiB" in str(caught.value)


def test_recursive_schema_is_served_and_keywords_handled(tiny: LLM) -> None:
    tree = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9}, "kids": {"$ref": "#/$defs/kids"}},
                "required": ["v", "kids"],
            },
            "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 1},  # one kid: trees stay short
        },
        "$ref": "#/$defs/node",
    }
    ipv4 = {"type": "object", "properties": {"ip": {"type": "string", "format": "ipv4"}}, "required": ["ip"]}
    for schema in (tree, ipv4):
        params = [_sampled(StructuredOutputs(json=json.dumps(schema)), seed, 400) for seed in range(len(PROMPTS))]
        choices = [result.outputs[0] for result in tiny.generate(PROMPTS, params)]
        # A random model may still nest the tree until max_tokens: every document that finished must be valid, and
        # most must finish, or nothing was checked.
        finished = [choice for choice in choices if choice.finish_reason == "stop"]
        assert len(finished) * 2 > len(choices), [choice.text[-40:] for choice in choices]
        for choice in finished:
            jsonschema.validate(_parse(choice.text), schema)


def test_repeated_schema_is_compiled_once(tiny: LLM) -> None:
    schema = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})
    before = tiny.engine.structured.num_compiles
    tiny.generate(PROMPTS[:2], _sampled(StructuredOutputs(json=schema), seed=0, max_tokens=20))
    tiny.generate(PROMPTS[:1], _sampled(StructuredOutputs(json=schema), seed=1, max_tokens=20))
    assert tiny.engine.structured.num_compiles == before + 1
    tiny.generate(PROMPTS[:1], _sampled(StructuredOutputs(json=schema.replace("ok", "ko")), seed=1, max_tokens=20))
    assert tiny.engine.structured.num_compiles == before + 2


def _eos(llm: LLM) -> list[int]:
    return sorted(llm.tokenizer.eos_token_ids)


def test_compile_past_the_timeout_is_refused_and_the_next_compile_works(tiny: LLM) -> None:
    vocab_size = tiny.engine.model_config.vocab_size
    manager = StructuredOutputManager(tiny.tokenizer.hf_tokenizer, vocab_size, _eos(tiny), compile_timeout_s=0.05)
    try:
        with pytest.raises(InvalidRequestError) as caught:
            manager.compile(StructuredOutputs(regex="[a-z]{1,100000}"))  # ~0.5 s on an idle core (the child's start is not timed)
        assert caught.value.param == "structured_outputs" and "too complex" in str(caught.value)
        manager.compile_timeout_s = 60.0
        assert manager.compile(StructuredOutputs(choice=("yes", "no"))) is not None  # served by a fresh child
        assert manager.num_compiles == 1
    finally:
        manager.close()


def test_lru_cache_is_bounded(tiny: LLM) -> None:
    manager = StructuredOutputManager(
        tiny.tokenizer.hf_tokenizer, tiny.engine.model_config.vocab_size, _eos(tiny), max_cache_bytes=1
    )
    try:
        first, second = StructuredOutputs(choice=("a", "b")), StructuredOutputs(choice=("c", "d"))
        manager.compile(first)
        manager.compile(second)  # evicts the first: the bound keeps only the newest entry
        manager.compile(second)
        assert manager.num_compiles == 2
        manager.compile(first)
        assert manager.num_compiles == 3
    finally:
        manager.close()
