"""Which of a chat prompt's tokens are its system message: the prefix a conversation pins."""

from __future__ import annotations

from collections.abc import Sequence

from jinja2 import TemplateError

__all__ = ["system_prefix_length"]


def system_prefix_length(tokenizer, messages: Sequence[dict], prompt_ids: Sequence[int], limit: int) -> int:
    """How many leading tokens of prompt_ids (the chat template's rendering of `messages`)
    render the system message, at most `limit`: the template's rendering of the system message
    alone, as far as the prompt starts with it (a template may render a lone system message
    with a different ending). 0 without a leading system message, or when the template will not
    render a system message alone."""
    if limit <= 0 or not messages or messages[0].get("role") != "system":
        return 0
    try:
        rendered = tokenizer.apply_chat_template(list(messages[:1]), tokenize=False)
    except TemplateError:  # a template that wants a user turn after the system message: no pin
        return 0
    system_ids = tokenizer(rendered, add_special_tokens=False).input_ids
    common = 0
    for ours, theirs in zip(system_ids, prompt_ids):
        if ours != theirs:
            break
        common += 1
    return min(common, limit)
