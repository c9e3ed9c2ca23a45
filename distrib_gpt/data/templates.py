"""Prompt templates: how an (instruction, context) pair becomes the text the model reads.

The response follows the prompt directly and is terminated by GPT-2's end-of-text token
(added at tokenization, not here). Training and generation must use the same prompt, so
`format_prompt` is the one public entry point for both.

`dolly` is Databricks' own training template (databrickslabs/dolly, training/consts.py),
verbatim up to and including "### Response:\n". Dolly closes the response with
"\n\n### End"; we use end-of-text instead, which GPT-2 already knows as a stop signal.
`alpaca` is Stanford Alpaca's (tatsu-lab/stanford_alpaca, train.py), verbatim: its prompt
ends with "### Response:" and no newline, so the response text follows the colon directly.
"""

from __future__ import annotations

import string

from distrib_gpt.config import DataConfig
from distrib_gpt.data.sources import DataError

DOLLY_INTRO = "Below is an instruction that describes a task. Write a response that appropriately completes the request."

DOLLY_PROMPT = DOLLY_INTRO + "\n\n### Instruction:\n{instruction}\n\n### Response:\n"
DOLLY_PROMPT_WITH_CONTEXT = DOLLY_INTRO + "\n\n### Instruction:\n{instruction}\n\nInput:\n{context}\n\n### Response:\n"

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_PROMPT_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:"
)

# name -> (with context, without context)
TEMPLATES: dict[str, tuple[str, str]] = {
    "dolly": (DOLLY_PROMPT_WITH_CONTEXT, DOLLY_PROMPT),
    "alpaca": (ALPACA_PROMPT_WITH_CONTEXT, ALPACA_PROMPT),
}

_FIELDS = {"instruction", "context"}


def _check_custom(template: str, key: str) -> None:
    """Reject placeholders other than {instruction}/{context} before formatting thousands of records."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:  # e.g. a single '{'
        raise DataError(f"data.{key}: invalid template: {e} (write literal braces as '{{{{' and '}}}}')") from None
    for name in names:
        if name not in _FIELDS:
            raise DataError(f"data.{key}: unknown placeholder '{{{name}}}'; use {{instruction}} and {{context}}")


def prompt_templates(cfg: DataConfig) -> tuple[str, str]:
    """(with-context, no-context) template strings for `cfg.template` (not `none`)."""
    if cfg.template == "custom":
        if cfg.prompt_template is None:
            raise DataError("data.prompt_template: is required when data.template is 'custom'")
        with_ctx = cfg.prompt_template
        # Without a dedicated no-context template, the main one is used with context "".
        no_ctx = cfg.prompt_template_no_context if cfg.prompt_template_no_context is not None else with_ctx
        _check_custom(with_ctx, "prompt_template")
        _check_custom(no_ctx, "prompt_template_no_context")
        return with_ctx, no_ctx
    return TEMPLATES[cfg.template]


def format_prompt(instruction: str, context: str, cfg: DataConfig) -> str:
    """The prompt for one example; the model's answer (the response) continues it.

    The no-context variant is used when `context` is empty or whitespace.
    """
    has_context = bool(context.strip())
    if cfg.template == "none":
        # Bare text: instruction, the context (if any) after a blank line, then a newline.
        return (instruction + "\n\n" + context if has_context else instruction) + "\n"
    with_ctx, no_ctx = prompt_templates(cfg)
    template = with_ctx if has_context else no_ctx
    return template.format(instruction=instruction, context=context if has_context else "")
