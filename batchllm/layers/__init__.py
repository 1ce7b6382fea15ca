"""Model building blocks: norm, rotary embedding, sampler."""
