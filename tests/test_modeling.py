import torch
import transformers as tf

from peft_post.modeling import soft_cap_logits


def test_soft_cap_logits_caps_only_where_the_config_asks():
    logits = torch.tensor([[-100.0, -1.0, 0.0, 2.5, 1e4]])
    capped = soft_cap_logits(logits, tf.Gemma3TextConfig(final_logit_softcapping=30.0))
    torch.testing.assert_close(capped, torch.tanh(logits / 30.0) * 30.0)
    assert capped.abs().max() <= 30.0 and capped[0, 3] == torch.tanh(torch.tensor(2.5 / 30.0)) * 30.0
    assert soft_cap_logits(logits, tf.Gemma3TextConfig(final_logit_softcapping=None)) is logits
    assert soft_cap_logits(logits, tf.LlamaConfig()) is logits  # no such attribute at all
