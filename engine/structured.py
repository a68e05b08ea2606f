"""Structured outputs: what a request asks its output to match (StructuredOutputs), checked on construction.

The grammar engine (xgrammar) compiles these, one matcher per sequence, and the sampler applies their token bitmask.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class StructuredOutputs:
    """Exactly one constraint. Field names follow vLLM's `structured_outputs` request extra.

    json: a JSON schema (text); json_object: any JSON object; regex: a regular expression; choice: one of these
    strings; grammar: an EBNF grammar (xgrammar / GBNF syntax); structural_tag: an xgrammar structural tag (JSON text),
    free text until a trigger string, then the tag's constrained content (tool calls under tool_choice=auto).
    """

    json: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        kinds = [self.json is not None, self.json_object, self.regex is not None, self.choice is not None]
        kinds += [self.grammar is not None, self.structural_tag is not None]
        if sum(kinds) != 1:
            raise InvalidRequestError(
                "structured_outputs needs exactly one of json, json_object, regex, choice, grammar, structural_tag",
                param="structured_outputs",
            )
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise InvalidRequestError("structured_outputs.choice must be a non-empty list of strings", param="structured_outputs")

    @property
    def key(self) -> tuple[str, str]:
        """(kind, text): what the compiled-grammar cache is keyed by."""
        if self.json is not None:
            return ("json", self.json)
        if self.json_object:
            return ("json_object", "")
        if self.regex is not None:
            return ("regex", self.regex)
        if self.choice is not None:
            return ("choice", "\x00".join(self.choice))
        if self.grammar is not None:
            return ("grammar", self.grammar)
        return ("structural_tag", self.structural_tag or "")
