"""A CLIP BPE tokenizer for a closed vocabulary, so tiny test models need no hub download.

Every byte-level character is in the vocabulary (any text tokenizes); merges turn each
listed word into one token, as CLIP's real merges do for common words.
"""

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


def build_word_tokenizer(words: list[str], max_length: int) -> CLIPTokenizer:
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right until the word is one token
            pair, joined = (pieces[0], pieces[1]), pieces[0] + pieces[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(joined, len(vocab))
            pieces = [joined] + pieces[2:]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
