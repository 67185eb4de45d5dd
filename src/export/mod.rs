//! GPTQ checkpoint format: packing, writing, reading (algorithm.md §3).
