"""Read the text out of trl's prompts and completions, whichever form they take.

trl passes standard completions as strings and conversational ones as a list with one
assistant message (`[{"role": "assistant", "content": "..."}]`); prompts likewise. Malformed
values read as empty text rather than raising.
"""

from __future__ import annotations

from typing import Any


def message_text(message: Any) -> str:
    """A message's text: its `content` (a string, or text parts of a multimodal list)."""
    if isinstance(message, str):
        return message
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def completion_text(completion: Any) -> str:
    """The generated text: a string as is; a conversation's assistant turns, joined."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return message_text(completion)
    if isinstance(completion, list | tuple):
        turns = [m for m in completion if isinstance(m, dict) and m.get("role", "assistant") == "assistant"]
        return "".join(message_text(m) for m in turns)
    return ""


def prompt_text(prompt: Any) -> str:
    """The question: a string as is; a conversation's last user turn (else its last turn)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list | tuple) and prompt:
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return message_text(users[-1] if users else prompt[-1])
    return ""
