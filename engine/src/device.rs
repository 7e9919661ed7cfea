//! Device selection: `--device cpu|cuda|auto`. `auto` probes for the CUDA driver library without
//! panicking and falls back to the CPU.
//!
//! The probe goes through `libloading` (`cuInit`, `cuDeviceGetCount`) rather than cudarc,
//! because cudarc's dynamic loading panics when `libcuda` is absent. Only after a successful
//! probe does a `cuda` build open a cudarc context, which proves the seam the CUDA executor
//! will use. Until that executor exists, `auto` always resolves to the CPU and `cuda` is an
//! error naming what is missing.

use std::fmt;
use std::os::raw::{c_int, c_uint};
use std::str::FromStr;
use std::sync::OnceLock;

use crate::error::{EngineError, Result};

/// What `--device` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
    /// CUDA when this build and machine can run on it, the CPU otherwise.
    Auto,
}

impl FromStr for DeviceKind {
    type Err = EngineError;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" => Ok(DeviceKind::Cuda),
            "auto" => Ok(DeviceKind::Auto),
            _ => Err(EngineError::Unsupported(format!(
                "device `{s}`: expected one of cpu, cuda, auto"
            ))),
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Auto => "auto",
        })
    }
}

/// The device the engine runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda { ordinal: usize },
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda { ordinal } => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// Whether a CUDA executor exists to hand a `Device::Cuda` to. The CUDA executor issue flips
/// this (together with the `cuda` feature gate in `cuda_device`).
const CUDA_EXECUTOR_AVAILABLE: bool = false;

/// The driver library names tried, the versioned one first as the driver installs it.
const LIBCUDA_NAMES: [&str; 2] = ["libcuda.so.1", "libcuda.so"];

/// What probing the CUDA driver found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverProbe {
    /// No driver library could be loaded; `error` is the loader's message for the last name.
    NotInstalled { error: String },
    /// The library loaded but lacks a driver API entry point.
    MissingSymbol { symbol: &'static str },
    /// A driver call returned a `CUresult` other than success.
    CallFailed { call: &'static str, code: i32 },
    /// The driver works and sees this many devices (at least one).
    Ready { devices: usize },
}

impl fmt::Display for DriverProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DriverProbe::NotInstalled { error } => write!(
                f,
                "no CUDA driver ({} not loadable: {error})",
                LIBCUDA_NAMES.join(" / ")
            ),
            DriverProbe::MissingSymbol { symbol } => {
                write!(f, "the CUDA driver library lacks `{symbol}`")
            }
            DriverProbe::CallFailed { call, code } => {
                write!(
                    f,
                    "CUDA driver call {call} failed: {}",
                    cu_result_name(*code)
                )
            }
            DriverProbe::Ready { devices } => {
                write!(f, "CUDA driver found with {devices} device(s)")
            }
        }
    }
}

impl DriverProbe {
    pub fn is_ready(&self) -> bool {
        matches!(self, DriverProbe::Ready { .. })
    }
}

/// Probe the CUDA driver once per process; never panics, whatever the machine has.
pub fn probe_driver() -> &'static DriverProbe {
    static PROBE: OnceLock<DriverProbe> = OnceLock::new();
    PROBE.get_or_init(|| probe_libraries(&LIBCUDA_NAMES))
}

/// Resolve `--device` to the device the engine will run on.
pub fn resolve(requested: DeviceKind) -> Result<Device> {
    match requested {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Auto => match cuda_device() {
            Ok(device) => Ok(device),
            Err(why) => {
                tracing::info!("--device auto: running on the CPU because {why}");
                Ok(Device::Cpu)
            }
        },
        DeviceKind::Cuda => {
            cuda_device().map_err(|why| EngineError::Unsupported(format!("--device cuda: {why}")))
        }
    }
}

/// The CUDA device to run on, or why there is none: the build, then the driver, then a cudarc
/// context, then the executor.
fn cuda_device() -> std::result::Result<Device, String> {
    let probe = probe_driver();
    if !cfg!(feature = "cuda") {
        return Err(format!(
            "this build has no CUDA executor (rebuild with `--features cuda`); {probe}"
        ));
    }
    let DriverProbe::Ready { devices } = probe else {
        return Err(probe.to_string());
    };
    #[cfg(feature = "cuda")]
    open_cuda_context(0)?;
    if !CUDA_EXECUTOR_AVAILABLE {
        return Err(format!(
            "{probe} and a CUDA context opens, but the CUDA executor is not available yet \
             (use --device cpu); {devices} device(s) idle"
        ));
    }
    Ok(Device::Cuda { ordinal: 0 })
}

/// Open (and drop) a cudarc context on `ordinal`. cudarc panics on a missing symbol, as with a
/// driver older than the bindings, so a panic is caught and reported like an error.
#[cfg(feature = "cuda")]
fn open_cuda_context(ordinal: usize) -> std::result::Result<(), String> {
    match std::panic::catch_unwind(|| cudarc::driver::CudaContext::new(ordinal)) {
        Ok(Ok(_context)) => Ok(()),
        Ok(Err(e)) => Err(format!("opening a CUDA context on device {ordinal}: {e}")),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("panic");
            Err(format!(
                "opening a CUDA context on device {ordinal} panicked in cudarc: {message}"
            ))
        }
    }
}

type CuInit = unsafe extern "C" fn(flags: c_uint) -> c_int;
type CuDeviceGetCount = unsafe extern "C" fn(count: *mut c_int) -> c_int;

