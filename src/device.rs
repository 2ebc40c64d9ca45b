//! Choosing the compute device (WebGPU/wgpu or Burn's CPU backend) and checking, before any
//! training, that it computes correctly: a broken shader on some WebGPU stacks returns stale
//! or wrong data without an error, so a device that fails the check refuses to train.

use burn::tensor::Device;
use burn::tensor::activation::silu;

use crate::error::{Result, bail, err};
use crate::tensor::{floats, read};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Gpu,
    Cpu,
    Auto,
}

impl DeviceChoice {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "gpu" => DeviceChoice::Gpu,
            "cpu" => DeviceChoice::Cpu,
            "auto" => DeviceChoice::Auto,
            other => bail!(Config, "unknown device {other:?} (gpu, cpu, auto)"),
        })
    }
}

/// A device and a human-readable name for reports.
#[derive(Clone)]
pub struct Compute {
    pub device: Device,
    pub name: String,
    pub is_gpu: bool,
    /// The largest buffer the device allows (WebGPU's `maxBufferSize` and
    /// `maxStorageBufferBindingSize`, the smaller); `None` on the CPU backend.
    pub max_buffer: Option<u64>,
    /// Whether f16 matmuls are worth using here: a hardware adapter with `shader-f16`. On a
    /// software adapter (lavapipe) f16 is offered but no faster (a 512×576×1536 matmul: 94 ms
    /// in f16 vs 80 ms in f32), so the base stays f32 there unless asked.
    pub fast_f16: bool,
}

/// The native GPU: Burn's device and the wgpu handles under it (kept to replace a lost
/// device, and to lose one on purpose in tests). Burn's default wgpu runtime can be
/// initialised once per process; a replacement registers new handles as a new runtime.
#[cfg(not(target_family = "wasm"))]
struct NativeGpu {
    compute: Compute,
    setup: burn::tensor::wgpu::WgpuSetup,
}

#[cfg(not(target_family = "wasm"))]
static GPU: std::sync::Mutex<Option<std::result::Result<NativeGpu, String>>> = std::sync::Mutex::new(None);

#[cfg(not(target_family = "wasm"))]
fn gpu_state() -> std::sync::MutexGuard<'static, Option<std::result::Result<NativeGpu, String>>> {
    GPU.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Native device selection. `Auto` takes the GPU when wgpu finds a hardware adapter; a
/// software rasteriser (lavapipe/llvmpipe, SwiftShader: wgpu reports them as CPU devices)
/// is slower than Burn's CPU backend, so `Auto` then uses the CPU backend. `Gpu` takes any
/// wgpu adapter, software ones included (that is how GPU code is tested without a GPU).
/// After [`reacquire`], the GPU is the replacement device.
#[cfg(not(target_family = "wasm"))]
pub fn select(choice: DeviceChoice) -> Result<Compute> {
    let cpu = || Compute { device: Device::flex(), name: "cpu (burn flex)".into(), is_gpu: false, max_buffer: None, fast_f16: false };
    if choice == DeviceChoice::Cpu {
        return Ok(cpu());
    }
    static SOFTWARE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let mut gpu = gpu_state();
    if choice == DeviceChoice::Auto && gpu.is_none() {
        let software = *SOFTWARE.get_or_init(|| adapter_info().is_none_or(|(_, sw, _)| sw));
        if software {
            return Ok(cpu());
        }
    }
    let gpu = gpu.get_or_insert_with(|| {
        let (name, software, max_buffer) =
            adapter_info().ok_or_else(|| "no WebGPU/wgpu adapter found (on Linux without a GPU install mesa-vulkan-drivers for lavapipe, or use --device cpu)".to_string())?;
        let (device, setup) = Device::wgpu_options().init_with_setup().map_err(|e| format!("wgpu init: {e:?}"))?;
        // Burn's wgpu runtime requests the adapter's limits, so the device has these.
        let fast_f16 = !software && device.supports_dtype(burn::tensor::FloatDType::F16);
        Ok(NativeGpu { compute: Compute { device, name, is_gpu: true, max_buffer: Some(max_buffer), fast_f16 }, setup })
    });
    match gpu {
        Ok(g) => Ok(g.compute.clone()),
        Err(_) if choice == DeviceChoice::Auto => Ok(cpu()),
        Err(e) => bail!(Device, "{e}"),
    }
}

