"""OpenAI's presence and frequency penalties and logit bias: applied per row by the sampler, and per row of a
batch by the decoder (with the tiny test model, rows with different parameters decoded together)."""

from __future__ import annotations

import threading
import time
from multiprocessing import Pipe

import numpy as np

from services.local_inference.decoder import Decoder
from services.local_inference.ipc import Delta, Finished, Rejected, RowSpec, Shutdown, Submit
from services.local_inference.registry import ModelSpec
from services.local_inference.sampling import RowSampler
from tests.support import FIXTURE_MODEL


def greedy(**kwargs: object) -> RowSampler:
    args: dict[str, object] = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0,
                               "seed": None, **kwargs}
    return RowSampler(**args)  # type: ignore[arg-type]


def picks(sampler: RowSampler, logits: list[float], n: int) -> list[int]:
    fixed = np.array(logits, dtype=np.float32)
    return [sampler.choose(fixed) for _ in range(n)]


class TestPenalties:
    def test_frequency_penalty_moves_greedy_off_a_repeated_token(self) -> None:
        """Each use of a token lowers its logit by the penalty, so greedy decoding alternates instead of repeating."""
        assert picks(greedy(), [2.0, 1.5, 0.0], 4) == [0, 0, 0, 0]
        assert picks(greedy(frequency_penalty=1.0), [2.0, 1.5, 0.0], 4) == [0, 1, 0, 1]

    def test_presence_penalty_counts_a_token_once(self) -> None:
        """The presence penalty is paid once per token used, however often: after each token was used once,
        the most likely one wins again and keeps winning."""
        assert picks(greedy(presence_penalty=1.0), [2.0, 1.5, 1.2], 6) == [0, 1, 2, 0, 0, 0]
        assert picks(greedy(frequency_penalty=1.0), [2.0, 1.5, 1.2], 6) == [0, 1, 2, 0, 1, 2]

    def test_negative_penalty_favours_tokens_already_used(self) -> None:
        """A negative frequency penalty keeps a sampled row on a token it used: here it never leaves it."""
        s = RowSampler(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=3, frequency_penalty=-2.0)
        first, *rest = picks(s, [0.0] * 4, 40)
        assert rest.count(first) >= 38

    def test_the_prompt_is_not_counted(self) -> None:
        """Only the tokens the row generated count: a prompt full of token 0 does not penalise it."""
        assert picks(greedy(frequency_penalty=2.0, history=[0] * 10), [2.0, 1.5], 1) == [0]

    def test_penalised_rows_leave_the_library_search(self) -> None:
        """A greedy row with a penalty or a bias is chosen here; without them the library's search does it."""
        assert greedy().native
        assert not greedy(presence_penalty=0.5).native
        assert not greedy(frequency_penalty=-0.5).native
        assert not greedy(logit_bias={3: 1.0}).native


class TestLogitBias:
    def test_minus_100_bans_a_token(self) -> None:
        """A bias of -100 keeps the most likely token from ever being picked."""
        assert set(picks(greedy(logit_bias={0: -100.0}), [5.0, 1.0, 0.0], 5)) == {1}

    def test_plus_100_forces_a_token_even_when_sampling(self) -> None:
        """A bias of +100 makes an unlikely token the only one drawn at temperature 1."""
        s = RowSampler(temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=1, logit_bias={2: 100.0})
        assert set(picks(s, [5.0, 4.0, -3.0], 50)) == {2}


PROMPT = "Why did line 3 stop on the 3rd?"


def row(key: int, **kwargs: object) -> RowSpec:
    return RowSpec(key=key, messages=[{"role": "user", "content": PROMPT}], max_tokens=24, temperature=0.0,
                   top_p=1.0, seed=None, stop=[], deadline=time.time() + 60, **kwargs)  # type: ignore[arg-type]


def decode(rows: list[RowSpec]) -> dict[int, str | Rejected]:
    """Decode ``rows`` submitted together; each row's text, or its refusal."""
    ours, theirs = Pipe()
    d = Decoder(spec=ModelSpec(name="tiny", path=FIXTURE_MODEL, context_length=4096), max_batch=8, conn=theirs)
    d.load(1)
    ours.send(Submit(rows))
    loop = threading.Thread(target=d.run, daemon=True)
    loop.start()
    texts: dict[int, str] = {r.key: "" for r in rows}
    ends: dict[int, Finished | Rejected] = {}
    try:
        while len(ends) < len(rows):
            assert ours.poll(60), "the decoder went quiet"
            for event in ours.recv():
                if isinstance(event, Delta):
                    texts[event.key] += event.text
                elif isinstance(event, Finished | Rejected):
                    ends[event.key] = event
    finally:
        ours.send(Shutdown())
        loop.join(10)
    return {k: e if isinstance(e, Rejected) else texts[k] for k, e in ends.items()}


class TestInABatch:
    def test_rows_with_different_penalties_share_a_batch(self) -> None:
        """In one batch, a penalised row, a biased row and a plain greedy row each get what they get alone."""
        alone = [decode([r])[r.key] for r in (row(1), row(2, frequency_penalty=2.0), row(3, logit_bias={5: 100.0}))]
        together = decode([row(1), row(2, frequency_penalty=2.0), row(3, logit_bias={5: 100.0})])
        assert [together[1], together[2], together[3]] == alone
        assert alone[1] != alone[0]  # the penalty changed the greedy answer
        assert isinstance(alone[2], str)
        assert len(set(alone[2])) == 1

    def test_a_bias_on_a_token_the_model_lacks_is_refused(self) -> None:
        """A logit_bias key outside the vocabulary is refused before decoding; its batch mates are answered."""
        out = decode([row(1, logit_bias={10_000: 1.0}), row(2)])
        refused = out[1]
        assert isinstance(refused, Rejected)
        assert (refused.reason, refused.detail) == ("invalid", {"token": 10_000, "vocab_size": 435})
        assert isinstance(out[2], str)
        assert out[2]
