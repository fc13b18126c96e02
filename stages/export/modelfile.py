"""An Ollama Modelfile for the exported GGUF: the system prompt training used, the stop token,
eval's decoding settings, and the chat template written as Ollama's Go template.

Ollama does not run Jinja: a Modelfile without TEMPLATE makes Ollama guess the template from
the GGUF's Jinja text. The families below are written out exactly (recognised by the markers
the HF template renders); another template is left to Ollama's guess, and the file says so.
"""

from __future__ import annotations

from typing import Any

CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

"""
GEMMA = """{{- range $i, $m := .Messages }}<start_of_turn>{{ if eq $m.Role "assistant" }}model{{ else }}user{{ end }}
{{ if and $.System (eq $i 0) }}{{ $.System }}

{{ end }}{{ $m.Content }}<end_of_turn>
{{ end }}<start_of_turn>model
"""
FAMILIES = {"<|im_start|>": ("chatml", CHATML), "<|start_header_id|>": ("llama3", LLAMA3), "<start_of_turn>": ("gemma", GEMMA)}


def template_family(rendered: str) -> tuple[str, str] | None:
    """(name, Go template) for a chat rendered by the HF template, or None when not known.

    >>> template_family("<|im_start|>user\\nhi<|im_end|>\\n")[0]
    'chatml'
    >>> template_family("[INST] hi [/INST]") is None
    True
    """
    for marker, family in FAMILIES.items():
        if marker in rendered:
            return family
    return None


def modelfile_text(gguf_file: str, tok: Any, system_prompt: str | None, stop: str, sampling: dict[str, Any]) -> str:
    """The Modelfile: FROM the GGUF beside it, TEMPLATE, SYSTEM, stop and decoding PARAMETERs."""
    probe = [{"role": "user", "content": "hi"}]
    family = template_family(tok.apply_chat_template(probe, tokenize=False, add_generation_prompt=True))
    lines = [
        "# Written by `sftflow export gguf`. Load it with:",
        "#   ollama create sftflow -f Modelfile && ollama run sftflow",
        f"FROM ./{gguf_file}",
    ]
    if family is None:
        lines.append("# The chat template is not one written out here: Ollama derives it from the GGUF's own template.")
    else:
        lines += [f"# The {family[0]} chat template, as the model was trained with it.", f'TEMPLATE """{family[1]}"""']
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines.append(f'PARAMETER stop "{stop}"')
    for key, value in sampling.items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"
