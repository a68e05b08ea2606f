"""FaultyEngine: the real LLMEngine with faults the AsyncEngine tests switch on, injected through AsyncEngine's
make_engine in either mode (it pickles by name, so the engine-core process builds it too).

Each step first waits on `gate` (a multiprocessing Event: clear it to hold the loop inside a step). Token texts fail,
so a request asking for logprobs fails in the step while the others go on. A request named CRASH makes step() raise:
the loop itself dies.
"""

from __future__ import annotations

from multiprocessing.synchronize import Event

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine, StepResult

CRASH = "crash"
GATE_BOUND_S = 120.0  # turns a test that never opens the gate into a failure


def _explode(token_id: int) -> str:
    raise RuntimeError("tokenizer exploded")


class FaultyEngine(LLMEngine):
    def __init__(self, config: EngineConfig, gate: Event) -> None:
        super().__init__(config)
        self.gate = gate
        self.tokenizer.token_text = _explode  # type: ignore[method-assign]  # only requests asking for logprobs call it

    def step(self) -> StepResult:
        if not self.gate.wait(GATE_BOUND_S):
            raise AssertionError("the test never opened the engine's gate")
        if CRASH in self.requests:
            raise SystemError("the loop broke")
        return super().step()
