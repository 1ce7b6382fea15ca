"""A deterministic set of realistic chat requests, built without downloading anything: a few shared
system prompts x user questions made from templates and topic lists (tens of thousands of distinct
conversations). The same (n, seed) always gives the same list, so two runs (or two engines) see the
same requests in the same order.
"""

from __future__ import annotations

import itertools
import random

SYSTEM_PROMPTS = [
    "You are a helpful assistant. Answer clearly and concisely.",
    "You are a friendly tutor who explains things step by step to a curious student.",
    "You are an expert software engineer. Give practical, correct advice with short examples.",
    "You are a careful science communicator. Be accurate and avoid jargon where you can.",
    "You are a travel and lifestyle assistant. Keep answers warm, specific and brief.",
    "You are a concise assistant. Reply in at most three sentences.",
]

TEMPLATES = [
    "What is {t}?",
    "Explain {t} to a ten-year-old.",
    "Give me three interesting facts about {t}.",
    "Why does {t} matter?",
    "Write a short paragraph about {t}.",
    "What are the most common misconceptions about {t}?",
    "How would you summarise {t} in one sentence?",
    "Can you compare {t} and {u}?",
    "What is the history of {t}?",
    "List the pros and cons of {t}.",
    "Write a haiku about {t}.",
    "How do I get started learning about {t}?",
    "What questions should I ask an expert on {t}?",
    "Describe {t} using a simple analogy.",
    "What is the difference between {t} and {u}?",
    "Tell me a fun story that involves {t}.",
    "What are the key ideas behind {t}?",
    "How has {t} changed over the last fifty years?",
    "Suggest a weekend project related to {t}.",
    "What would happen if {t} disappeared tomorrow?",
]

TOPICS = [
    "photosynthesis", "black holes", "the French Revolution", "machine learning", "climate change",
    "the immune system", "jazz music", "volcanoes", "the stock market", "quantum computing",
    "the Roman Empire", "sourdough bread", "electric cars", "honey bees", "the printing press",
    "plate tectonics", "the internet", "vaccines", "chess", "the Moon landing", "coral reefs",
    "inflation", "recursion in programming", "the water cycle", "Shakespeare", "solar panels",
    "the human brain", "coffee", "the Great Wall of China", "DNA", "public libraries", "rainbows",
    "the Olympic Games", "compound interest", "sleep", "bicycles", "the periodic table", "origami",
    "hash tables", "the Amazon rainforest", "meditation", "earthquakes", "the Renaissance",
    "renewable energy", "penguins", "the theory of relativity", "Python decorators", "tea ceremonies",
    "antibiotics", "the Silk Road", "hurricanes", "baking bread", "opera", "Mars exploration",
    "database indexes", "the Industrial Revolution", "wolves", "gravity", "mountain climbing",
    "composting", "the Byzantine Empire", "neural networks", "glaciers", "podcasts", "the violin",
]


def chat_prompts(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """n conversations (system + user message), distinct while n < len(all combinations), in a
    seeded order that interleaves the system prompts (requests sharing one are spread out)."""
    users = [
        template.format(t=t, u=TOPICS[(i + 7) % len(TOPICS)])
        for template, (i, t) in itertools.product(TEMPLATES, enumerate(TOPICS))
    ]
    pairs = list(itertools.product(SYSTEM_PROMPTS, users))
    random.Random(seed).shuffle(pairs)
    if n > len(pairs):
        raise ValueError(f"asked for {n} prompts; the generator has {len(pairs)} distinct ones")
    return [[{"role": "system", "content": s}, {"role": "user", "content": u}] for s, u in pairs[:n]]
