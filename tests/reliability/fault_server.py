"""`sirocco serve` with one test-only fault: a request whose stop strings include FAULT_STOP fails inside the engine.

It fails in postprocess after its third generated token, so the engine's per-request failure path runs mid-stream while
other requests share the step; with SIROCCO_ENGINE_PROCESS=true it fails in the engine-core child, which re-imports this
file. Only tests start this launcher; nothing in engine/ or gateway/ knows about it.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from typing import Any

from engine import llm_engine
from gateway.__main__ import main

FAULT_STOP = "<<sirocco-test-fault>>"
FAULT_AFTER_TOKENS = 3


def _install_fault() -> None:
    original = llm_engine.LLMEngine._accept_token

    def accept_token(self: Any, request: Any, choice: Any, token_id: int, logprobs: Any) -> Any:
        if FAULT_STOP in request.params.stop_strings and choice.seq.num_output_tokens >= FAULT_AFTER_TOKENS:
            raise RuntimeError("injected test fault")
        return original(self, request, choice, token_id, logprobs)

    llm_engine.LLMEngine._accept_token = accept_token  # type: ignore[method-assign]


if __name__ in ("__main__", "__mp_main__"):  # __mp_main__: the engine-core child re-imports this file (engine process)
    _install_fault()
if __name__ == "__main__":
    main(sys.argv[1:])
