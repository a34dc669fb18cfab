"""A stream that fell behind its engine sends the steps already queued as one message: same tokens and
text, in order, the last step's end, and an error never merged into tokens that came before it."""

from __future__ import annotations

import queue

from decode_service.server import _coalesce
from zeroc.engine import StepOutput


def _queue(*items) -> queue.Queue:
    q: queue.Queue = queue.Queue()
    for item in items:
        q.put(item)
    return q


def test_queued_steps_join_up_to_the_finished_one():
    q = _queue(StepOutput("r", [2], "b", False), StepOutput("r", [3, 4], "cd", True, "length", 0.5, 1),
               StepOutput("r", [9], "z", False))  # nothing after the end belongs to this message
    out, leftover = _coalesce(q, StepOutput("r", [1], "a", False))
    assert (out.token_ids, out.text_delta, out.finished, out.finish_reason) == ([1, 2, 3, 4], "abcd", True, "length")
    assert (out.queued_s, out.preemptions, leftover, q.qsize()) == (0.5, 1, None, 1)


def test_a_lone_step_is_sent_as_it_is():
    first = StepOutput("r", [1], "a", False)
    assert _coalesce(_queue(), first) == (first, None)


def test_an_error_is_left_for_after_the_tokens_before_it():
    failed = StepOutput("r", [], "", True, "error", error="non-finite logits")
    out, leftover = _coalesce(_queue(StepOutput("r", [2], "b", False), failed), StepOutput("r", [1], "a", False))
    assert (out.token_ids, out.text_delta, out.finished, leftover) == ([1, 2], "ab", False, failed)
    boom = RuntimeError("engine failed")
    out, leftover = _coalesce(_queue(boom), StepOutput("r", [1], "a", False))
    assert (out.token_ids, leftover) == ([1], boom)


def test_joined_steps_keep_each_tokens_logprobs_in_order():
    from zeroc.sampling import TokenLogprobs

    lp = [TokenLogprobs(-0.5, ((1, -0.5),)), TokenLogprobs(-1.5, ((7, -0.2),)), TokenLogprobs(-2.0, ((3, -2.0),))]
    q = _queue(StepOutput("r", [2], "b", False, logprobs=(lp[1],)), StepOutput("r", [3], "c", True, "stop",
                                                                               logprobs=(lp[2],)))
    out, _ = _coalesce(q, StepOutput("r", [1], "a", False, logprobs=(lp[0],)))
    assert out.token_ids == [1, 2, 3] and out.logprobs == tuple(lp)


def test_joined_steps_keep_the_prompts_logprobs_of_the_first_token():
    from zeroc.sampling import TokenLogprobs

    prompt = (TokenLogprobs(-3.0), TokenLogprobs(-0.25))
    q = _queue(StepOutput("r", [2], "b", False), StepOutput("r", [3], "c", True, "stop"))
    out, _ = _coalesce(q, StepOutput("r", [1], "a", False, prompt_logprobs=prompt))
    assert out.token_ids == [1, 2, 3] and out.prompt_logprobs == prompt
    out, _ = _coalesce(_queue(StepOutput("r", [3], "c", True, "stop")), StepOutput("r", [2], "b", False))
    assert out.prompt_logprobs is None
