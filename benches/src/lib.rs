//! Benchmarks and load tooling for Sluice.
//!
//! * `sluice-load` (`src/bin/load.rs`): a closed-loop HTTP/1.1 load generator, one keep-alive
//!   connection per concurrent worker, printing a JSON summary (requests/s, latency
//!   percentiles, time to first byte for streams).
//! * `benches/run.sh`: the end-to-end harness. It builds the release binaries, starts
//!   `mock-provider` and the `sluice` gateway pinned to separate CPUs, drives both with
//!   `sluice-load` (directly and through the gateway) and writes a markdown table of the
//!   gateway's added latency, CPU per request and peak RSS to `target/bench-results.md`.
//! * `benches/translation.rs`: criterion micro-benchmarks of provider translation (request
//!   building, response translation and stream decoding per wire format), run with
//!   `cargo bench -p sluice-benches --bench translation`.
//!
//! See `benches/README.md` for how to run them and what each column means.
