//! Layer-by-layer quantization driver.
