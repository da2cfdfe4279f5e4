"""Masking of personal data before prompts leave the site."""

from __future__ import annotations

import json

import pytest

from schemas.chat import ChatCompletionRequest
from schemas.embeddings import EmbeddingRequest
from services.router.masking import Masker
from services.router.policy import Masking, Pattern

MASKER = Masker.from_policy(Masking())


class TestDefaultPatterns:
    @pytest.mark.parametrize(("text", "expected"), [
        ("write to jane.doe+ops@plant-7.example.co.uk today", "write to [EMAIL] today"),
        ("call +49 30 1234567 now", "call [PHONE] now"),
        ("call +1-202-555-0143 now", "call [PHONE] now"),
        ("call (202) 555-0143 now", "call [PHONE] now"),
        ("call 202.555.0143 now", "call [PHONE] now"),
        ("SSN 123-45-6789 on file", "SSN [NATIONAL_ID] on file"),
        ("NI number AB 12 34 56 C on file", "NI number [NATIONAL_ID] on file"),
        ("NI number AB123456C on file", "NI number [NATIONAL_ID] on file"),
    ])
    def test_each_pattern_is_masked(self, text: str, expected: str) -> None:
        """Emails, phone numbers and national ID numbers are replaced by a placeholder."""
        assert MASKER.mask(text)[0] == expected

    @pytest.mark.parametrize("text", [
        "Why did line 3 stop on 2026-11-03 at 14:35?",
        "Order 12345, batch 12-345, lot 2026-11, ISBN 978-3-16-148410-0",
        "Pressure 120.5 bar, temperature 85 C, speed 1450 rpm, version 1.2.3",
        "Room 101-202; part no. 4471-22-901; serial 00123456789",
        "the @operator handle and user@localhost are not addresses",
        "price $1,234.56 on 21/11/2026",
    ])
    def test_nothing_else_is_masked(self, text: str) -> None:
        """Dates, times, part numbers, measurements and handles are left alone."""
        assert MASKER.mask(text) == (text, {})

    def test_counts_by_pattern(self) -> None:
        """The masker says how many of each pattern it replaced."""
        _, counts = MASKER.mask("a@b.io, c@d.io, +44 20 7946 0958")
        assert counts == {"email": 2, "phone": 1}


