"""Small helpers shared by tests (independent of the code under test)."""

from __future__ import annotations

import torch


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())



def labelled_session(store, lm, spec: list[tuple[str, list[tuple[str, str]]]], chat: bool = False,
                     name: str = "test") -> int:
    """A session of `spec` = [(prompt, [(completion text, label), ...]), ...] with stored token ids.

    Completion token ids are the tokenizer's ids of the text (no special tokens); labels are
    "positive", "negative" or "unlabelled".
    """
    session_id = store.create_session(name, model_id=lm.model_id)
    for prompt, completions in spec:
        prompt_id = store.add_prompt(session_id, prompt, prompt_ids=lm.prompt_ids(prompt, chat=chat), chat=chat)
        for seed, (text, label) in enumerate(completions):
            token_ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
            completion_id = store.add_completion(prompt_id, text, token_ids, seed, {}, model_id=lm.model_id)
            store.set_label(completion_id, label)
    return session_id
