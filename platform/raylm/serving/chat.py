"""Chat messages -> the prompt text a causal LM continues.

A tokenizer with a chat template renders the conversation itself (`apply_chat_template` with the generation
prompt). Without one (raylm's own tokenizers, base models) the documented default is one line per message,
`<role>: <content>`, then `assistant:`; generation also stops where the model would start the user's next turn
(`\nuser:`), so a reply never includes a made-up question. OpenAI's `developer` role is the `system` role on both
paths (templates written before it existed know only `system`). A template that refuses the conversation (Jinja's
`raise_exception`: a system message it does not take, roles that do not alternate) is the client's to fix: a 400
naming `messages`, with the template's own words.
"""

from __future__ import annotations

from jinja2.exceptions import TemplateError

from raylm.serving.errors import ClientError

DEFAULT_STOP = "\nuser:"


def render_chat(tokenizer, messages: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """(prompt text, stop strings the template implies) for `(role, content)` messages."""
    messages = [("system" if role == "developer" else role, content) for role, content in messages]
    if getattr(tokenizer, "chat_template", None):
        conversation = [{"role": role, "content": content} for role, content in messages]
        try:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except TemplateError as err:
            raise ClientError(
                400, f"the model's chat template refuses these messages: {err}", "messages", "invalid_messages"
            ) from None
        return text, []
    lines = [f"{role}: {content}" for role, content in messages]
    return "\n".join(lines) + "\nassistant:", [DEFAULT_STOP]