class TestRequests:
    def test_request_messages_are_masked_and_the_original_kept(self) -> None:
        """Every message's text is masked in a copy; the original request is unchanged."""
        request = ChatCompletionRequest.model_validate({"model": "m", "messages": [
            {"role": "system", "content": "Escalate to ops@plant.example"},
            {"role": "user", "content": [{"type": "text", "text": "my SSN is 123-45-6789"}]},
        ]})
        masked, counts = MASKER.mask_request(request)
        assert masked.messages[0].text() == "Escalate to [EMAIL]"
        assert masked.messages[1].text() == "my SSN is [NATIONAL_ID]"
        assert counts == {"email": 1, "national_id": 1}
        assert request.messages[0].text() == "Escalate to ops@plant.example"

    def test_only_what_matched_changes(self) -> None:
        """Messages and parts with nothing to mask stay as they were, beside ones that were masked; a request
        with nothing to mask comes back as itself (so the router forwards the caller's bytes)."""
        request = ChatCompletionRequest.model_validate({"model": "m", "messages": [
            {"role": "system", "content": "You help at line 3."},
            {"role": "user", "content": [{"type": "text", "text": "call +44 20 7946 0958"},
                                         {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                                         {"type": "text", "text": "about order 5511"}]},
        ]})
        masked, counts = MASKER.mask_request(request)
        assert counts == {"phone": 1}
        assert masked.messages[0] is request.messages[0]
        parts = masked.messages[1].content
        assert isinstance(parts, list)
        assert [getattr(p, "text", None) for p in parts] == ["call [PHONE]", None, "about order 5511"]
        assert parts[1] is request.messages[1].content[1]  # type: ignore[index]
        clean = ChatCompletionRequest.model_validate({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "why did line 3 stop on the 3rd?"}]}]})
        assert MASKER.mask_request(clean) == (clean, {})
        assert MASKER.mask_request(clean)[0] is clean

    def test_names_tool_call_arguments_and_user_are_masked(self) -> None:
        """What else of a request a provider reads as written is masked too: a message's ``name``, the
        arguments of an earlier tool call (and of a legacy ``function_call``), still JSON, and ``user``."""
        arguments = json.dumps({"email": "jane@plant.example", "phone": "+44 20 7946 0958", "line": 3})
        request = ChatCompletionRequest.model_validate({"model": "m", "user": "jane@plant.example", "messages": [
            {"role": "user", "content": "find the customer", "name": "jane@plant.example"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": arguments}},
                {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "jane@plant.example, line 3"},
            {"role": "assistant", "content": None,
             "function_call": {"name": "mail", "arguments": '{"to": "ops@plant.example"}'}}]})
        masked, counts = MASKER.mask_request(request)
        sent = masked.model_dump(mode="json", exclude_none=True)
        assert "plant.example" not in json.dumps(sent)
        assert counts == {"email": 5, "phone": 1}
        assert sent["user"] == sent["messages"][0]["name"] == "[EMAIL]"
        calls = sent["messages"][1]["tool_calls"]
        assert json.loads(calls[0]["function"]["arguments"]) == {"email": "[EMAIL]", "phone": "[PHONE]", "line": 3}
        assert calls[1] == {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}
        assert sent["messages"][2]["tool_call_id"] == "call_1"
        assert json.loads(sent["messages"][3]["function_call"]["arguments"]) == {"to": "[EMAIL]"}
        assert request.user == "jane@plant.example"  # the original is kept

    def test_a_file_parts_name_is_masked_and_its_data_kept(self) -> None:
        """A PDF's file name is read by the model (Anthropic's document title): masked; its bytes are not text."""
        pdf = {"filename": "offer for jane.doe@plant.example, v2.pdf", "file_data": "data:application/pdf;base64,JVBE"}
        request = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "file", "file": pdf}, {"type": "text", "text": "summarise"}]}]})
        masked, counts = MASKER.mask_request(request)
        sent = masked.model_dump(mode="json", exclude_none=True)
        assert sent["messages"][0]["content"][0]["file"] == {**pdf, "filename": "offer for [EMAIL], v2.pdf"}
        assert counts == {"email": 1}
        unnamed = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "file", "file": {"file_data": pdf["file_data"]}}]}]})
        assert MASKER.mask_request(unnamed)[0] is unnamed

    def test_tool_calls_without_personal_data_change_nothing(self) -> None:
        """A tool round trip with nothing to mask is the request itself (forwarded as the caller's bytes)."""
        request = ChatCompletionRequest.model_validate({"model": "m", "user": "operator-7", "messages": [
            {"role": "user", "content": "what time is it?", "name": "op7"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "14:35"}]})
        assert MASKER.mask_request(request)[0] is request

    def test_custom_pattern_and_disabled_masking(self) -> None:
        """Policies add their own patterns, or turn masking off."""
        custom = Masker.from_policy(Masking(patterns=[Pattern(name="badge", regex=r"BDG-\d{4}")]))
        assert custom.mask("badge BDG-0042 and a@b.io") == ("badge [BADGE] and a@b.io", {"badge": 1})
        assert Masker.from_policy(Masking(enabled=False)).mask("a@b.io")[0] == "a@b.io"


class TestEmbeddingsInputs:
    def test_text_inputs_are_masked_as_prompts_are(self) -> None:
        """Each text input of an embeddings request leaving the site is masked, a single one too; the request
        with nothing to mask comes back as itself."""
        many = EmbeddingRequest(model="m", input=["mail ops@plant.example", "line 3 stopped"])
        masked, counts = MASKER.mask_inputs(many)
        assert masked.input == ["mail [EMAIL]", "line 3 stopped"]
        assert counts == {"email": 1}
        assert many.input[0] == "mail ops@plant.example"
        one = EmbeddingRequest(model="m", input="call +44 20 7946 0958")
        assert MASKER.mask_inputs(one)[0].input == "call [PHONE]"
        clean = EmbeddingRequest(model="m", input=["line 3 stopped"])
        assert MASKER.mask_inputs(clean)[0] is clean

    def test_token_ids_go_as_given(self) -> None:
        """Inputs of token ids are not text the router can read: they are sent unchanged."""
        ids = EmbeddingRequest(model="m", input=[[101, 2023, 102]])
        assert MASKER.mask_inputs(ids) == (ids, {})
