# ruff: noqa: E501  (the official templates are verbatim)
"""The official chat templates of the families llmfab reproduces, and copies of them marked with
{% generation %} so that data/chat.py gets exact assistant masks on every turn.

A marked copy renders exactly the text of its official template (tests/test_hub_models.py checks it on
many conversations); it is used for encoding only, when a tokenizer's template is string-equal to the
official one, so a checkpoint keeps the template it came with. Each copy marks an assistant turn's
content and its turn terminator, not the header before it nor the newline after it.

Sources: tokenizer_config.json of Qwen/Qwen2-0.5B-Instruct (ChatML with a default system prompt),
meta-llama/Llama-3.1-8B-Instruct (date header, tools) and google/gemma-2-2b-it (no system role).
"""

from __future__ import annotations

import re

GENERATION_MARK = re.compile(r"{%-?\s*generation\s*-?%}")

QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The template's string literals hold real newlines (as "\n" in tokenizer_config.json).
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""


def _marked(official: str, *edits: tuple[str, str]) -> str:
    """`official` with each (old, new) edit applied; an old text must occur exactly once."""
    out = official
    for old, new in edits:
        if out.count(old) != 1:
            raise AssertionError(f"marking a chat template: {old!r} occurs {out.count(old)} times")
        out = out.replace(old, new)
    return out


_QWEN2_TURN = "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
QWEN2_MARKED = _marked(
    QWEN2,
    (
        _QWEN2_TURN,
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
        "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
        "{% else %}" + _QWEN2_TURN + "{% endif %}",
    ),
)

_GEMMA2_TURN = "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
GEMMA2_MARKED = _marked(
    GEMMA2,
    (
        _GEMMA2_TURN,
        "{% if role == 'model' %}{{ '<start_of_turn>model\n' }}"
        "{% generation %}{{ message['content'] | trim + '<end_of_turn>' }}{% endgeneration %}{{ '\n' }}"
        "{% else %}" + _GEMMA2_TURN + "{% endif %}",
    ),
)

_LLAMA31_HEADER = "'<|start_header_id|>assistant<|end_header_id|>\\n\\n'"
_LLAMA31_TURN = "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}"
LLAMA31_MARKED = _marked(
    LLAMA31,
    # A plain turn: the header stays outside the block.
    (
        "        " + _LLAMA31_TURN,
        "        {%- if message.role == 'assistant' %}{{- " + _LLAMA31_HEADER + " }}"
        "{%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}"
        "{%- else %}" + _LLAMA31_TURN + "{%- endif %}",
    ),
    # A tool call: its header once before the block (both branches wrote the same one), the call and its
    # <|eom_id|> / <|eot_id|> inside.
    (
        "{%- set tool_call = message.tool_calls[0].function %}",
        "{%- set tool_call = message.tool_calls[0].function %}{{- " + _LLAMA31_HEADER + " }}{%- generation %}",
    ),
    (
        "            {{- " + _LLAMA31_HEADER + ' -}}\n            {{- "<|python_tag|>"',
        '            {{- "<|python_tag|>"',
    ),
    ("            {{- " + _LLAMA31_HEADER + ' -}}\n            {{- \'{"name"', '            {{- \'{"name"'),
    (
        '            {{- "<|eot_id|>" }}\n        {%- endif %}',
        '            {{- "<|eot_id|>" }}\n        {%- endif %}{%- endgeneration %}',
    ),
)

# Official template -> its marked copy.
MARKED = {QWEN2: QWEN2_MARKED, LLAMA31: LLAMA31_MARKED, GEMMA2: GEMMA2_MARKED}


def has_generation_marks(template: str) -> bool:
    return bool(GENERATION_MARK.search(template))


def marked_template(template: str | None) -> str | None:
    """A template that marks assistant turns for `template`: itself when it has marks, the marked copy of
    an official one, else None (data/chat.py then masks by rendering turn by turn)."""
    if not template:
        return None
    return template if has_generation_marks(template) else MARKED.get(template)
