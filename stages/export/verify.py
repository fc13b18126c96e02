"""Check each GGUF against the HF model it came from, in llama.cpp itself (llama-cpp-python).

- Replies: the held-out prompts (eval.data, with data.system_prompt as training had it) go
  to `create_chat_completion`, which renders them with the chat template *read from the GGUF*
  and decodes greedily (temperature 0) until an end-of-generation token; the HF model answers
  the same messages greedily with `generate`. Equal text (stripped) counts as equal.
- Logits: the next-token logits after each of a few prompts (the same token ids, rendered by
  the HF tokenizer), compared over the whole vocabulary: max |Δlogit| and whether the argmax
  agrees. The HF side runs in float32 on the CPU whatever device merge/eval use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.core.chats import with_system_prompt
from stages.core.eval_chats import read_eval_chats


def held_out_prompts(eval_data: Path, system_prompt: str | None, n: int) -> list[list[dict[str, str]]]:
    """The first n held-out chats without their reference reply, system prompt put first."""
    chats = read_eval_chats(eval_data)[:n]
    return [with_system_prompt(c["messages"], system_prompt)[:-1] for c in chats]


class HFReference:
    """The merged model in float32 on the CPU: greedy replies and next-token logits."""

    def __init__(self, model_dir: Path) -> None:
        from stages.core.loading import load_causal_lm, load_tokenizer
        from stages.core.turns import end_of_turn

        self.tok = load_tokenizer(model_dir)
        self.model = load_causal_lm(model_dir, "float32").eval()
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        stop = self.tok.encode(end_of_turn(self.tok), add_special_tokens=False)
        self.eos_ids = eos + [i for i in stop[:1] if len(stop) == 1 and i not in eos]

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def reply(self, messages: list[dict[str, str]], max_new_tokens: int) -> str:
        import torch

        ids = torch.tensor([self.prompt_ids(messages)])
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, eos_token_id=self.eos_ids, pad_token_id=self.tok.pad_token_id,
            )
        return self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()

    def next_logits(self, ids: list[int]) -> Any:
        import torch

        with torch.no_grad():
            return self.model(input_ids=torch.tensor([ids])).logits[0, -1].double().numpy()


def check_gguf(
    path: Path,
    hf: HFReference,
    prompts: list[list[dict[str, str]]],
    hf_replies: list[str],
    logit_prompts: int,
    max_new_tokens: int,
    threads: int = 0,
) -> dict[str, Any]:
    """Replies and next-token logits of the GGUF in llama.cpp against the HF model's."""
    import numpy as np
    from llama_cpp import Llama

    ids = [hf.prompt_ids(m) for m in prompts]
    n_ctx = max(len(i) for i in ids) + max_new_tokens + 16
    kwargs: dict[str, Any] = {"n_threads": threads} if threads > 0 else {}
    llm = Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0, **kwargs)
    replies = []
    for messages in prompts:
        out = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=max_new_tokens, seed=0)
        replies.append((out["choices"][0]["message"]["content"] or "").strip())
    diffs, agree, same_tokens = [], 0, 0
    for prompt in ids[:logit_prompts]:
        # the GGUF's own tokenizer must give the ids the HF tokenizer gives
        text = hf.tok.decode(prompt)
        same_tokens += int(llm.tokenize(text.encode(), add_bos=False, special=True) == prompt)
        llm.reset()
        llm.eval(prompt)
        ours = np.asarray(llm.scores[len(prompt) - 1], dtype=np.float64)
        ref = hf.next_logits(prompt)
        diffs.append(float(np.abs(ours - ref).max()))
        agree += int(ours.argmax() == ref.argmax())
    eog = _end_of_turn_is_eog(llm, hf)
    del llm
    equal = sum(a == b for a, b in zip(replies, hf_replies, strict=True))
    return {
        "replies_equal": equal,
        "replies_compared": len(prompts),
        "max_abs_logit_diff": max(diffs),
        "max_abs_logit_hf": float(max(np.abs(hf.next_logits(p)).max() for p in ids[:logit_prompts])),
        "next_token_agreement": f"{agree}/{len(diffs)}",
        "prompt_tokens_equal": f"{same_tokens}/{len(diffs)}",
        "end_of_turn_stops_generation": eog,
        "replies": replies,
    }


def _end_of_turn_is_eog(llm: Any, hf: HFReference) -> bool:
    """Whether llama.cpp ends generation at the template's end-of-turn token."""
    import llama_cpp

    from stages.core.turns import end_of_turn

    stop = hf.tok.encode(end_of_turn(hf.tok), add_special_tokens=False)
    if len(stop) != 1:
        return False
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return bool(llama_cpp.llama_vocab_is_eog(vocab, stop[0]))
