"""The published contracts stay in step with the code."""

from __future__ import annotations

import json

from schemas.export import schemas
from shared.asyncapi import document
from tests.support import ROOT


def test_json_schemas_are_current() -> None:
    """schemas/json holds exactly what the pydantic models export (run `just schemas` after a change)."""
    folder = ROOT / "schemas" / "json"
    on_disk = {p.name: p.read_text() for p in folder.glob("*.json")}
    assert on_disk == schemas()


def test_asyncapi_document_is_current() -> None:
    """docs/asyncapi.json is what the FastStream apps generate (run `just asyncapi` after a change)."""
    assert (ROOT / "docs" / "asyncapi.json").read_text() == document()


def test_asyncapi_names_the_public_subjects() -> None:
    """The NATS API a client uses is in the document."""
    addresses = {c["address"] for c in json.loads(document())["channels"].values()}
    assert {"lw.v1.{site}.chat", "lw.v1.{site}.models", "lw.v1.{site}.cancel"} <= addresses