/// Replace a lost native GPU device: a new wgpu instance, adapter and device (the adapter's
/// features and limits, as Burn requests them) registered with Burn as a new runtime, checked
/// by [`self_check`]. Everything on the old device is gone: reload the model and restore the
/// adapter from its last checkpoint on the returned device. [`select`] returns it from now on.
#[cfg(not(target_family = "wasm"))]
pub fn reacquire() -> Result<Compute> {
    use burn::tensor::wgpu::{WgpuSetup, wgpu};
    let mut state = gpu_state();
    let Some(Ok(old)) = state.as_ref() else { bail!(Device, "no GPU device was in use, so there is none to replace") };
    let backend = old.setup.backend;
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor { backends: backend.into(), ..wgpu::InstanceDescriptor::new_without_display_handle_from_env() });
    let adapter = crate::tensor::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions { power_preference: wgpu::PowerPreference::HighPerformance, ..Default::default() }))
        .map_err(|e| err!(Device, "the GPU device was lost and no adapter is available to replace it: {e}"))?;
    let features = adapter.features().difference(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS | wgpu::Features::all_experimental_mask());
    let (device, queue) = crate::tensor::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("webpeft (replacement)"),
        required_features: features,
        required_limits: adapter.limits(),
        memory_hints: wgpu::MemoryHints::MemoryUsage,
        ..Default::default()
    }))
    .map_err(|e| err!(Device, "the GPU device was lost and a new one could not be acquired: {e}"))?;
    let setup = WgpuSetup { instance, adapter, device, queue, backend };
    let device = Device::wgpu_options().setup(setup.clone()).init().map_err(|e| err!(Device, "registering the new GPU device: {e:?}"))?;
    crate::tensor::block_on(self_check(&device))?;
    let compute = Compute { device, ..old.compute.clone() };
    *state = Some(Ok(NativeGpu { compute: compute.clone(), setup }));
    Ok(compute)
}

/// Testing aid: destroy the native GPU device in use (`wgpu::Device::destroy`, what a driver
/// reset does to it). Every later operation on it fails with [`Error::is_device_lost`].
///
/// [`Error::is_device_lost`]: crate::error::Error::is_device_lost
#[cfg(not(target_family = "wasm"))]
pub fn simulate_device_loss() -> Result<()> {
    match gpu_state().as_ref() {
        Some(Ok(g)) => {
            g.setup.device.destroy();
            // wgpu reports the loss (the device-lost callback, which poisons Burn's device)
            // once its queue has drained, at the next poll: make that now, as a driver reset
            // that is noticed between two steps.
            let _ = g.setup.device.poll(burn::tensor::wgpu::wgpu::PollType::wait_indefinitely());
            Ok(())
        }
        _ => bail!(Device, "no GPU device is in use (the CPU backend cannot lose its device)"),
    }
}

/// The name of the adapter wgpu would pick, if any, whether it is a software one, and its
/// largest buffer.
#[cfg(not(target_family = "wasm"))]
fn adapter_info() -> Option<(String, bool, u64)> {
    use burn::tensor::wgpu::wgpu;
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions { power_preference: wgpu::PowerPreference::HighPerformance, ..Default::default() })).ok()?;
    let info = adapter.get_info();
    let limits = adapter.limits();
    let max_buffer = limits.max_buffer_size.min(limits.max_storage_buffer_binding_size as u64);
    Some((format!("{} ({:?}, {})", info.name, info.backend, info.driver), info.device_type == wgpu::DeviceType::Cpu, max_buffer))
}

/// Run the module's static constructors, once (wasm). CubeCL's IR registers its type casts
/// through `inventory` constructors, which wasm-ld gathers into `__wasm_call_ctors`. A module
/// that never calls it is linked "command-style", with a call to it at the top of every
/// exported function, and JS calls into the module at every WebGPU object it creates (several
/// per kernel launch): re-running every constructor each time was most of the main thread's
/// time during generation in Chromium (a CPU profile: 20 of 33 s under `create_bind_group`).
/// Calling it here turns that wrapping off; it runs at instantiation (the module's start
/// function, `crate::wasm`) and before any GPU work ([`init_webgpu`]: a test binary links the
/// library without running its start function).
#[cfg(target_family = "wasm")]
pub fn run_constructors() {
    unsafe extern "C" {
        fn __wasm_call_ctors();
    }
    static DONE: std::sync::Once = std::sync::Once::new();
    // SAFETY: the linker-made function, run once.
    DONE.call_once(|| unsafe { __wasm_call_ctors() });
}

