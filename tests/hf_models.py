"""A Hugging Face `transformers` BertModel built from a small config (no download), wrapped the way users of that
ecosystem bring a sentence encoder: `input_ids` + `attention_mask` in, a masked-mean embedding out."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel


class BertSentenceEncoder(torch.nn.Module):
    def __init__(self, vocab_size: int = 64, hidden_size: int = 32, layers: int = 2, heads: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=2 * hidden_size, max_position_embeddings=64)
        self.bert = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def bert_sentence_encoder(**kw) -> BertSentenceEncoder:
    return BertSentenceEncoder(**kw)
