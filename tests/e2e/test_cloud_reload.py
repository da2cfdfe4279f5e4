"""The providers file changed under a running cloud-adapter: applied without a restart, or refused and the
running providers kept. A real nats-server, cloud-adapter, router and gateway; the provider is the fake of
tests/fakes.py; the official openai client asks. The adapter checks its files every 0.2 s here (5 s by default).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fakes import FakeProvider
from tests.support import NatsServer, Service, cloud_router_env, eventually, metric, running

pytestmark = pytest.mark.e2e
SITE = "reload"
MESSAGES = [{"role": "user", "content": "hello there"}]


@dataclass
class ReloadStack:
    adapter: Service
    gateway: Service
    fake: FakeProvider
    file: Path
    key_file: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.base}/v1", api_key="unused", max_retries=0, timeout=30)

    def write(self, models: dict[str, Any], **more: Any) -> None:
        """The providers file: provider ``fake`` with ``models``, its key in ``key_file``."""
        entry = {"name": "fake", "kind": "openai-compatible", "base_url": self.fake.url, "local": True,
                 "api_key_file": str(self.key_file), "models": models,
                 "timeouts": {"connect_s": 2, "first_byte_s": 5, "total_s": 10}}
        self.file.write_text(json.dumps({"providers": [entry], **more}))

    def reloads(self, outcome: str) -> float:
        return metric(self.adapter.metrics(), "leafwire_cloud_providers_reloads_total", outcome=outcome)

    def answers(self) -> bool:
        """Whether ``fake/echo`` answers now (with the key the fake expects)."""
        try:
            self.client().chat.completions.create(model="fake/echo", messages=MESSAGES)  # type: ignore[arg-type]
        except openai.APIStatusError:
            return False
        return True

    def listed(self) -> set[str]:
        """The provider's models in ``GET /v1/models``."""
        return {m.id for m in self.client().models.list().data if m.id.startswith("fake/")}


@pytest.fixture(scope="module")
def stack(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReloadStack]:
    fake = FakeProvider("openai", key="sk-first-0000000000").start()
    folder = tmp_path_factory.mktemp("reload")
    key_file = folder / "key"
    key_file.write_text("sk-first-0000000000\n")
    stack = ReloadStack(Service("cloud_adapter", {}), Service("gateway", {}), fake, folder / "providers.yaml", key_file)
    stack.write({"echo": {}})
    env = {"LW_NATS_URL": nats_server.url, "LW_SITE": SITE}
    stack.adapter = Service("cloud_adapter", {**env, "LW_PROVIDERS_FILE": str(stack.file),
                                              "LW_CLOUD_PROVIDERS_CHECK_S": "0.2"})
    stack.gateway = Service("gateway", env)
    try:
        with running(stack.adapter, Service("router", {**env, **cloud_router_env(folder)}), stack.gateway):
            yield stack
    finally:
        fake.stop()


@pytest.fixture(autouse=True)
def _as_started(stack: ReloadStack) -> Iterator[None]:
    """Each test starts from the file the stack started with, applied."""
    yield
    stack.fake.key = "sk-first-0000000000"
    stack.key_file.write_text("sk-first-0000000000\n")
    stack.write({"echo": {}})
    eventually(lambda: stack.listed() == {"fake/echo"} and stack.answers(), 10, "the first file applied again")
    stack.fake.reset()


def test_a_model_added_is_served_and_one_removed_is_gone(stack: ReloadStack) -> None:
    """A model added to the file is listed and answered within moments, by the same adapter process; a model
    taken out is a 404 again."""
    pid = stack.adapter.proc.pid if stack.adapter.proc else None
    applied = stack.reloads("applied")
    stack.write({"echo": {}, "echo2": {"upstream": "echo-2"}})
    eventually(lambda: "fake/echo2" in stack.listed(), 10, "fake/echo2 in /v1/models")
    answer = stack.client().chat.completions.create(model="fake/echo2", messages=MESSAGES)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "pong hello there"
    assert stack.fake.calls[-1].body["model"] == "echo-2"
    assert stack.reloads("applied") > applied
    assert stack.adapter.proc is not None
    assert stack.adapter.proc.pid == pid
    stack.write({"echo2": {"upstream": "echo-2"}})
    eventually(lambda: "fake/echo" not in stack.listed(), 10, "fake/echo gone from /v1/models")
    with pytest.raises(openai.NotFoundError):
        stack.client().chat.completions.create(model="fake/echo", messages=MESSAGES)  # type: ignore[arg-type]


def test_a_rotated_key_file_is_used_from_the_next_call(stack: ReloadStack) -> None:
    """The provider's key rotated (its key file rewritten, as a Kubernetes Secret update does): the next
    calls send the new key, with no restart."""
    stack.fake.key = "sk-second-111111111"
    stack.key_file.write_text("sk-second-111111111\n")
    eventually(stack.answers, 10, "a call with the new key")
    assert stack.fake.calls[-1].headers["Authorization"] == "Bearer sk-second-111111111"


def test_an_invalid_file_is_refused_and_the_running_providers_stay(stack: ReloadStack) -> None:
    """A broken file (a YAML typo, then a budget that is no number) is refused: counted and logged, and the
    providers that ran before still answer; the file mended is applied."""
    refused = stack.reloads("refused")
    stack.file.write_text("providers: [{name: fake, kind: openai-compatible")
    eventually(lambda: stack.reloads("refused") > refused, 10, "the broken file refused")
    stack.write({"echo": {}}, budgets={"global": {"daily_usd": "lots"}})
    eventually(lambda: stack.reloads("refused") > refused + 1, 10, "the bad budget refused")
    answer = stack.client().chat.completions.create(model="fake/echo", messages=MESSAGES)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "pong hello there"
    assert "providers file not applied" in stack.adapter.log_path.read_text() if stack.adapter.log_path else ""
    stack.write({"echo": {}, "echo3": {}})
    eventually(lambda: "fake/echo3" in stack.listed(), 10, "the mended file applied")
