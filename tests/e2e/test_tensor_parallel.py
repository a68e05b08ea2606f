"""`sirocco serve --tensor-parallel-size 2` through the openai SDK: the same text as one rank; SIGTERM leaves no rank behind."""

from __future__ import annotations

import pathlib
import signal

import openai
import pytest

from tests.conditions import wait_until
from tests.server import ServerProcess

BOUND_S = 120.0  # turns a hang into a failure; never reached on a healthy run


def _children(pid: int) -> set[int]:
    """Child processes of `pid` (every thread's children)."""
    found: set[int] = set()
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        found.update(int(child) for child in (task / "children").read_text().split())
    return found


def _has_exited(pid: int) -> bool:
    """Gone, or exited and waiting to be reaped (an orphan is reaped by the container's init, which may never do it)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _complete(server: ServerProcess, model: str) -> str:
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0) as client:
        completion = client.completions.create(model=model, prompt="Hello there", max_tokens=12, temperature=0)
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    return completion.choices[0].text


def test_two_ranks_serve_the_same_text_and_sigterm_stops_them(
    tmp_path: pathlib.Path, tiny_mistral_dir: pathlib.Path, embedded_model_dir: pathlib.Path
) -> None:
    assert embedded_model_dir.is_dir()  # the tiny model borrows its tokenizer
    model = str(tiny_mistral_dir)
    texts: dict[int, str] = {}
    children: set[int] = set()
    for tp in (1, 2):
        settings = {"SIROCCO_MODEL": model, "SIROCCO_MAX_MODEL_LEN": "512", "SIROCCO_TENSOR_PARALLEL_SIZE": str(tp)}
        server = ServerProcess(tmp_path / f"server-tp{tp}.log", settings)
        try:
            server.wait_ready()
            texts[tp] = _complete(server, model)
            if tp == 2:
                children = _children(server.process.pid)  # rank 1 (and multiprocessing's resource tracker)
                server.process.send_signal(signal.SIGTERM)
                server.process.wait(timeout=BOUND_S)
        finally:
            server.stop()
    assert texts[1] and texts[2] == texts[1]
    assert children, "no worker process was started"
    wait_until(lambda: all(_has_exited(pid) for pid in children), "every rank to exit after SIGTERM", BOUND_S)


@pytest.fixture(autouse=True)
def _linux_only() -> None:
    if not pathlib.Path("/proc/self/task").is_dir():
        pytest.skip("reads child processes from /proc")