/// Browser: acquire WebGPU (once per page).
#[cfg(target_family = "wasm")]
pub async fn init_webgpu() -> Result<Compute> {
    run_constructors();
    let device = Device::wgpu_options().init_async().await.map_err(|e| err!(Device, "WebGPU is not available: {e:?}"))?;
    // The browser hides whether an adapter is software (SwiftShader has no shader-f16 anyway).
    let fast_f16 = device.supports_dtype(burn::tensor::FloatDType::F16);
    Ok(Compute { device, name: "webgpu".into(), is_gpu: true, max_buffer: browser_max_buffer().await, fast_f16 })
}

/// The WebGPU adapter's largest buffer (`maxBufferSize` / `maxStorageBufferBindingSize`, the
/// smaller): Burn requests the adapter's limits, so the device has them.
#[cfg(target_family = "wasm")]
async fn browser_max_buffer() -> Option<u64> {
    use js_sys::Reflect;
    use wasm_bindgen::{JsCast, JsValue};
    let get = |o: &JsValue, k: &str| Reflect::get(o, &k.into()).ok().filter(|v| !v.is_undefined() && !v.is_null());
    let gpu = get(&js_sys::global(), "navigator").and_then(|n| get(&n, "gpu"))?;
    let request: js_sys::Function = get(&gpu, "requestAdapter")?.dyn_into().ok()?;
    let adapter = wasm_bindgen_futures::JsFuture::from(js_sys::Promise::from(request.call0(&gpu).ok()?)).await.ok()?;
    let limits = get(&adapter, "limits")?;
    let n = |k: &str| get(&limits, k).and_then(|v| v.as_f64()).map(|v| v as u64);
    Some(n("maxBufferSize")?.min(n("maxStorageBufferBindingSize")?))
}

/// Forward and backward of a small `sum(c * silu(x @ W))` against an f64 host reference.
pub async fn self_check(device: &Device) -> Result<()> {
    let (n, k, m) = (5usize, 7usize, 3usize);
    let x: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
    let w: Vec<f32> = (0..k * m).map(|i| ((i * 11 % 13) as f32 - 6.0) / 10.0).collect();
    let c: Vec<f32> = (0..n * m).map(|i| (i % 5) as f32 - 2.0).collect();
    let xt = floats(x.clone(), [n, k], device);
    let wt = floats(w.clone(), [k, m], device).autodiff().require_grad();
    let ct = floats(c.clone(), [n, m], device);
    let y = (silu(xt.matmul(wt.clone())) * ct).sum();
    let grads = y.backward();
    let g = wt.grad(&grads).ok_or_else(|| err!(Device, "self-check: no gradient"))?;
    let got_y = read(y.without_autodiff()).await?.data[0] as f64;
    let got_g = read(g).await?.data;
    // Host reference.
    let mut want_y = 0.0f64;
    let mut want_g = vec![0.0f64; k * m];
    for i in 0..n {
        for j in 0..m {
            let z: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[t * m + j] as f64).sum();
            let s = 1.0 / (1.0 + (-z).exp());
            want_y += c[i * m + j] as f64 * z * s;
            let dz = c[i * m + j] as f64 * (s + z * s * (1.0 - s));
            for t in 0..k {
                want_g[t * m + j] += x[i * k + t] as f64 * dz;
            }
        }
    }
    let err_y = (got_y - want_y).abs();
    let err_g = got_g.iter().zip(&want_g).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
    if !(err_y < 1e-3 && err_g < 1e-3) {
        bail!(Device, "device self-check failed (|dy| = {err_y:e}, |dgrad| = {err_g:e}): this GPU/driver computes wrong results; refusing to train (try --device cpu)");
    }
    Ok(())
}

/// Bytes in use / reserved by the device's memory pools, when the backend reports them.
pub fn memory_usage(device: &Device) -> Option<(u64, u64)> {
    device.memory_pool_usage().map(|u| (u.bytes_in_use, u.bytes_reserved))
}
