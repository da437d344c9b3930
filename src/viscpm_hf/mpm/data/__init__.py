"""Datasets for training with MPM: conversations and captions with their images, and bilingual mixing."""

from .chat_datasets import (
    caption_dataset,
    conversation_dataset,
    image_text_dataset,
    mix_languages,
    split_assistant_turns,
)
