"""tfb_core.serving.generation without the server: a running decode that requests join between
steps, one that the decode refuses (another sigma of one adapter) started after it, cancellation,
and the text held back while a stop string may still cut it."""

from __future__ import annotations

import pytest
import torch
from test_app_support import make_settings

from tfb_core.forward.completion import GenerationRequest, StopRule
from tfb_core.serving.generation import GenerationBatch, GenerationService, GenerationSettings, held_back, text_offsets
from tfb_core.serving.startup import load_engine


@pytest.fixture(scope="module")
def service(tiny):
    cfg = make_settings(tiny, sigma=0.3).engine_configs()[0][1].with_defaults()
    return GenerationService(load_engine(cfg, progress=False))


def _run(batch: GenerationBatch, limit: int = 100) -> list:
    updates = []
    for _ in range(limit):
        if not batch.busy:
            return updates
        updates += batch.step()
    raise AssertionError("the decode did not end")


def test_a_request_the_running_decode_refuses_starts_after_it_and_answers_as_alone(service):
    engine = service.adapters.default
    tokens = service.encode_prompt("a great film")
    a = service.request(engine, tokens, GenerationSettings(max_tokens=4, n_samples=3, stop_token_ids=()))
    b = GenerationRequest(tokens, n_samples=3, sigma=0.1, max_tokens=3, stop_token_ids=(), seed=2)  # another sigma
    c = service.request(engine, service.encode_prompt("a dull mess"),
                        GenerationSettings(max_tokens=2, n_samples=2, stop_token_ids=()))
    batch = GenerationBatch(service)
    batch.submit("a", a, stream=True)
    updates = batch.step()
    batch.submit("b", b, stream=True)
    batch.submit("c", c)
    updates += _run(batch)
    order = [(u.key, "end" if u.result else "token") for u in updates]
    assert order.index(("b", "token")) > order.index(("a", "end"))  # b waited for a's decode to end
    assert order.index(("c", "end")) < order.index(("a", "end"))  # c joined a's decode
    assert not any(k == "c" and kind == "token" for k, kind in order)  # not streamed: its result only
    results = {u.key: u.result for u in updates if u.result}
    for key, req in (("a", a), ("b", b), ("c", c)):
        alone = service.generator.generate([req])[0].completion
        got = results[key]["completion"]
        assert got["token_ids"] == alone.token_ids
        torch.testing.assert_close(torch.tensor([t["mutual_information"] for t in got["tokens"]], dtype=torch.float64),
                                   torch.tensor([t.mutual_information for t in alone.tokens], dtype=torch.float64),
                                   atol=2e-5, rtol=1e-4)
    streamed = "".join(u.text for u in updates if u.key == "a" and u.token)
    assert streamed == results["a"]["completion"]["text"]


def test_cancel_takes_a_request_out_waiting_or_decoding(service):
    engine = service.adapters.default
    tokens = service.encode_prompt("a great film")
    settings = GenerationSettings(max_tokens=50, n_samples=3, stop_token_ids=())
    batch = GenerationBatch(service)
    batch.submit("a", service.request(engine, tokens, settings))
    batch.submit("b", service.request(engine, tokens, settings))
    batch.step()
    assert batch.rows == 6
    assert batch.cancel("a") and batch.rows == 3
    batch.submit("c", service.request(engine, tokens, settings))
    assert batch.cancel("c") and not batch.cancel("c")  # waiting: never decoded
    assert batch.cancel("b") and not batch.busy and batch.rows == 0


def test_held_back_is_the_tail_a_stop_string_may_still_complete():
    assert held_back("the answer is 4", ["\n\n"]) == 0
    assert held_back("the answer\n", ["\n\n"]) == 1
    assert held_back("say STO", ["STOP", "x"]) == 3
    assert held_back("ab\ufffd", []) == 1  # the bytes of a character still to come
    # a stop string that starts before an incomplete character: both held (the character may complete it)
    assert held_back("xa\ufffd", ["a\U0001f389"]) == 2


EMOJI = "ab\U0001f389\U0001f389cd"  # two party poppers: four bytes each, three Llama 3 tokens each


def _stop_at(tok, text: str, stop: list[str]) -> tuple[int, tuple]:
    """(tokens decoded, StopRule's verdict) feeding ``text``'s tokens one by one, as a decode does."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    rule = StopRule(len(ids), frozenset(), tuple(stop))
    for n in range(1, len(ids) + 1):
        verdict = rule.check(ids[n - 1], n, tok.decode(ids[:n], skip_special_tokens=True))
        if verdict is not None:
            return n, verdict
    raise AssertionError("never ended")


def test_stop_strings_match_characters_split_over_tokens(llama3_tokenizer):
    """A real byte-level tokenizer splits an emoji over tokens (the decode shows U+FFFD until its
    last byte): a stop string of it matches once the character is whole, and U+FFFD as a stop string
    never meets a character that is only incomplete."""
    tok = llama3_tokenizer
    ids = tok(EMOJI, add_special_tokens=False)["input_ids"]
    prefixes = [tok.decode(ids[:n]) for n in range(1, len(ids) + 1)]
    assert any(p.endswith("\ufffd") for p in prefixes)  # the emoji spans tokens
    whole = next(n for n, p in enumerate(prefixes, 1) if "\U0001f389" in p)
    assert _stop_at(tok, EMOJI, ["\U0001f389"]) == (whole, ("stop", "\U0001f389", 2))
    assert _stop_at(tok, EMOJI, ["b\U0001f389"]) == (whole, ("stop", "b\U0001f389", 1))
    assert _stop_at(tok, EMOJI, ["\U0001f389\U0001f389"])[1] == ("stop", "\U0001f389\U0001f389", 2)
    assert _stop_at(tok, EMOJI, ["\ufffd"]) == (len(ids), ("length", None, -1))


def test_text_offsets_count_characters_of_the_text(llama3_tokenizer):
    """Each token's offset is where its character begins in the text: the three pieces of an emoji
    share its offset, and the tokens after it stand where the text has them."""
    tok = llama3_tokenizer
    text = "a\U0001f389b\u65e5\u672c\u8a9e"  # a, party popper, b, three CJK characters
    ids = tok(text, add_special_tokens=False)["input_ids"]
    offsets = text_offsets(tok, ids)
    # the emoji in three tokens: incomplete after the first two, whole after the third
    assert len(ids) == 7 and [tok.decode(ids[:n]) for n in (2, 3, 4)] == ["a\ufffd", "a\ufffd", "a\U0001f389"]
    assert offsets == [0, 1, 1, 1, 2, 3, 5]
    for n, o in enumerate(offsets):
        assert text[:o] == tok.decode(ids[:n]).rstrip("\ufffd")


def test_a_default_max_tokens_fits_the_context_a_clients_is_refused_over_it(service):
    engine = service.adapters.default
    tokens = service.encode_prompt("a great film")
    room = service.context - len(tokens)
    fitted = service.request(engine, tokens, GenerationSettings(max_tokens=room + 50, fit_context=True))
    assert fitted.max_tokens == room
    with pytest.raises(ValueError, match="over the model's context") as err:
        service.request(engine, tokens, GenerationSettings(max_tokens=room + 1))
    assert err.value.param == "max_tokens"


def test_token_bytes_are_the_tokens_own_bytes(service):
    text = "naïve 日本語 — ok"
    ids = service.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(bytes(service.token_bytes(i)) for i in ids) == text.encode("utf-8")
    assert any("\ufffd" in service.piece(i) for i in ids)  # some token holds part of a character only
