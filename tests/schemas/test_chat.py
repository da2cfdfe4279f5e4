"""The chat request: which content parts are text, and what OpenAI refuses that leafwire refuses too."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from schemas.chat import ChatCompletionRequest, ChatMessage, HttpChatRequest, OtherPart, TextPart


def message(content: Any) -> ChatMessage:
    return ChatMessage.model_validate({"role": "user", "content": content})


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


class TestContentParts:
    def test_text_and_image_parts(self) -> None:
        """A text part is text; an image part is kept as a part a text-only model cannot read."""
        m = message([{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}])
        assert isinstance(m.content, list)
        assert [type(p) for p in m.content] == [TextPart, OtherPart]
        assert m.text() == "look"
        assert m.has_non_text()

    def test_parts_given_as_models(self) -> None:
        """Parts built in Python (as the router's masking does) are told apart as parts sent as JSON are."""
        m = ChatMessage(role="user", content=[TextPart(type="text", text="a"), OtherPart(type="file")])
        assert isinstance(m.content, list)
        assert [type(p) for p in m.content] == [TextPart, OtherPart]

    @pytest.mark.parametrize(("part", "field", "says"), [
        ({"type": "text"}, "text", "Field required"),
        ({"type": "text", "text": 5}, "text", "valid string"),
        ({"type": "input_text", "text": "hi"}, "type", "Invalid value: 'input_text'"),
        ({"text": "hi"}, "type", "Field required"),
    ])
    def test_refused_parts(self, part: dict[str, Any], field: str, says: str) -> None:
        """A text part without its text is refused as such (it passed for an image); so is a part of a type
        OpenAI does not take, or of none."""
        with pytest.raises(ValidationError) as exc:
            message([part])
        errors = [e for e in exc.value.errors() if e["loc"][-1] == field]
        assert errors
        assert says in errors[0]["msg"]

    def test_empty_content_list(self) -> None:
        """``content: []`` is refused, as OpenAI does."""
        with pytest.raises(ValidationError, match="at least 1 item"):
            message([])


class TestRequestFields:
    @pytest.mark.parametrize("n", [1, 2, 128])
    def test_n_up_to_128_choices_over_http(self, n: int) -> None:
        """``n`` from 1 to 128 (OpenAI's bound) is accepted by the HTTP API."""
        assert HttpChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                               "n": n}).n == n

    @pytest.mark.parametrize("n", [0, 129, 1.5, "3", True])
    def test_n_out_of_range_or_not_an_integer(self, n: object) -> None:
        """``n`` below 1, over 128, or other than an integer is refused at ``n``."""
        with pytest.raises(ValidationError) as exc:
            HttpChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": n})
        assert exc.value.errors()[0]["loc"] == ("n",)

    def test_choices_over_nats_are_bounded_as_over_http(self) -> None:
        """On NATS ``n`` is taken up to 128 (an OpenAI-compatible cloud model answers them in one call; other
        targets answer ``n_unsupported``, see the e2e tests); 0 or 129 is refused at ``n``."""
        assert request(n=1).n == 1
        assert request(n=128).n == 128
        for n in (0, 129):
            with pytest.raises(ValidationError) as exc:
                request(n=n)
            assert exc.value.errors()[0]["loc"] == ("n",)

    def test_stream_options_need_stream(self) -> None:
        """``stream_options`` without ``stream: true`` is refused at ``stream_options``."""
        assert request(stream=True, stream_options={"include_usage": True}).include_usage()
        with pytest.raises(ValidationError) as exc:
            request(stream_options={"include_usage": True})
        assert exc.value.errors()[0]["loc"] == ("stream_options",)
