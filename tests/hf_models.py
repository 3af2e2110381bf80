"""Tiny Hugging Face models for the tests: random weights, no hub. One builder over
per-family default configs, so that each test states only what it changes."""
import torch

#: the default tiny config of each family (a test overrides what it needs)
DECODER = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
BERT = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=16)
VIT = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
           num_attention_heads=4, intermediate_size=48)


def tiny(cls_name: str, defaults: dict, *, dtype=torch.float64, seed: int = 0, **config):
    """``transformers.<cls_name>`` from ``defaults`` updated by ``config``, seeded, in
    ``dtype`` and eval mode (``dtype=None`` keeps the class's float32)."""
    import transformers
    torch.manual_seed(seed)
    cls = getattr(transformers, cls_name)
    model = cls(cls.config_class(**{**defaults, **config}))
    return (model if dtype is None else model.to(dtype)).eval()
