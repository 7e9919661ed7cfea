//! Model architectures run by the CPU executor.
