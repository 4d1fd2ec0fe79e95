"""The Alpaca prompt format, shared by training, evaluation and the chat template."""

from __future__ import annotations

PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)

# Renders a conversation in the Alpaca format; the generation prompt is "### Response:\n".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] + '\\n\\n' }}{% set rest = messages[1:] %}"
    "{% else %}{{ '" + PREAMBLE + "\\n\\n' }}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}"
    "{% if m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'assistant' %}"
    "{{ '### Response:\\n' + m['content'] + eos_token + '\\n\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The prompt part of an Alpaca record (everything before the response)."""
    if input_text.strip():
        return (
            f"{PREAMBLE_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n"
            f"### Input:\n{input_text}\n\n### Response:\n"
        )
    return f"{PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Response:\n"