/// Load the first library of `names` that opens and ask it how many devices there are.
fn probe_libraries(names: &[&str]) -> DriverProbe {
    let mut last_error = String::from("no library name given");
    for name in names {
        // SAFETY: loading libcuda runs only the driver's own initialisers.
        match unsafe { libloading::Library::new(name) } {
            Ok(library) => {
                let probe = count_devices(&library);
                // Unloading a driver that has been initialised can crash at exit; keep it.
                std::mem::forget(library);
                return probe;
            }
            Err(e) => last_error = e.to_string(),
        }
    }
    DriverProbe::NotInstalled { error: last_error }
}

fn count_devices(library: &libloading::Library) -> DriverProbe {
    // SAFETY: the signatures are the CUDA driver API's (CUresult is a C enum, an int).
    let (cu_init, cu_device_get_count) = unsafe {
        let Ok(cu_init) = library.get::<CuInit>(b"cuInit\0") else {
            return DriverProbe::MissingSymbol { symbol: "cuInit" };
        };
        let Ok(count) = library.get::<CuDeviceGetCount>(b"cuDeviceGetCount\0") else {
            return DriverProbe::MissingSymbol {
                symbol: "cuDeviceGetCount",
            };
        };
        (cu_init, count)
    };
    // SAFETY: cuInit takes flags 0; cuDeviceGetCount writes one int through a valid pointer.
    let code = unsafe { cu_init(0) };
    if code != CUDA_SUCCESS {
        return DriverProbe::CallFailed {
            call: "cuInit",
            code,
        };
    }
    let mut devices: c_int = 0;
    let code = unsafe { cu_device_get_count(&mut devices) };
    if code != CUDA_SUCCESS {
        return DriverProbe::CallFailed {
            call: "cuDeviceGetCount",
            code,
        };
    }
    if devices <= 0 {
        return DriverProbe::CallFailed {
            call: "cuDeviceGetCount",
            code: CUDA_ERROR_NO_DEVICE,
        };
    }
    DriverProbe::Ready {
        devices: devices as usize,
    }
}

const CUDA_SUCCESS: c_int = 0;
const CUDA_ERROR_NO_DEVICE: c_int = 100;

/// Names for the `CUresult`s a probe meets on a misconfigured machine.
fn cu_result_name(code: i32) -> String {
    let name = match code {
        3 => "CUDA_ERROR_NOT_INITIALIZED",
        34 => "CUDA_ERROR_STUB_LIBRARY (the toolkit's stub libcuda, not a driver)",
        35 => "CUDA_ERROR_INSUFFICIENT_DRIVER (driver older than the runtime)",
        46 => "CUDA_ERROR_DEVICE_UNAVAILABLE",
        100 => "CUDA_ERROR_NO_DEVICE (no CUDA-capable device)",
        803 => "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH",
        804 => "CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE",
        _ => return format!("CUresult {code}"),
    };
    format!("{name} ({code})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_kinds() {
        assert_eq!("cpu".parse::<DeviceKind>().unwrap(), DeviceKind::Cpu);
        assert_eq!("CUDA".parse::<DeviceKind>().unwrap(), DeviceKind::Cuda);
        assert_eq!(" auto ".parse::<DeviceKind>().unwrap(), DeviceKind::Auto);
        for kind in [DeviceKind::Cpu, DeviceKind::Cuda, DeviceKind::Auto] {
            assert_eq!(kind.to_string().parse::<DeviceKind>().unwrap(), kind);
        }
    }

    #[test]
    fn rejects_unknown_devices_with_the_choices() {
        let err = "tpu".parse::<DeviceKind>().unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, EngineError::Unsupported(_)));
        assert!(message.contains("tpu"), "{message}");
        assert!(message.contains("cpu, cuda, auto"), "{message}");
    }

    #[test]
    fn cpu_resolves_to_cpu() {
        assert_eq!(resolve(DeviceKind::Cpu).unwrap(), Device::Cpu);
        assert_eq!(Device::Cuda { ordinal: 1 }.to_string(), "cuda:1");
    }

    #[test]
    fn auto_falls_back_to_cpu_without_panicking() {
        assert_eq!(resolve(DeviceKind::Auto).unwrap(), Device::Cpu);
    }

    #[test]
    fn cuda_is_refused_with_the_missing_piece_named() {
        let message = match resolve(DeviceKind::Cuda) {
            Err(EngineError::Unsupported(message)) => message,
            other => panic!("expected Unsupported, got {other:?}"),
        };
        assert!(message.starts_with("--device cuda: "), "{message}");
        let expected = if !cfg!(feature = "cuda") {
            "--features cuda"
        } else if !probe_driver().is_ready() {
            "CUDA"
        } else {
            "executor is not available"
        };
        assert!(message.contains(expected), "{message}");
    }

    #[test]
    fn missing_library_is_reported_not_panicked() {
        let probe = probe_libraries(&["libsluice-no-such-driver.so.1"]);
        let DriverProbe::NotInstalled { error } = &probe else {
            panic!("expected NotInstalled, got {probe:?}");
        };
        assert!(error.contains("libsluice-no-such-driver"), "{error}");
        assert!(probe.to_string().starts_with("no CUDA driver"));
    }

    #[test]
    fn library_without_the_driver_api_is_reported() {
        // libc loads everywhere this crate builds but has no cuInit.
        let probe = probe_libraries(&["libc.so.6"]);
        assert_eq!(probe, DriverProbe::MissingSymbol { symbol: "cuInit" });
    }

    #[test]
    fn probe_matches_the_machine() {
        // Whatever this machine has, the cached probe agrees with a fresh one.
        let fresh = probe_libraries(&LIBCUDA_NAMES);
        assert_eq!(&fresh, probe_driver());
        if !std::path::Path::new("/dev/nvidiactl").exists() {
            assert!(!fresh.is_ready(), "{fresh}");
        }
    }
}
