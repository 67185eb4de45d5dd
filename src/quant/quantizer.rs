//! The GPTQ weight quantizer (algorithm.md §1.3).
