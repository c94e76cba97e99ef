"""A CLIP BPE tokenizer for a closed vocabulary, so small models need no hub download.

The merges are learned by BPE on the word list itself, so encoding (which applies merges by
rank) turns every listed word into one token, as CLIP's real merges do for common words.
Every byte-level character stays in the vocabulary, so any text still tokenizes.
"""

import json

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def build_word_tokenizer(words: list[str], max_length: int) -> CLIPTokenizer:
    chars = list(bytes_to_unicode().values())
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=1_000_000, min_frequency=1, end_of_word_suffix="</w>", show_progress=False)
    bpe.train_from_iterator(sorted(set(words)), trainer)
    learned = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = {}  # ids in sorted order: the trainer breaks ties in a per-process hash order
    for token in chars + [c + "</w>" for c in chars] + sorted(learned["vocab"]) + list(SPECIAL):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
