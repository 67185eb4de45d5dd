//! Calibration data: text, JSON lines, Parquet, pre-tokenized safetensors; window sampling.
