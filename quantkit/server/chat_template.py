"""Chat messages to prompt text: the tokenizer's own chat template, or a plain default.

A checkpoint that ships a chat template (``tokenizer.chat_template``) gets it, rendered by
transformers (its sandboxed Jinja) with the generation prompt added. One without (the bundled
models were trained on plain text) gets a readable default that a base model can continue::

    System: You are terse.
    User: What is the capital of France?
    Assistant:

Templates come only from the served checkpoint, never from a request.
"""

from __future__ import annotations

from quantkit.server.errors import bad_request

_ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_plain(messages: list[tuple[str, str]]) -> str:
    """The default template: one ``Role: text`` line per message, then ``Assistant:``."""
    lines = [f"{_ROLE_NAMES[role]}: {text}" for role, text in messages]
    return "\n".join([*lines, "Assistant:"])


def render(tokenizer, messages: list[tuple[str, str]]) -> str:
    """Prompt text for ``(role, text)`` messages."""
    if not messages:
        raise bad_request("'messages' must hold at least one message", param="messages")
    if not has_template(tokenizer):
        return render_plain(messages)
    try:
        return tokenizer.apply_chat_template([{"role": role, "content": text} for role, text in messages],
                                             tokenize=False, add_generation_prompt=True)
    except Exception as error:  # noqa: BLE001 - a template may refuse an order of roles, etc.
        raise bad_request(f"the model's chat template refused these messages: {error}", param="messages") from None
