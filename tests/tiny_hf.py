"""Tiny random Hugging Face models built from configs at test time and saved to a folder:
a BLIP captioner and the parts of a Stable Diffusion pipeline. Nothing is downloaded."""
from __future__ import annotations

import json
from pathlib import Path

WORDS = ["a", "photo", "of", "cat", "dog", "on", "the", "grass", "red", "ball"]


def save_tiny_blip(folder: Path) -> Path:
    from transformers import (BertTokenizerFast, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(specials + WORDS) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), bos_token="[DEC]")
    processor = BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer)
    size = len(specials) + len(WORDS)
    config = BlipConfig(
        text_config=dict(vocab_size=size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=5, eos_token_id=3,
                         sep_token_id=3, pad_token_id=0, encoder_hidden_size=16),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    BlipForConditionalGeneration(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
