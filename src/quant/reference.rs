//! f64 CPU reference of GPTQ and GPTAQ (algorithm.md §1.2, §2.2).
