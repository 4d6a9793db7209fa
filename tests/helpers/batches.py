"""Small random batches for the step tests."""

import numpy as np


def preference_batch(seed, b, t, v, *, prompt_lengths=(2, 4), one_token_rejected=False):
    """Right-padded preference pairs sharing a prompt, int32 [b, t] each.

    Prompts have `prompt_lengths[0] .. prompt_lengths[1] - 1` tokens; responses 1 .. t - prompt
    tokens, drawn separately for chosen and rejected. With `one_token_rejected`, row 0's rejected
    response is a single token. Token ids are in [1, v); 0 pads.
    """
    rs = np.random.RandomState(seed)
    prompts = [rs.randint(1, v, size=rs.randint(*prompt_lengths)) for _ in range(b)]
    out = {}
    for side in ("chosen", "rejected"):
        tokens, attn, loss = (np.zeros((b, t), np.int32) for _ in range(3))
        for i, prompt in enumerate(prompts):
            n_p = len(prompt)
            if one_token_rejected and (side, i) == ("rejected", 0):
                length = n_p + 1
            else:
                length = rs.randint(n_p + 1, t + 1)
            tokens[i, :n_p] = prompt
            tokens[i, n_p:length] = rs.randint(1, v, size=length - n_p)
            attn[i, :length] = 1
            loss[i, n_p:length] = 1
        out[f"{side}_tokens"], out[f"{side}_attention_mask"] = tokens, attn
        out[f"{side}_loss_mask"] = loss
    return out
