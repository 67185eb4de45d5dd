//! Perplexity evaluation (GPTQ-paper protocol).
