"""Chat messages -> the prompt text a causal LM continues.

A tokenizer with a chat template renders the conversation itself (`apply_chat_template` with the generation
prompt). Without one (raylm's own tokenizers, base models) the documented default is one line per message,
`<role>: <content>`, then `assistant:`; generation also stops where the model would start the user's next turn
(`\nuser:`), so a reply never includes a made-up question.
"""

from __future__ import annotations

DEFAULT_STOP = "\nuser:"


def render_chat(tokenizer, messages: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """(prompt text, stop strings the template implies) for `(role, content)` messages."""
    if getattr(tokenizer, "chat_template", None):
        conversation = [{"role": role, "content": content} for role, content in messages]
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return text, []
    lines = [f"{'system' if role == 'developer' else role}: {content}" for role, content in messages]
    return "\n".join(lines) + "\nassistant:", [DEFAULT_STOP]
