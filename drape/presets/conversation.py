"""LLaVA's Vicuna v1 conversation template, rendered as text.

LLaVA-1.5 trains and evaluates Vicuna-7B-v1.5 with the ``vicuna_v1`` template of its
``llava/conversation.py`` (separator style ``TWO``). A conversation reads::

    {system} USER: {question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT:

Every user message is followed by ``sep`` (a space) and every assistant message by
``sep2`` (``</s>``, the end-of-sequence token). A turn without an answer ends at
``ASSISTANT:``, which is where generation starts.
"""

from __future__ import annotations

from dataclasses import dataclass

VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


@dataclass(frozen=True)
class ConversationTemplate:
    """A two-role chat format with one separator after user and one after assistant messages."""

    system: str
    user_role: str = "USER"
    assistant_role: str = "ASSISTANT"
    sep: str = " "  # after the system prompt and after each user message
    sep2: str = "</s>"  # after each assistant message

    def render(self, turns: list[tuple[str, str | None]]) -> str:
        """Render ``(user, assistant)`` turns; ``None`` as the last answer leaves the reply open."""
        if not turns:
            raise ValueError("a conversation needs at least one turn")
        text = self.system + self.sep
        for index, (user, assistant) in enumerate(turns):
            text += f"{self.user_role}: {user}{self.sep}"
            if assistant is None:
                if index != len(turns) - 1:
                    raise ValueError(f"turn {index} has no answer but is not the last turn")
                text += f"{self.assistant_role}:"
            else:
                text += f"{self.assistant_role}: {assistant}{self.sep2}"
        return text

    def split(self, bos_token: str = "<s>") -> tuple[str, str]:
        """Return the text before and after the user content of a one-turn generation prompt.

        This is the split that :class:`drape.mllm.FrozenLLM` takes from a tokenizer's chat
        template: ``prefix + content + suffix`` equals ``bos_token + render([(content,
        None)])``. The prefix starts with ``bos_token`` because FrozenLLM tokenizes it
        without special tokens, while LLaVA starts every sequence with ``<s>``.

        NOTE: the answer follows the suffix without the space that ``render`` puts after
        ``ASSISTANT:``. The Llama SentencePiece tokenizer prepends that space to the first
        word of a text it tokenizes alone (``Paris`` becomes ``▁Paris``), so the tokens
        match LLaVA's for answers that start with a word.
        """
        marker = "\u2063CONTENT\u2063"
        before, after = (bos_token + self.render([(marker, None)])).split(marker)
        return before, after


VICUNA_V1 = ConversationTemplate(system=VICUNA_V1_SYSTEM)
TEMPLATES = {"vicuna_v1": VICUNA_V1}
