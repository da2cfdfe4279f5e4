"""When a worker says a model is idle (so a batcher sends it a batch): nothing of the model in flight, or its
decoder reading a long prompt (it then answers rows that arrive between chunks, whatever waits behind)."""

from __future__ import annotations

from services.local_inference.settings import InferenceSettings
from services.local_inference.worker import Taken, Worker


def test_a_model_is_idle_while_one_of_its_long_prompts_is_read() -> None:
    said: list[str] = []
    w = Worker(settings=InferenceSettings(), engines={})
    w.on_idle = lambda: said.append("idle")
    assert w.idle_model("tiny")
    w.inflight = {"long-a": Taken("tiny", lambda: None), "long-b": Taken("tiny", lambda: None),
                  "other": Taken("big", lambda: None)}
    assert not w.idle_model("tiny")  # long-a decoding, long-b waiting behind it
    w.reading("long-a", True)
    assert w.idle_model("tiny")  # long-b still waits: short rows are answered before it anyway
    assert said == ["idle"]  # said at once, so a batcher hears it
    assert not w.idle_model("big")
    w.reading("long-a", False)
    assert not w.idle_model("tiny")
    w.reading("gone", True)  # a request no longer here: nothing happens
    assert said == ["idle"]
