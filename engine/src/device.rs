//! Device selection: `--device cpu|cuda|auto`. `auto` probes for the CUDA driver library without
//! panicking and falls back to the CPU.
