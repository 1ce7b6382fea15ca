"""Varied prompts for end-to-end tests: chat and raw, short and long (several KV blocks, longer
than the prefill chunk used in the tests)."""

LONG_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press into a system that could "
    "produce books far faster than scribes. Within fifty years, presses operated in more than two "
    "hundred European cities, and millions of volumes circulated. The spread of printed material "
    "changed how scholars shared knowledge, how religious reformers reached followers, and how "
    "merchants kept records. Newspapers appeared in the seventeenth century, and by the nineteenth "
    "century steam-powered rotary presses printed thousands of sheets an hour. "
)

RAW_PROMPTS = [
    "The capital of Germany is",
    "def add(a, b):\n    return",
    "Once upon a time, in a small village by the sea,",
    LONG_TEXT * 2 + "\nIn one sentence, the main effect of the printing press was",
]

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Opposite of hot?"}],
    [{"role": "user", "content": LONG_TEXT + "\nSummarise the text above in two sentences."}],
]
