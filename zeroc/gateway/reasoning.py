"""Reasoning models' thinking, apart from their answer: `--reasoning-parser`, as vLLM's flag of the same name.

A reasoning model (DeepSeek-R1 and its Llama distillations, QwQ, Qwen3) thinks in a block, `<think>...</think>`,
before it answers. With a parser the gateway returns the block's text as the message's `reasoning_content` (the
name DeepSeek's API and most clients read; also as `reasoning`, vLLM's newer name) and what follows it as the
`content`, streamed as each part comes. One syntax serves both names (vLLM's `deepseek_r1` and `qwen3`):
- whether the answer starts inside the block is read from the prompt the chat template rendered: the block is open
  where the prompt's last `<think>` comes after its last `</think>`, or it holds neither (R1's template opens it in
  the prompt; Qwen3's model opens it itself, and its template closes an empty one when `enable_thinking` is false).
  A `<think>` the model writes itself at the start is dropped;
- an answer that never closes the block (cut short by max_tokens) is all reasoning, with no content;
- the blank lines after `</think>` are not content.
The content then goes to the tool-call parser where one is set. A guided answer (`response_format`, a forced tool
call) is guided after `</think>` only (`Guide.after`): the model thinks freely first, as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zeroc.gateway.tool_parsers import marker_prefix


@dataclass(frozen=True)
class ThinkSyntax:
    start: str = "<think>"
    end: str = "</think>"

    def open_after(self, prompt: str) -> bool:
        """Whether an answer to the rendered `prompt` starts inside the thinking block."""
        return prompt.rfind(self.start) >= prompt.rfind(self.end)  # both absent: -1 >= -1


REASONING_PARSERS: dict[str, ThinkSyntax] = {"deepseek_r1": ThinkSyntax(), "qwen3": ThinkSyntax()}


@dataclass
class _State:
    phase: str  # "lead": in the block, a `<think>` may still come; "thinking"; "answer"
    held: str = ""  # text received but not yet sent: it may begin a marker
    started: bool = True  # in "answer": its first non-blank character has come


@dataclass
class Reasoning:
    """One request's split of each choice's text into (reasoning, content), whole or as it streams."""

    syntax: ThinkSyntax
    open: bool  # the answer starts inside the block (`ThinkSyntax.open_after` of its prompt)
    _states: dict[int, _State] = field(default_factory=dict)

    def whole(self, text: str) -> tuple[str | None, str]:
        """(the reasoning, None where the answer starts outside the block; the content) of a whole text."""
        thought, content = self._feed(self._fresh(), text, True)
        return (thought if self.open else None), content

    def delta(self, index: int, text: str, final: bool) -> tuple[str, str]:
        """Choice `index`'s next piece of text -> the (reasoning, content) to send now; `final` flushes what was
        held back (the choice has finished)."""
        state = self._states.setdefault(index, self._fresh())
        out = self._feed(state, text, final)
        if final:
            del self._states[index]
        return out

    def _fresh(self) -> _State:
        return _State("lead") if self.open else _State("answer")

    def _feed(self, st: _State, text: str, final: bool) -> tuple[str, str]:
        buf, thought = st.held + text, ""
        st.held = ""
        if st.phase == "lead":
            head = buf.lstrip()
            if head.startswith(self.syntax.start):
                buf, st.phase = head[len(self.syntax.start):], "thinking"
            elif not final and self.syntax.start.startswith(head):  # blank, or the start of `<think>`: wait
                st.held = buf
                return "", ""
            else:
                st.phase = "thinking"
        if st.phase == "thinking":
            at = buf.find(self.syntax.end)
            if at < 0:
                keep = 0 if final else marker_prefix(buf, self.syntax.end)
                st.held = buf[len(buf) - keep:]
                return buf[: len(buf) - keep], ""
            thought, buf = buf[:at], buf[at + len(self.syntax.end):]
            st.phase, st.started = "answer", False
        if not st.started:  # the blank lines between the block and the answer
            buf = buf.lstrip()
            st.started = bool(buf)
        return thought, buf
