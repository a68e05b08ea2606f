"""Engine exception types. The gateway maps each to one HTTP status; the engine never knows HTTP."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request cannot be served as asked (prompt too long, bad chat messages, token out of vocabulary).

    `param` names the offending request field when the engine knows it (for example "prompt").
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineOverloadedError(EngineError):
    """The waiting queue is full; the caller should retry later."""


class EngineDeadError(EngineError):
    """The engine loop has stopped (crashed or shut down); no request can be served."""


class RequestFailedError(EngineError):
    """One request failed inside the engine; other requests are unaffected."""


class RankFailedError(EngineError):
    """A tensor-parallel rank failed to start, died or hung: the ranks are out of step and the engine cannot go on."""
